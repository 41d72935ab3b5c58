"""A clip tells the transforms after it that its output is s * g (adaptx._core.hints)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._core import hints as hints_lib


def tree(dtype=jnp.float32, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "w": (scale * jax.random.normal(k1, (16, 8))).astype(dtype),
        "b": (scale * jax.random.normal(k2, (8,))).astype(dtype),
    }


def run(tx, steps=12, dtype=jnp.float32):
    params = tree(dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        boost = 51.0 if t == 8 else 1.0
        g = jax.tree.map(lambda x, k=boost: x * k, tree(dtype, 0.1 + t))
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def robust_chain(chain):
    return chain(
        adaptx.zclip(warmup_steps=3),
        adaptx.scale_by_adam(update_rms_clip=1.0),
        optax.scale(-1e-2),
    )


def test_lookup_is_by_identity():
    hints = hints_lib.ScaleHints()
    g, s = jnp.ones(3), jnp.float32(0.5)
    out = g * s
    hints.record(out, g, s)
    assert hints.lookup(out) == (g, s)
    assert hints.lookup(g * s) is None  # equal values, another array
    assert hints_lib.from_extra_args({}) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hinted_chain_gives_the_same_numbers_as_optax_chain(dtype):
    # The update-RMS clip (which binds at the spike) computed as s^2 mean(g0^2 / v) from
    # the clip's hint equals mean((s g0)^2 / v) to rounding.
    p_hinted, s_hinted = run(robust_chain(hints_lib.hinted_chain), dtype=dtype)
    p_plain, s_plain = run(robust_chain(optax.chain), dtype=dtype)
    assert jax.tree.structure(s_hinted) == jax.tree.structure(s_plain)
    assert int(s_plain[1].update_clipped) > 0 or float(s_plain[1].max_update_rms) > 0
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(p_hinted), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol)
    np.testing.assert_allclose(
        float(s_hinted[1].max_update_rms), float(s_plain[1].max_update_rms), rtol=10 * tol
    )


def test_a_transform_in_between_hides_the_hint():
    # Whatever changes the clip's output (here a sign flip) makes it another array: Adam
    # then reduces over what it received, and the numbers follow the changed updates.
    flip = optax.scale(-1.0)
    hinted = hints_lib.hinted_chain(
        adaptx.zclip(warmup_steps=3), flip, adaptx.scale_by_adam(update_rms_clip=1e-3)
    )
    plain = optax.chain(
        adaptx.zclip(warmup_steps=3), flip, adaptx.scale_by_adam(update_rms_clip=1e-3)
    )
    for a, b in zip(jax.tree.leaves(run(hinted)), jax.tree.leaves(run(plain)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="memory analysis checked on XLA:CPU")
def test_robust_adamw_needs_no_full_size_temporary():
    # Without the hint, XLA writes zclip's s * g out for the update-RMS reduction.
    n = 1 << 16

    def temp_bytes(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = jnp.zeros(n)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(adaptx.robust_adamw(1e-3)) < n  # a few scalars, not 4n bytes
    assert temp_bytes(adaptx.guard(robust_chain(optax.chain))) >= 4 * n
