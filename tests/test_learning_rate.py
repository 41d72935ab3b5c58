"""scale_by_learning_rate: optax's numbers and count, with the learning rate it applied kept.

Every recipe ends with it, so each reports the learning rate of its last step (a schedule's
value included) under a key ending in ``learning_rate``; a step a guard skips does not
advance the schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

RECIPES = {
    "adamw": adaptx.adamw,
    "adam_atan2": adaptx.adam_atan2,
    "sgd": adaptx.sgd,
    "stable_adamw": adaptx.stable_adamw,
    "spam": adaptx.spam,
    "robust_adamw": adaptx.robust_adamw,
}
SCHEDULE = optax.linear_schedule(1e-2, 1e-3, transition_steps=10)


def run(tx, grads, params=None):
    params = jnp.ones(3) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


def grads(steps, nan_at=()):
    return [
        jnp.full(3, jnp.nan) if t in nan_at else jnp.array([0.1, -0.2, 0.3]) * (t + 1)
        for t in range(steps)
    ]


def learning_rate_figure(state):
    (key,) = [k for k in adaptx.telemetry(state) if k.endswith("learning_rate")]
    return float(adaptx.telemetry(state)[key])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_reports_a_constant_learning_rate(name):
    _, state = run(RECIPES[name](3e-3), grads(2))
    assert learning_rate_figure(state) == pytest.approx(3e-3)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_reports_the_schedules_value_at_the_last_step(name):
    # Three steps: the schedule at counts 0, 1, 2; the last one applied is SCHEDULE(2).
    _, state = run(RECIPES[name](SCHEDULE), grads(3))
    assert learning_rate_figure(state) == pytest.approx(float(SCHEDULE(2)))


@pytest.mark.parametrize("lr", [1e-2, SCHEDULE], ids=["constant", "schedule"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_numbers_as_optax(lr, dtype):
    steps = [g.astype(dtype) for g in grads(4)]
    ours, state = run(adaptx.scale_by_learning_rate(lr), steps)
    theirs, _ = run(optax.scale_by_learning_rate(lr), steps)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert int(state.count) == 4


def test_the_count_is_optax_scale_by_schedules():
    _, ours = run(adaptx.scale_by_learning_rate(SCHEDULE), grads(5))
    _, theirs = run(optax.scale_by_learning_rate(SCHEDULE), grads(5))
    assert int(ours.count) == int(theirs.count) == 5
    assert ours.count.dtype == theirs.count.dtype == jnp.int32


def test_a_skipped_step_does_not_advance_the_schedule():
    # Step 1 is skipped by robust_adamw's guard: steps 0, 2, 3 take the schedule at
    # counts 0, 1, 2, as optax's scale_by_schedule would inside the same guard.
    _, state = run(adaptx.robust_adamw(SCHEDULE), grads(3, nan_at=(1,)))
    lr_state = state.inner_state[-1]
    assert int(state.skipped) == 1
    assert int(lr_state.count) == 2
    assert learning_rate_figure(state) == pytest.approx(float(SCHEDULE(1)))
    optax_inner = adaptx.guard(optax.scale_by_learning_rate(SCHEDULE))
    _, theirs = run(optax_inner, grads(3, nan_at=(1,)))
    assert int(theirs.inner_state.count) == int(lr_state.count)


def test_on_a_skipped_step_the_figure_stays_the_last_applied():
    tx = adaptx.scale_by_learning_rate(SCHEDULE)
    _, state = run(tx, grads(2))
    updates, held = tx.update(jnp.ones(3), state, adaptx_skip=jnp.bool_(True))
    assert int(held.count) == 2 and float(held.learning_rate) == float(state.learning_rate)
    assert float(held.learning_rate) == pytest.approx(float(SCHEDULE(1)))
    np.testing.assert_array_equal(updates, jnp.zeros(3))


def test_under_inject_hyperparams_the_injected_rate_is_reported():
    tx = optax.inject_hyperparams(adaptx.adamw)(learning_rate=2e-3)
    _, state = run(tx, grads(2))
    assert learning_rate_figure(state) == pytest.approx(2e-3)


def test_a_users_optax_chain_with_it_has_the_recipes_state_structure():
    # bench/recipe_parts.py writes each recipe as optax.chain of its parts with this
    # transform last; tests/test_chain.py compares the numbers.
    from bench.recipe_parts import PARTS

    params = {"w": jnp.ones((2, 3))}
    for name, recipe in RECIPES.items():
        assert jax.tree.structure(recipe(1e-3).init(params)) == jax.tree.structure(
            PARTS[name](1e-3).init(params)
        ), name


@jax.numpy_dtype_promotion("standard")  # optax.adamw itself mixes int32 and float counts
def test_adopt_state_carries_an_optax_schedules_count():
    params = {"w": jnp.ones(3)}
    old_tx = optax.adamw(SCHEDULE)
    _, old = run(old_tx, [{"w": g} for g in grads(4)], params)
    new = adaptx.adopt_state(old, adaptx.adamw(SCHEDULE, max_norm=None), params)
    assert int(new[-1].count) == 4


def test_a_negative_learning_rate_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"scale_by_learning_rate: `learning_rate` must be >= 0"):
        adaptx.scale_by_learning_rate(-1e-3)


def test_learning_rate_is_required_and_flip_sign_a_bool():
    with pytest.raises(ValueError, match=r"`learning_rate` is required, got learning_rate=None"):
        adaptx.scale_by_learning_rate()
    with pytest.raises(ValueError, match=r"`flip_sign` must be a bool, got flip_sign=1"):
        adaptx.scale_by_learning_rate(0.1, flip_sign=1)
