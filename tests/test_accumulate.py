"""accumulate: optax.MultiSteps' contract, with non-finite micro-batches dropped from the mean.

Specified here: with every micro-batch finite it is ``optax.MultiSteps``; a non-finite
micro-batch (gradients or loss) is left out of the window's mean; a window with no finite
micro-batch is a skipped step (the inner state bit-identical); the state says how many
were dropped; and it works under ``jit``, inside a guard, around a recipe and in
``flax.nnx.Optimizer``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptx
from adaptx._core import skip as skip_lib

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.full(3, 0.5)}


def micro_grads(steps, nan_at=(), dtype=jnp.float32):
    out = []
    for t in range(steps):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(0), t))
        g = {"w": jax.random.normal(k1, (2, 3)), "b": jax.random.normal(k2, (3,))}
        if t in nan_at:
            g["w"] = g["w"].at[1, 2].set(jnp.nan)
        out.append(jax.tree.map(lambda x: x.astype(dtype), g))
    return out


def run(tx, grads, losses=None, params=PARAMS):
    """Jitted micro-steps, the updates applied each time (zeros between windows)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for t, g in enumerate(grads):
        extra = {} if losses is None else {"value": losses[t]}
        u, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


def mean(trees):
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / len(xs), *trees)


def same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    pairs = zip(la, lb, strict=True)
    return len(la) == len(lb) and all(np.array_equal(x, y, equal_nan=True) for x, y in pairs)


def assert_close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


INNERS = {
    "adaptx.adamw": lambda: adaptx.adamw(1e-2, weight_decay=1e-2),
    "optax.sgd": lambda: optax.sgd(0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(INNERS))
@jax.numpy_dtype_promotion("standard")  # optax.MultiSteps itself divides by an int32 count
def test_with_every_micro_batch_finite_it_is_optax_multisteps(name):
    grads = micro_grads(9)
    ours, s_ours, p_ours = run(adaptx.accumulate(INNERS[name](), 3), grads)
    theirs, s_theirs, p_theirs = run(optax.MultiSteps(INNERS[name](), every_k_schedule=3), grads)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(a, b)
        if t % 3 != 2:  # between windows: zero updates
            assert all(not jnp.any(x) for x in jax.tree.leaves(a))
    assert_close(s_ours.inner_state, s_theirs.inner_opt_state)
    assert_close(p_ours, p_theirs)
    assert int(s_ours.dropped) == 0


def test_one_nan_micro_batch_gives_the_inner_update_of_the_other_threes_mean():
    grads = micro_grads(4, nan_at=(2,))
    outs, state, _ = run(adaptx.accumulate(adaptx.adamw(1e-2), 4), grads)
    inner = adaptx.adamw(1e-2)
    want, want_state = inner.update(
        mean([grads[0], grads[1], grads[3]]), inner.init(PARAMS), PARAMS
    )
    assert_close(outs[-1], want)
    assert_close(state.inner_state, want_state)
    # Without dropping, the NaN would be in every update (optax.MultiSteps' behaviour).
    kept, _, _ = run(adaptx.accumulate(adaptx.adamw(1e-2), 4, skip_nonfinite=False), grads)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(kept[-1]))


def test_a_micro_batch_with_a_nonfinite_loss_is_dropped_too():
    grads = micro_grads(4)
    losses = [jnp.float32(1.0), jnp.float32(jnp.inf), jnp.float32(2.0), jnp.float32(3.0)]
    outs, state, _ = run(adaptx.accumulate(optax.sgd(0.1), 4), grads, losses)
    want = jax.tree.map(lambda g: -0.1 * g, mean([grads[0], grads[2], grads[3]]))
    assert_close(outs[-1], want)
    assert int(state.dropped) == 1


@pytest.mark.parametrize("name", sorted(INNERS))
def test_a_window_of_only_bad_micro_batches_is_skipped(name):
    # Window 1 is healthy; window 2 has two NaN micro-batches: zero updates, and the inner
    # state (an adaptx transform's, held by itself; optax's, selected) bit-identical.
    grads = micro_grads(4, nan_at=(2, 3))
    tx = adaptx.accumulate(INNERS[name](), 2)
    outs, state, _ = run(tx, grads)
    _, after_first, _ = run(tx, grads[:2])
    assert same_bits(after_first.inner_state, state.inner_state)
    assert all(not jnp.any(x) for x in jax.tree.leaves(outs[-1]))
    assert int(state.window_finite) == 0 and int(state.window_dropped) == 2


