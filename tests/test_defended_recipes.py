"""The defense recipes under scripted faults: what each promises, measured."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx


def params0():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (8, 4)), "b": 0.1 * jax.random.normal(k2, (4,))}


def grads_at(t):
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(1), t))
    return {"w": jax.random.normal(k1, (8, 4)), "b": jax.random.normal(k2, (4,))}


def step_sizes(tx, steps, spike_at=None, factor=1e6):
    params, state = params0(), None
    state = tx.init(params)
    update = jax.jit(tx.update)
    sizes = []
    for t in range(steps):
        g = grads_at(t)
        if t == spike_at:
            g = jax.tree.map(lambda x: factor * x, g)
        u, state = update(g, state, params)
        new = optax.apply_updates(params, u)
        sizes.append(float(optax.tree.norm(jax.tree.map(jnp.subtract, new, params))))
        params = new
    return np.array(sizes), state


@pytest.mark.parametrize("factor", [1e3, 1e6, 1e8])
def test_robust_adamw_spike_moves_params_no_more_than_a_normal_step(factor):
    sizes, state = step_sizes(adaptx.robust_adamw(1e-2), 60, spike_at=50, factor=factor)
    normal = sizes[30:50]
    assert sizes[50] <= normal.max() * (1 + 1e-3)
    assert np.all(np.isfinite(sizes))
    assert int(adaptx.telemetry(state)["clip_spikes/num_clipped"]) >= 1


@jax.numpy_dtype_promotion("standard")  # optax.adamw is not strict-clean
def test_plain_adamw_is_hurt_by_the_same_spike_and_robust_adamw_is_not():
    # The contrast that motivates the test above. Plain AdamW's normalisation
    # bounds the spike step itself, but the spike lives on in both moments: the
    # next steps overshoot (about 3x a normal step), then the poisoned second
    # moment freezes training (steps 50 steps later are < 5% of normal).
    plain, _ = step_sizes(optax.adamw(1e-2), 110, spike_at=50, factor=1e6)
    normal = plain[30:50]
    assert plain[50:53].min() > 2 * normal.max()
    assert plain[100:110].max() < 0.05 * normal.min()
    robust, _ = step_sizes(adaptx.robust_adamw(1e-2), 110, spike_at=50, factor=1e6)
    r_normal = robust[30:50]
    assert robust[50:110].max() <= 1.5 * r_normal.max()
    assert robust[100:110].min() > 0.5 * r_normal.min()


def test_robust_adamw_skips_nan_steps_bit_identically():
    tx = adaptx.robust_adamw(1e-2)
    params = params0()
    state = tx.init(params)
    u, state = tx.update(grads_at(0), state, params)
    params = optax.apply_updates(params, u)
    bad = {**grads_at(1), "b": jnp.full((4,), jnp.nan)}
    u, new_state = tx.update(bad, state, params)
    new_params = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    figures = adaptx.telemetry(new_state)
    assert int(figures["guard/skipped"]) == 1
    assert int(figures["guard/last_reason"]) == 1


@jax.numpy_dtype_promotion("standard")  # optax.adamw is not strict-clean
def test_robust_adamw_without_faults_trains_like_adamw():
    # On a smooth problem the defenses stay out of the way.
    target = jnp.linspace(-1.0, 1.0, 16)

    def loss(p):
        return jnp.mean((p["w"] - target) ** 2)

    finals = {}
    for name, tx in {
        "robust": adaptx.robust_adamw(5e-2, weight_decay=0.0),
        "adamw": optax.adamw(5e-2, weight_decay=0.0),
    }.items():
        p = {"w": jnp.zeros(16)}
        s = tx.init(p)
        for _ in range(200):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
        finals[name] = float(loss(p))
    assert finals["robust"] < 1e-3
    assert finals["robust"] < 10 * finals["adamw"] + 1e-4


def test_stable_adamw_matches_adamw_when_second_moment_is_accurate():
    # With b2 = 0 the second moment is exactly g^2, the RMS ratio is 1: no clipping.
    params = params0()
    ours = adaptx.stable_adamw(1e-2, b2=0.0, weight_decay=0.1)
    ref = optax.adamw(1e-2, b2=0.0, weight_decay=0.1)
    s1, s2 = ours.init(params), ref.init(params)
    for t in range(5):
        u1, s1 = ours.update(grads_at(t), s1, params)
        with jax.numpy_dtype_promotion("standard"):
            u2, s2 = ref.update(grads_at(t), s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_spam_recipe_uses_the_paper_defaults():
    tx = adaptx.spam(1e-3)
    state = tx.init(params0())
    adam_state = state[0]
    assert isinstance(adam_state, adaptx.ScaleByAdamState)
    sizes, state = step_sizes(adaptx.spam(1e-3, reset_interval=20, reset_warmup=5), 30)
    assert np.all(np.isfinite(sizes))
    # the step right after a reset is warmed up (scale 0.01)
    assert sizes[19] < 0.1 * sizes[18]


@pytest.mark.parametrize(
    ("factory", "kwargs", "arg"),
    [
        (adaptx.robust_adamw, {"learning_rate": -1.0}, "learning_rate"),
        (adaptx.robust_adamw, {"learning_rate": 1e-3, "b2": 1.0}, "b2"),
        (adaptx.robust_adamw, {"learning_rate": 1e-3, "update_rms_clip": 0.0}, "update_rms_clip"),
        (adaptx.robust_adamw, {"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
        (adaptx.stable_adamw, {"learning_rate": 1e-3, "update_rms_clip": -1.0}, "update_rms_clip"),
        (adaptx.stable_adamw, {"learning_rate": 1e-3, "eps": -1.0}, "eps"),
        (adaptx.spam, {"learning_rate": 1e-3, "spike_threshold": 0.0}, "spike_threshold"),
        (adaptx.spam, {"learning_rate": -1e-3}, "learning_rate"),
    ],
)
def test_bad_settings_name_the_argument(factory, kwargs, arg):
    with pytest.raises(ValueError, match=f"{factory.__name__}: `{arg}`"):
        factory(**kwargs)


def test_robust_adamw_keeps_the_second_moment_in_float32_for_float16_params():
    """A constant gradient whose square underflows float16 (1e-8): Adam's step stays at
    the learning rate with the second moment in float32 (the default), and grows step after
    step when it is stored in float16 (``nu_dtype=None``, optax's choice), which forgets
    the history of g^2 between steps."""
    params = {"w": jnp.ones(4, jnp.float16)}
    grads = {"w": jnp.full(4, 1e-4, jnp.float16)}

    def steps(**kw):
        tx = adaptx.robust_adamw(1e-2, weight_decay=0.0, **kw)
        state, out = tx.init(params), []
        for _ in range(10):
            updates, state = tx.update(grads, state, params)
            out.append(float(updates["w"][0]))
        nu = jax.tree.leaves(optax.tree_utils.tree_get(state, "nu"))[0]
        return np.array(out), nu.dtype

    default, nu_dtype = steps()
    assert nu_dtype == jnp.float32
    np.testing.assert_allclose(default, -1e-2, rtol=1e-3)
    in_float16, nu_dtype = steps(nu_dtype=None)
    assert nu_dtype == jnp.float16
    assert abs(in_float16[-1]) > 3 * 1e-2
