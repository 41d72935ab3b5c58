"""Adam-atan2 (Everett et al. 2024): Adam's moments, an atan2 step, no epsilon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx


def numpy_adam_atan2(grads, b1=0.9, b2=0.99, a=1.27, b=1.0, nesterov=False):
    """The published update, written out in float64 NumPy."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(grads[0], np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        out.append(a * np.arctan2(m_hat, b * np.sqrt(v_hat)))
    return out


def gradients(steps=12, shape=(7,), seed=0):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, size=steps)
    return [rng.normal(size=shape).astype(np.float32) * np.float32(c) for c in scales]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("hp", [{}, {"b1": 0.8, "b2": 0.95, "a": 2.0, "b": 0.5}])
def test_matches_the_numpy_reference(hp, nesterov):
    grads = gradients()
    tx = adaptx.scale_by_adam_atan2(**hp, nesterov=nesterov)
    state = tx.init(jnp.zeros(7))
    update = jax.jit(tx.update)
    for g, want in zip(grads, numpy_adam_atan2(grads, **hp, nesterov=nesterov), strict=True):
        u, state = update(jnp.asarray(g), state)
        np.testing.assert_allclose(u, want, rtol=2e-6, atol=1e-7)


def test_every_element_is_bounded_by_a_pi_over_2_whatever_the_gradient():
    # With b1^2 > b2 the first moment remembers a large gradient after the second has
    # forgotten it: Adam's step m/sqrt(v) then grows without bound; atan2's cannot.
    grads = [jnp.ones(3)] * 10 + [jnp.full(3, 1e-6)] * 30 + [jnp.array([1e15, -1e15, 0.0])]
    hp = {"b1": 0.99, "b2": 0.5}
    atan2, adam = adaptx.scale_by_adam_atan2(**hp), adaptx.scale_by_adam(**hp, eps=0.0)
    s_atan2, s_adam = atan2.init(jnp.zeros(3)), adam.init(jnp.zeros(3))
    worst_atan2 = worst_adam = 0.0
    for g in grads:
        u, s_atan2 = atan2.update(g, s_atan2)
        worst_atan2 = max(worst_atan2, float(jnp.max(jnp.abs(u))))
        u, s_adam = adam.update(g, s_adam)
        worst_adam = max(worst_adam, float(jnp.max(jnp.abs(u))))
    assert worst_atan2 <= 1.27 * np.pi / 2
    assert worst_adam > 100.0


@pytest.mark.parametrize("c", [1e-12, 1e-4, 1e6])
def test_the_step_is_invariant_to_the_gradients_scale(c):
    grads = gradients(steps=6)
    tx = adaptx.scale_by_adam_atan2()
    s1 = s2 = tx.init(jnp.zeros(7))
    for g in grads:
        u1, s1 = tx.update(jnp.asarray(g), s1)
        u2, s2 = tx.update(jnp.asarray(g * np.float32(c)), s2)
    np.testing.assert_allclose(u1, u2, rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_far_below_adams_epsilon_still_move():
    g = jnp.full(8, 1e-10, jnp.bfloat16)
    u, _ = adaptx.scale_by_adam_atan2().update(g, adaptx.scale_by_adam_atan2().init(g))
    assert u.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(u, np.float32), 1.27 * np.pi / 4, rtol=1e-2)
    u_adam, _ = adaptx.scale_by_adam().update(g, adaptx.scale_by_adam().init(g))
    assert float(jnp.max(jnp.abs(u_adam.astype(jnp.float32)))) < 0.05


def test_zero_second_moment_gives_a_zero_step_not_nan():
    tx = adaptx.scale_by_adam_atan2()
    u, state = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
    assert np.all(np.asarray(u) == 0.0)
    assert np.all(np.isfinite(np.asarray(state.nu)))


def test_packed_moments_give_the_same_numbers():
    params = {f"b{i}": jnp.zeros(5) for i in range(6)} | {"w": jnp.zeros((40, 30))}
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    plain, packed = adaptx.scale_by_adam_atan2(), adaptx.scale_by_adam_atan2(pack_small_leaves=64)
    sp, sq = plain.init(params), packed.init(params)
    assert len(sq.mu.flats) == 1
    for t in range(3):
        g = jax.tree.map(lambda x, t=t: x * (t + 1), grads)
        up, sp = plain.update(g, sp)
        uq, sq = packed.update(g, sq)
        for x, y in zip(jax.tree.leaves(up), jax.tree.leaves(uq), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_a_guard_skips_a_nan_step_and_keeps_the_moments():
    tx = adaptx.guard(adaptx.adam_atan2(1e-2, weight_decay=0.0))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    u, after = jax.jit(tx.update)({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
    assert np.all(np.asarray(u["w"]) == 0.0)
    assert int(after.skipped) == 1
    before, kept = jax.tree.leaves(state.inner_state), jax.tree.leaves(after.inner_state)
    for x, y in zip(before, kept, strict=True):
        np.testing.assert_array_equal(x, y)


def test_recipe_is_atan2_then_decay_then_learning_rate():
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    g = {"w": jnp.array([0.5, -2.0, 0.0, 3.0, 1e-3])}
    tx = adaptx.adam_atan2(0.1, weight_decay=0.01)
    u, _ = tx.update(g, tx.init(params), params)
    ref = optax.chain(
        adaptx.scale_by_adam_atan2(), optax.add_decayed_weights(0.01), optax.scale(-0.1)
    )
    u_ref, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"a": 0.0}, "`a` must be > 0, got a=0.0"),
        ({"b": -1.0}, "`b` must be > 0, got b=-1.0"),
        ({"b2": 1.0}, "b2"),
        ({"pack_small_leaves": 0}, "pack_small_leaves"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptx.scale_by_adam_atan2(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1.0}, "`learning_rate` must be"),
        ({"learning_rate": 1e-3, "weight_decay": -0.1}, "`weight_decay` must be"),
        ({"learning_rate": 1e-3, "a": -1.0}, "`a` must be > 0"),
        ({"learning_rate": 1e-3, "max_norm": None, "per_tensor": True}, "per_tensor=True"),
    ],
)
def test_the_recipes_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptx.adam_atan2(**kwargs)
