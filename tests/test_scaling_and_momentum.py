"""Invariants of the adaptive scaling and momentum transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptx


def test_first_adam_step_is_the_sign_of_the_gradient():
    g = {"w": jnp.array([1e-3, -5.0, 2e2])}
    tx = adaptx.scale_by_adam(eps=0.0)
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], [1.0, -1.0, 1.0], rtol=1e-6)


def test_adam_matches_a_numpy_reference_over_many_steps():
    b1, b2, eps = 0.8, 0.95, 1e-6
    rng = np.random.default_rng(0)
    gs = rng.normal(size=(20, 5)).astype(np.float32)
    m = v = np.zeros(5, np.float64)
    tx = adaptx.scale_by_adam(b1, b2, eps)
    state = tx.init(jnp.zeros(5))
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        expected = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u, state = tx.update(jnp.asarray(g), state)
        np.testing.assert_allclose(u, expected, rtol=2e-5, err_msg=f"step {t}")


def test_adam_count_saturates_instead_of_wrapping():
    tx = adaptx.scale_by_adam()
    state = tx.init(jnp.zeros(2))
    state = state._replace(count=jnp.array(np.iinfo(np.int32).max, jnp.int32))
    u, state = tx.update(jnp.ones(2), state)
    assert int(state.count) == np.iinfo(np.int32).max
    assert np.all(np.isfinite(u))


def test_bf16_moments_are_computed_in_float32():
    # 1 + 1e-3 is not representable in bf16; an f32 update of a bf16 moment must
    # still accumulate correctly over steps (up to bf16 storage rounding).
    tx = adaptx.momentum(0.5, dtype=jnp.bfloat16)
    state = tx.init(jnp.zeros(1, jnp.float32))
    for _ in range(10):
        u, state = tx.update(jnp.ones(1, jnp.float32), state)
    assert state.trace.dtype == jnp.bfloat16 and u.dtype == jnp.float32
    np.testing.assert_allclose(u, 2.0, rtol=1e-2)


def test_momentum_nesterov_is_lookahead():
    tx = adaptx.momentum(0.5, nesterov=True)
    state = tx.init(jnp.zeros(1))
    u, state = tx.update(jnp.ones(1), state)  # b = 1, u = 1 + 0.5 * 1
    np.testing.assert_allclose(u, [1.5])
    u, state = tx.update(jnp.ones(1), state)  # b = 1.5, u = 1 + 0.75
    np.testing.assert_allclose(u, [1.75])


def test_ema_debiased_of_a_constant_is_the_constant():
    tx = adaptx.ema(0.99)
    state = tx.init(jnp.zeros(3))
    for _ in range(5):
        u, state = tx.update(jnp.full((3,), 7.0), state)
    np.testing.assert_allclose(u, 7.0, rtol=1e-5)


def test_rms_keeps_magnitude_near_one_for_stationary_gradients():
    tx = adaptx.scale_by_rms(decay=0.9, bias_correction=True, eps_in_sqrt=False)
    state = tx.init(jnp.zeros(4))
    for t in range(50):
        g = jnp.full((4,), 3.0) * (-1.0) ** t
        u, state = tx.update(g, state)
    np.testing.assert_allclose(jnp.abs(u), 1.0, rtol=1e-5)


def test_adagrad_step_shrinks_like_one_over_sqrt_t():
    tx = adaptx.scale_by_adagrad(initial_accumulator_value=0.0, eps=0.0)
    state = tx.init(jnp.zeros(1))
    for _t in range(1, 17):
        u, state = tx.update(jnp.ones(1), state)
    np.testing.assert_allclose(u, [1 / np.sqrt(16)], rtol=1e-6)


@pytest.mark.parametrize("schedule", [1e-2, lambda count: 1e-2 / (1.0 + count.astype(jnp.float32))])
def test_recipes_accept_numbers_and_schedules(schedule):
    params = {"w": jnp.ones(3)}
    for tx in (adaptx.adamw(schedule), adaptx.sgd(schedule)):
        state = tx.init(params)
        u, state = jax.jit(tx.update)({"w": jnp.ones(3)}, state, params)
        assert np.all(np.asarray(u["w"]) < 0)


def test_adamw_needs_params_for_weight_decay():
    tx = adaptx.adamw(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
