"""The skip protocol: a guard's decision is a boolean array passed down as an extra argument.

Specified here: what travels (a pytree leaf, so it crosses ``jit``, ``vmap``, ``scan`` and
wrappers), who keeps the old state (an adaptx transform inside its own pass, the guard
for any other), and that ``rewind`` and ``dynamic_loss_scale(inner=)`` speak it too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._core import skip as skip_lib


def same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return False
    pairs = zip(la, lb, strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in pairs)


class Recorder:
    """A foreign inner transform: an accumulator that never looks at the decision."""

    def __init__(self):
        self.seen = []

    def tx(self):
        def init(params):
            return {"acc": jnp.zeros_like(params)}

        def update(updates, state, params=None, **extra):
            self.seen.append(extra.get(skip_lib.KEY))
            return updates, {"acc": state["acc"] + updates}

        return optax.GradientTransformationExtraArgs(init, update)


def test_the_decision_reaches_the_inner_transform_as_a_boolean_array():
    rec = Recorder()
    tx = adaptx.guard(rec.tx())
    tx.update(jnp.ones(3), tx.init(jnp.ones(3)), jnp.ones(3))
    (flag,) = rec.seen
    assert isinstance(flag, jax.Array) and flag.shape == () and flag.dtype == jnp.bool_


def test_no_decision_is_passed_outside_a_guard():
    rec = Recorder()
    tx = adaptx.chain(rec.tx())
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    assert rec.seen == [None]


def test_a_foreign_inner_state_is_selected_by_the_guard():
    # The recorder ignores the decision; the guard knows it cannot trust it (it is not
    # an adaptx.chain or an adaptx transform) and selects its state.
    tx = adaptx.guard(Recorder().tx())
    params = jnp.ones(3)
    _, state = tx.update(jnp.full(3, 2.0), tx.init(params), params)
    before = state.inner_state
    updates, state = tx.update(jnp.array([1.0, jnp.nan, 1.0]), state, params)
    assert same_bits(before, state.inner_state)
    assert same_bits(updates, jnp.zeros(3))


def test_a_foreign_member_of_an_adaptx_chain_is_selected_by_the_chain():
    tx = adaptx.guard(adaptx.chain(Recorder().tx(), adaptx.scale_by_adam()))
    params = jnp.ones(3)
    _, state = tx.update(jnp.full(3, 2.0), tx.init(params), params)
    before = state.inner_state
    _, state = tx.update(jnp.array([1.0, jnp.nan, 1.0]), state, params)
    assert same_bits(before, state.inner_state)


def test_a_wrapper_that_jits_its_inner_update_with_the_extra_args():
    # The decision is an array, so a wrapper may hand it to a jitted function.
    inner = adaptx.adamw(1e-2)

    def update(updates, state, params=None, **extra):
        return jax.jit(lambda u, s, p, e: inner.update(u, s, p, **e))(updates, state, params, extra)

    tx = adaptx.guard(optax.GradientTransformationExtraArgs(inner.init, update))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    before = state.inner_state
    updates, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params)
    assert same_bits(before, state.inner_state)
    assert same_bits(updates, {"w": jnp.zeros(3)})


def test_the_decision_crosses_vmap_one_optimizer_per_row():
    # Two independent runs in one vmap: only the row with a NaN gradient is skipped.
    tx = adaptx.robust_adamw(1e-2)
    params = jnp.ones((2, 3))
    state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(lambda g, s, p: tx.update(g, s, p)))
    _, state = step(jnp.ones((2, 3)), state, params)
    before = state
    grads = jnp.array([[1.0, 1.0, 1.0], [1.0, jnp.nan, 1.0]])
    updates, state = step(grads, state, params)
    row = lambda t, i: jax.tree.map(lambda x: x[i], t)  # noqa: E731
    assert same_bits(row(before.inner_state, 1), row(state.inner_state, 1))
    assert not same_bits(row(before.inner_state, 0), row(state.inner_state, 0))
    assert np.all(np.asarray(updates[1]) == 0) and np.all(np.asarray(updates[0]) != 0)


def test_the_decision_crosses_scan():
    tx = adaptx.robust_adamw(1e-2)
    params = jnp.ones(3)
    grads = jnp.stack([jnp.ones(3), jnp.full(3, jnp.nan), jnp.ones(3)])

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), s.skipped

    (p, state), skipped = jax.lax.scan(body, (params, tx.init(params)), grads)
    assert [int(x) for x in skipped] == [0, 1, 1]
    assert bool(jnp.all(jnp.isfinite(p)))
    assert int(state.inner_state[1].count) == 2  # Adam counted the two healthy steps only


@pytest.mark.parametrize(
    "inner",
    [
        lambda: adaptx.scale_by_adam(),
        lambda: adaptx.momentum(0.9),
        lambda: adaptx.ema(0.9),
        lambda: adaptx.scale_by_rms(),
        lambda: adaptx.scale_by_adagrad(),
        lambda: adaptx.clip_spikes(),
        lambda: adaptx.zclip(),
        lambda: adaptx.autoclip(),
        lambda: adaptx.adagc(),
        lambda: adaptx.chain(adaptx.clip_by_global_norm(1.0), adaptx.scale_by_adam()),
        lambda: adaptx.guard(adaptx.scale_by_adam()),
        lambda: adaptx.dynamic_loss_scale(inner=adaptx.scale_by_adam()),
    ],
    ids=[
        "adam",
        "momentum",
        "ema",
        "rms",
        "adagrad",
        "clip_spikes",
        "zclip",
        "autoclip",
        "adagc",
        "fused-chain",
        "guard",
        "loss-scale",
    ],
)
def test_every_stateful_adaptx_transform_honours_the_decision_itself(inner):
    # Called directly with adaptx_skip=True (no guard around it to select for it), an
    # adaptx transform returns zero updates and its state bit-identical.
    tx = inner()
    assert skip_lib.honours(tx)
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    spiky = jax.tree.map(lambda g: 50.0 * g, grads)
    updates, new = jax.jit(lambda g, s: tx.update(g, s, params, adaptx_skip=jnp.bool_(True)))(
        spiky, state
    )
    assert same_bits(state, new)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_rewind_passes_its_decision_to_adam():
    # A bad loss: rewind restores its snapshot, and Adam (told to skip) never took the step.
    tx = adaptx.rewind(adaptx.scale_by_adam(), warmup=1, snapshot_every=1)
    params = jnp.ones(3)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jnp.ones(3), state, params, value=1.0)
    updates, state = tx.update(jnp.ones(3), state, params, value=jnp.nan)
    assert int(state.rewinds) == 1
    assert int(state.inner_state.count) == int(state.good_inner.count)


def test_a_decision_that_is_not_a_boolean_scalar_is_refused():
    tx = adaptx.scale_by_adam()
    state = tx.init(jnp.ones(3))
    with pytest.raises(TypeError, match="adaptx_skip= must be a boolean scalar"):
        tx.update(jnp.ones(3), state, adaptx_skip=jnp.ones(3))
