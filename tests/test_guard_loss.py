"""guard reads the loss passed as ``value=loss``: non-finite losses and loss spikes are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptx
from adaptx._guards import guard as guard_lib

PARAMS = {"w": jnp.ones(3)}
GRADS = {"w": jnp.full(3, 0.1)}


def steps(tx, losses, grads=GRADS):
    state = tx.init(PARAMS)
    update = jax.jit(lambda g, s, v: tx.update(g, s, PARAMS, value=v))
    out = []
    for loss in losses:
        updates, state = update(grads, state, jnp.float32(loss))
        out.append((updates, state))
    return out


def test_non_finite_loss_is_skipped_like_non_finite_gradients():
    tx = adaptx.guard(adaptx.adamw(1e-2))
    (_, s0), (u1, s1), (u2, s2) = steps(tx, [1.0, np.nan, np.inf])
    for u, s in ((u1, s1), (u2, s2)):
        assert float(optax.tree.norm(u)) == 0.0
        assert int(s.last_reason) == guard_lib.NONFINITE_LOSS
        jax.tree.map(np.testing.assert_array_equal, s.inner_state, s0.inner_state)
    assert int(s2.skipped) == 2


def test_without_value_nothing_changes():
    tx = adaptx.guard(adaptx.adamw(1e-2))
    state = tx.init(PARAMS)
    a, sa = tx.update(GRADS, state, PARAMS)
    b, sb = tx.update(GRADS, state, PARAMS, value=jnp.float32(0.5))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert int(sa.skipped) == int(sb.skipped) == 0
    assert float(sa.loss) == 0.0 and float(sb.loss) == 0.5


def test_loss_spike_is_skipped_after_statistics_exist():
    rng = np.random.default_rng(0)
    losses = list(2.0 + 0.05 * rng.standard_normal(40)) + [5.0] + [2.0] * 5
    out = steps(adaptx.guard(optax.sgd(0.1), loss_z=6.0), losses)
    reasons = [int(s.last_reason) for _, s in out]
    assert reasons[40] == guard_lib.LOSS_SPIKE
    assert reasons.count(guard_lib.LOSS_SPIKE) == 1 and set(reasons) == {0, 4}
    assert float(optax.tree.norm(out[40][0])) == 0.0


def test_loss_statistics_are_nan_proof_and_winsorised():
    losses = [1.0, 1.1, 0.9, 1.0, np.nan, 1e30, 1.05, 1.0, 3.0]
    out = steps(adaptx.guard(optax.sgd(0.1), loss_z=6.0), losses)
    states = [s for _, s in out]
    # The NaN is never recorded; the 1e30 enters only as its bound.
    assert int(states[4].loss_count) == int(states[3].loss_count)
    assert float(states[4].loss_mean) == float(states[3].loss_mean)
    assert all(np.isfinite(float(s.loss_mean)) and np.isfinite(float(s.loss_var)) for s in states)
    assert float(states[5].loss_mean) < 1.2
    # The statistics still work afterwards: a later 3x jump is caught.
    assert int(states[8].last_reason) == guard_lib.LOSS_SPIKE


def test_max_consecutive_skips_lets_a_lasting_loss_rise_through():
    losses = [1.0, 1.01, 0.99, 1.0] + [10.0] * 6
    out = steps(adaptx.guard(optax.sgd(0.1), loss_z=6.0, max_consecutive_skips=2), losses)
    skipped = [int(s.last_reason) != 0 for _, s in out[4:]]
    # Two skips, then the rise is let through and taken as the new level: no more skips.
    assert skipped == [True, True, False, False, False, False]


def test_loss_z_without_value_is_an_error():
    tx = adaptx.guard(optax.sgd(0.1), loss_z=6.0)
    with pytest.raises(ValueError, match="loss_z=6.0 needs the loss.*value=loss"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize("value", [jnp.ones(3), jnp.ones((1, 1)), "loss"])
def test_a_value_that_is_not_a_scalar_is_an_error(value):
    tx = adaptx.guard(optax.sgd(0.1))
    with pytest.raises((ValueError, TypeError), match="value"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS, value=value)


def test_invalid_loss_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="`loss_z`"):
        adaptx.guard(optax.sgd(0.1), loss_z=-1.0)
    with pytest.raises(ValueError, match="`loss_alpha`"):
        adaptx.guard(optax.sgd(0.1), loss_alpha=1.0)
    adaptx.guard(optax.sgd(0.1), skip_nonfinite=False, loss_z=3.0)  # something to guard


def test_telemetry_shows_the_loss_statistics_and_the_reason():
    (_, s), *_ = steps(adaptx.guard(optax.sgd(0.1)), [0.7])
    figures = adaptx.telemetry(s)
    for key in ("loss", "loss_mean", "loss_std", "loss_z", "last_reason", "skipped"):
        assert f"guard/{key}" in figures
    np.testing.assert_allclose(float(figures["guard/loss"]), 0.7, rtol=1e-6)


@pytest.mark.parametrize("recipe", ["robust_adamw", "guard_adamw"])
def test_recipes_pass_value_to_their_guard(recipe):
    tx = adaptx.robust_adamw(1e-3) if recipe == "robust_adamw" else adaptx.guard(adaptx.adamw(1e-3))
    (_, s0), (u, s1) = steps(tx, [1.0, np.nan])
    assert float(optax.tree.norm(u)) == 0.0 and int(s1.last_reason) == guard_lib.NONFINITE_LOSS


def test_nnx_optimizer_passes_value():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaptx.robust_adamw(1e-2, loss_z=6.0), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, loss):
        grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
        optimizer.update(model, grads, value=loss)
        return adaptx.telemetry(optimizer)

    figures = step(model, optimizer, jnp.float32(jnp.nan))
    assert int(figures["guard/last_reason"]) == guard_lib.NONFINITE_LOSS
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)
