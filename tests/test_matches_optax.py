"""Where optax has the same math, adaptx gives the same numbers, step after step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

PAIRS = {
    "clip_by_global_norm": (adaptx.clip_by_global_norm(0.7), optax.clip_by_global_norm(0.7)),
    "clip_by_value": (adaptx.clip_by_value(0.3), optax.clip(0.3)),
    "clip_by_block_rms": (adaptx.clip_by_block_rms(0.4), optax.clip_by_block_rms(0.4)),
    "adaptive_grad_clip": (adaptx.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)),
    "adaptive_grad_clip_axis": (
        adaptx.adaptive_grad_clip(0.05, eps=1e-2, axis=-1),
        optax.adaptive_grad_clip(0.05, eps=1e-2, axis=-1),
    ),
    "scale_by_adam": (adaptx.scale_by_adam(), optax.scale_by_adam()),
    "scale_by_adam_settings": (
        adaptx.scale_by_adam(b1=0.5, b2=0.9, eps=1e-4, eps_root=1e-6),
        optax.scale_by_adam(b1=0.5, b2=0.9, eps=1e-4, eps_root=1e-6),
    ),
    "scale_by_adam_nesterov": (
        adaptx.scale_by_adam(nesterov=True),
        optax.scale_by_adam(nesterov=True),
    ),
    "scale_by_rms": (adaptx.scale_by_rms(), optax.scale_by_rms()),
    "scale_by_rms_debiased": (
        adaptx.scale_by_rms(0.95, 1e-6, 0.1, eps_in_sqrt=False, bias_correction=True),
        optax.scale_by_rms(0.95, 1e-6, 0.1, eps_in_sqrt=False, bias_correction=True),
    ),
    "scale_by_adagrad": (adaptx.scale_by_adagrad(), optax.scale_by_rss()),
    "momentum": (adaptx.momentum(0.9), optax.trace(0.9)),
    "momentum_nesterov": (adaptx.momentum(0.9, nesterov=True), optax.trace(0.9, nesterov=True)),
    "ema": (adaptx.ema(0.9), optax.ema(0.9)),
    "ema_biased": (adaptx.ema(0.9, debias=False), optax.ema(0.9, debias=False)),
    "adamw": (
        adaptx.adamw(1e-2, weight_decay=0.1, max_norm=0.5),
        optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1)),
    ),
    "adamw_schedule_mask": (
        adaptx.adamw(
            optax.cosine_decay_schedule(1e-2, 10),
            weight_decay=0.1,
            max_norm=None,
            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
        ),
        optax.adamw(
            optax.cosine_decay_schedule(1e-2, 10),
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
        ),
    ),
    "sgd": (
        adaptx.sgd(0.1, momentum=0.9, max_norm=0.5),
        optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1, momentum=0.9)),
    ),
    "sgd_nesterov_unclipped": (
        adaptx.sgd(0.1, momentum=0.9, nesterov=True, max_norm=None),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    ),
}


def tree(key):
    k = jax.random.split(key, 4)
    return {
        "kernel": jax.random.normal(k[0], (6, 5)),
        "bias": 0.1 * jax.random.normal(k[1], (5,)),
        "conv": jax.random.normal(k[2], (3, 3, 2, 4)),
        "head": {"w": 2.0 * jax.random.normal(k[3], (5, 2))},
    }


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_same_numbers_as_optax(name):
    ours, theirs = PAIRS[name]
    params = tree(jax.random.key(0))
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    with jax.numpy_dtype_promotion("standard"):  # optax's own code is not strict-clean
        for t in range(8):
            grads = jax.tree.map(lambda x: 3.0 * x, tree(jax.random.key(t + 1)))
            u_ours, s_ours = ours.update(grads, s_ours, p_ours)
            u_theirs, s_theirs = theirs.update(grads, s_theirs, p_theirs)
            for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
            p_ours = optax.apply_updates(p_ours, u_ours)
            p_theirs = optax.apply_updates(p_theirs, u_theirs)


@jax.numpy_dtype_promotion("standard")  # optax's own code is not strict-clean
def test_adam_moments_equal_optax_moments():
    params = tree(jax.random.key(0))
    ours, theirs = adaptx.scale_by_adam(b2=0.99), optax.scale_by_adam(b2=0.99)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for t in range(5):
        grads = tree(jax.random.key(t + 10))
        _, s_ours = ours.update(grads, s_ours)
        _, s_theirs = theirs.update(grads, s_theirs)
    assert int(s_ours.count) == int(s_theirs.count) == 5
    for a, b in zip(jax.tree.leaves(s_ours.nu), jax.tree.leaves(s_theirs.nu), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(s_ours.mu), jax.tree.leaves(s_theirs.mu), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)


def test_adam_moment_dtypes_are_configurable_separately():
    params = {"w": jnp.ones((4,), jnp.float32)}
    tx = adaptx.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.float32)
    state = tx.init(params)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
    updates, state = tx.update({"w": jnp.full((4,), 0.5)}, state)
    assert updates["w"].dtype == jnp.float32
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
    # First Adam step with eps -> 0 is sign(g): unaffected by the bf16 first moment.
    np.testing.assert_allclose(updates["w"], 1.0, rtol=1e-2)
