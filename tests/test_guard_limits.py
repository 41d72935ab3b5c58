"""The guard's fixed limits, its divergence verdict, and the loss passed as ``loss=``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._guards.guard import GRAD_NORM_LIMIT, LOSS_LIMIT, NONFINITE, OK


def step(tx, state, grads, **extra):
    params = jnp.ones(2)
    return tx.update(grads, state, params, **extra)


def test_a_norm_above_max_grad_norm_is_skipped():
    tx = adaptx.guard(optax.sgd(0.1), max_grad_norm=10.0)
    state = tx.init(jnp.ones(2))
    u, state = step(tx, state, jnp.array([3.0, 4.0]))  # norm 5: applied
    assert int(state.last_reason) == OK and float(jnp.abs(u).sum()) > 0
    before = state.inner_state
    u, state = step(tx, state, jnp.array([30.0, 40.0]))  # norm 50: skipped
    assert int(state.last_reason) == GRAD_NORM_LIMIT and int(state.skipped) == 1
    assert bool(jnp.all(u == 0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, state.inner_state))


@pytest.mark.parametrize("keyword", ["value", "loss"])
def test_a_loss_above_max_loss_is_skipped(keyword):
    tx = adaptx.guard(optax.sgd(0.1), max_loss=5.0)
    state = tx.init(jnp.ones(2))
    _, state = step(tx, state, jnp.ones(2), **{keyword: jnp.float32(4.0)})
    assert int(state.last_reason) == OK
    u, state = step(tx, state, jnp.ones(2), **{keyword: jnp.float32(6.0)})
    assert int(state.last_reason) == LOSS_LIMIT and bool(jnp.all(u == 0))


def test_max_loss_needs_the_loss():
    tx = adaptx.guard(optax.sgd(0.1), max_loss=5.0)
    with pytest.raises(ValueError, match="max_loss=5.0 needs the loss"):
        step(tx, tx.init(jnp.ones(2)), jnp.ones(2))


def test_the_loss_given_twice_must_agree():
    tx = adaptx.robust_adamw(1e-3)
    state = tx.init(jnp.ones(2))
    _, state = step(tx, state, jnp.ones(2), value=2.0, loss=2.0)  # the same: accepted
    assert float(state.loss) == 2.0
    with pytest.raises(ValueError, match="loss was passed twice with different values"):
        step(tx, state, jnp.ones(2), value=2.0, loss=3.0)


def test_the_loss_passed_as_loss_in_a_jitted_recipe_is_read():
    tx = adaptx.robust_adamw(1e-3)
    state = tx.init(jnp.ones(2))
    f = jax.jit(lambda s, loss: step(tx, s, jnp.ones(2), loss=loss))
    _, state = f(state, jnp.float32(jnp.nan))
    assert int(state.last_reason) == 3  # a non-finite loss


def test_divergence_is_marked_after_the_limit_and_stays():
    tx = adaptx.guard(optax.sgd(0.1), max_consecutive_nonfinite=2)
    state = tx.init(jnp.ones(2))
    nan = jnp.array([jnp.nan, 1.0])
    history = []
    for g in (nan, jnp.ones(2), nan, nan, jnp.ones(2)):
        _, state = step(tx, state, g)
        history.append((int(state.consecutive_nonfinite), int(state.diverged)))
    assert history == [(1, 0), (0, 0), (1, 0), (2, 1), (0, 1)]
    assert int(state.steps) == 5
    assert int(state.last_reason) == OK  # the healthy step is applied; the verdict stays


def test_limits_are_reported_like_other_reasons():
    tx = adaptx.guard(optax.sgd(0.1), max_grad_norm=1.0)
    state = tx.init(jnp.ones(2))
    _, state = step(tx, state, jnp.array([3.0, 4.0]))
    figures = adaptx.telemetry(state)
    assert int(figures["guard/last_reason"]) == GRAD_NORM_LIMIT
    assert int(figures["guard/skipped"]) == 1
    _, state = step(tx, state, jnp.array([jnp.inf, 0.0]))
    assert int(adaptx.telemetry(state)["guard/last_reason"]) == NONFINITE


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": "big"}, "max_grad_norm"),
        ({"max_loss": float("nan")}, "max_loss"),
        ({"max_consecutive_nonfinite": 0}, "max_consecutive_nonfinite"),
        ({"max_consecutive_nonfinite": 2.5}, "max_consecutive_nonfinite"),
    ],
)
def test_bad_limits_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"guard: `{name}`"):
        adaptx.guard(optax.sgd(0.1), **kwargs)


def test_a_fixed_limit_alone_is_something_to_guard_against():
    tx = adaptx.guard(optax.sgd(0.1), skip_nonfinite=False, max_grad_norm=1.0)
    _, state = step(tx, tx.init(jnp.ones(2)), jnp.array([np.nan, 0.0]))
    assert int(state.skipped) == 0  # non-finite steps are not its business here
