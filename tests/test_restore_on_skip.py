"""``adaptx.restore_on_skip``: a skipped step leaves BatchNorm's statistics as they were.

The guard keeps a NaN batch out of the parameters and the optimizer state; the forward
pass has already written the NaN batch's mean and variance into ``nnx.BatchStat``
variables by then. These tests show the damage without the context manager and its
absence with it, inside ``nnx.jit`` and outside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

import adaptx  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.norm(self.conv(x)))
        return self.head(self.drop(jnp.mean(h, axis=(1, 2))))[:, 0]


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def guarded_step(model, optimizer, x, y):
    with adaptx.restore_on_skip(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, value=loss)
    return loss


def unguarded_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value=loss)
    return loss


def batch(seed=0, nan=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 6, 6, 1)).astype(np.float32)
    if nan:
        x[3, 2, 2, 0] = np.nan
    return jnp.asarray(x), jnp.asarray(rng.standard_normal(8).astype(np.float32))


def non_params(model):
    return {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
        if not jnp.issubdtype(jnp.asarray(v).dtype, jax.dtypes.prng_key)
    }


def evaluate(model, x):
    model.eval()
    out = np.asarray(model(x))
    model.train()
    return out


def setup():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaptx.robust_adamw(1e-2), wrt=nnx.Param)
    return model, optimizer


@pytest.mark.parametrize("jit", [True, False], ids=["nnx.jit", "eager"])
def test_a_skipped_step_leaves_batch_statistics_bit_identical(jit):
    step = nnx.jit(guarded_step) if jit else guarded_step
    model, optimizer = setup()
    x_eval, _ = batch(seed=9)
    step(model, optimizer, *batch(seed=1))
    before, out_before = non_params(model), evaluate(model, x_eval)
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    step(model, optimizer, *batch(seed=2, nan=True))

    assert int(adaptx.telemetry(optimizer)["guard/last_reason"]) == 1
    after = non_params(model)
    assert set(after) == set(before) and any("mean" in k for k in before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    np.testing.assert_array_equal(evaluate(model, x_eval), out_before)
    assert np.isfinite(out_before).all()
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)

    step(model, optimizer, *batch(seed=3))  # a healthy step does update them
    assert int(adaptx.telemetry(optimizer)["guard/last_reason"]) == 0
    assert not np.array_equal(non_params(model)["norm/mean"], before["norm/mean"])
    assert not np.array_equal(non_params(model)["drop/rngs/count"], before["drop/rngs/count"])


def test_without_it_the_skipped_batch_poisons_the_statistics():
    """What the context manager is for: the guard alone leaves NaN in the running mean."""
    model, optimizer = setup()
    step = nnx.jit(unguarded_step)
    step(model, optimizer, *batch(seed=1))
    step(model, optimizer, *batch(seed=2, nan=True))
    assert int(adaptx.telemetry(optimizer)["guard/skipped"]) == 1
    assert np.isnan(non_params(model)["norm/mean"]).any()
    assert np.isnan(evaluate(model, batch(seed=9)[0])).all()


def test_a_healthy_step_matches_the_step_without_it():
    """The statistics of a step that is not skipped are the forward pass's own."""
    guarded, opt_a = setup()
    plain, opt_b = setup()
    for seed in range(3):
        nnx.jit(guarded_step)(guarded, opt_a, *batch(seed))
        nnx.jit(unguarded_step)(plain, opt_b, *batch(seed))
    # Two programs: XLA may fuse them differently, so equal to rounding.
    a, b = non_params(guarded), non_params(plain)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for p, q in zip(
        jax.tree.leaves(nnx.state(guarded, nnx.Param)),
        jax.tree.leaves(nnx.state(plain, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-7)


def test_an_optimizer_without_a_guard_is_refused_at_entry():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="holds no adaptx.guard") as info:
        with adaptx.restore_on_skip(model, optimizer):
            raise AssertionError("the block must not run")
    assert "adaptx.guard(tx)" in str(info.value)


def test_the_update_must_happen_inside_the_block():
    model, optimizer = setup()
    x, y = batch()
    with pytest.raises(ValueError, match="Call optimizer.update"):
        with adaptx.restore_on_skip(model, optimizer):
            nnx.value_and_grad(loss_fn)(model, x, y)


def test_nested_guards_skip_if_any_guard_skipped():
    model = Net(nnx.Rngs(0))
    tx = adaptx.guard(adaptx.robust_adamw(1e-2), spike_z=6.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(guarded_step)
    step(model, optimizer, *batch(seed=1))
    before = non_params(model)
    step(model, optimizer, *batch(seed=2, nan=True))
    np.testing.assert_array_equal(non_params(model)["norm/var"], before["norm/var"])