def test_telemetry_counts_the_dropped_micro_batches():
    tx = adaptx.accumulate(adaptx.adamw(1e-2), 3)
    figures = []
    state = tx.init(PARAMS)
    for g in micro_grads(6, nan_at=(1, 4, 5)):
        _, state = jax.jit(tx.update)(g, state, PARAMS)
        f = adaptx.telemetry(state)
        figures.append({k.split("/")[1]: int(v) for k, v in f.items() if k.startswith("acc")})
    assert [f["micro_step"] for f in figures] == [1, 2, 0, 1, 2, 0]
    assert [f["window_dropped"] for f in figures] == [0, 1, 1, 0, 1, 2]
    assert [f["window_finite"] for f in figures] == [1, 1, 2, 1, 1, 1]
    assert [f["dropped"] for f in figures] == [0, 1, 1, 1, 2, 3]
    assert "clip_by_global_norm/grad_norm" in adaptx.telemetry(state)  # the inner's figures


def test_the_sum_is_float32_for_bfloat16_gradients_and_updates_keep_their_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    grads = micro_grads(2, dtype=jnp.bfloat16)
    outs, state, _ = run(adaptx.accumulate(optax.sgd(0.1), 2), grads, params=params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.grad_sum))
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(outs[-1]))


def test_inside_a_guard_a_skipped_micro_batch_leaves_the_window_as_it_was():
    # The guard skips the NaN micro-batch before accumulate sees it: nothing is counted,
    # and the window is completed by the next micro-batch.
    grads = micro_grads(5, nan_at=(1,))
    outs, state, _ = run(adaptx.guard(adaptx.accumulate(adaptx.adamw(1e-2), 2)), grads)
    acc = state.inner_state
    assert int(state.skipped) == 1 and int(acc.dropped) == 0 and int(acc.micro_step) == 0
    healthy = [grads[0], grads[2], grads[3], grads[4]]
    alone, alone_state, _ = run(adaptx.accumulate(adaptx.adamw(1e-2), 2), healthy)
    assert_close([outs[0], outs[2], outs[3], outs[4]], alone)
    assert_close(acc, alone_state)


def test_an_outer_skip_leaves_the_whole_state_bit_identical():
    for make in INNERS.values():
        tx = adaptx.accumulate(make(), 2)
        _, state, _ = run(tx, micro_grads(3))  # mid-window, with a sum and a count
        assert skip_lib.honours(tx)
        g = micro_grads(4)[3]
        skipped = jax.jit(lambda g, s, tx=tx: tx.update(g, s, PARAMS, adaptx_skip=jnp.bool_(True)))
        updates, new = skipped(g, state)
        assert same_bits(state, new)
        assert all(not jnp.any(x) for x in jax.tree.leaves(updates))


def test_around_a_recipe_the_guard_sees_the_windows_mean_gradient_and_loss():
    grads = micro_grads(4, nan_at=(1,))
    losses = [jnp.float32(x) for x in (1.0, jnp.nan, 2.0, 4.0)]
    outs, state, _ = run(adaptx.accumulate(adaptx.robust_adamw(1e-3), 4), grads, losses)
    figures = adaptx.telemetry(state)
    assert int(figures["accumulate/dropped"]) == 1
    assert int(figures["guard/skipped"]) == 0  # not the NaN loss of micro-batch 1
    assert float(figures["guard/loss"]) == pytest.approx(7.0 / 3.0)
    inner = adaptx.robust_adamw(1e-3)
    g = mean([grads[0], grads[2], grads[3]])
    want, _ = inner.update(g, inner.init(PARAMS), PARAMS, value=jnp.float32(7.0 / 3.0))
    assert_close(outs[-1], want)


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def test_inside_nnx_optimizer():
    model = _Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaptx.accumulate(adaptx.adamw(1e-2), 2), wrt=nnx.Param)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

    @nnx.jit
    def step(model, optimizer, poison):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        grads = jax.tree.map(lambda g: g * poison, grads)
        optimizer.update(model, grads)
        return adaptx.telemetry(optimizer)

    kernel = lambda: jnp.array(model.linear.kernel[...])  # noqa: E731
    before = kernel()
    step(model, optimizer, jnp.float32(1.0))
    assert bool(jnp.all(kernel() == before))  # mid-window: no update
    figures = step(model, optimizer, jnp.float32(jnp.nan))
    assert int(figures["accumulate/dropped"]) == 1
    assert bool(jnp.all(jnp.isfinite(kernel()))) and bool(jnp.any(kernel() != before))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_every_k_steps_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"accumulate: `every_k_steps` must be .*={bad!r}"):
        adaptx.accumulate(adaptx.adamw(1e-3), bad)


def test_inner_must_be_a_transformation():
    with pytest.raises(ValueError, match="accumulate: `inner` must be an optax"):
        adaptx.accumulate(1e-3, 4)
