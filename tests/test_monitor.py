"""monitor: the parameter norm, the update norm and their ratio, kept in the state.

Specified here: the figures are the norms of the parameters passed and of the updates the
inner transform returned (globally and, with ``per_tensor``, per leaf under the keys
``monitor/tensor_*/<param path>``); the updates pass through untouched; ``params`` is
required; a guard's skip leaves the figures as they were; ``adaptx.check`` reads the
parameter norm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptx
from adaptx._core import skip as skip_lib

PARAMS = {
    "encoder": {"kernel": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), "bias": jnp.zeros(4)},
    "head": jnp.array([0.5, -1.5]),
}
PATHS = ["encoder/bias", "encoder/kernel", "head"]  # tree order


def grads(step):
    key = jax.random.fold_in(jax.random.key(0), step)
    leaves, treedef = jax.tree.flatten(PARAMS)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def norm(tree):
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def run(tx, steps=3, params=PARAMS, nan_at=()):
    """Jitted steps; returns the params and updates of the last step, and the state."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        g = grads(t)
        if t in nan_at:
            g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g)
        last_params = params
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return last_params, updates, state


def test_the_figures_are_the_norms_of_the_params_and_of_the_inner_update():
    params, updates, state = run(adaptx.monitor(adaptx.adamw(1e-2)))
    figures = adaptx.telemetry(state)
    assert float(figures["monitor/param_norm"]) == pytest.approx(norm(params), rel=1e-6)
    assert float(figures["monitor/update_norm"]) == pytest.approx(norm(updates), rel=1e-6)
    ratio = norm(updates) / norm(params)
    assert float(figures["monitor/update_ratio"]) == pytest.approx(ratio, rel=1e-5)
    assert "clip_by_global_norm/grad_norm" in figures  # the inner's own figures


def test_the_updates_are_the_inner_transforms():
    _, ours, s_ours = run(adaptx.monitor(adaptx.adamw(1e-2)))
    _, theirs, s_theirs = run(adaptx.adamw(1e-2))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(s_ours.inner_state), jax.tree.leaves(s_theirs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_per_tensor_figures_are_named_by_the_param_path():
    params, updates, state = run(adaptx.monitor(optax.sgd(0.1), per_tensor=True))
    figures = adaptx.telemetry(state, per_tensor=True)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True)
    leaves = dict(zip(PATHS, pairs, strict=True))
    for path, (p, u) in leaves.items():
        assert float(figures[f"monitor/tensor_param_norm/{path}"]) == pytest.approx(norm(p))
        assert float(figures[f"monitor/tensor_update_norm/{path}"]) == pytest.approx(norm(u))
        want = norm(u) / norm(p) if norm(p) > 0 else 0.0
        assert float(figures[f"monitor/tensor_update_ratio/{path}"]) == pytest.approx(want)
    assert [k for k in figures if "/tensor_param_norm/" in k] == [
        f"monitor/tensor_param_norm/{p}" for p in PATHS
    ]
    plain = adaptx.telemetry(run(adaptx.monitor(optax.sgd(0.1)))[2])
    for key, value in plain.items():
        np.testing.assert_allclose(figures[key], value, rtol=1e-6)
    assert not any("tensor" in k for k in adaptx.telemetry(state))


def test_the_ratio_of_an_all_zero_parameter_is_zero():
    tx = adaptx.monitor(optax.sgd(0.1), per_tensor=True)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    _, state = tx.update(grads(0), tx.init(zeros), zeros)
    figures = adaptx.telemetry(state, per_tensor=True)
    assert float(figures["monitor/update_ratio"]) == 0.0
    assert float(figures["monitor/tensor_update_ratio/head"]) == 0.0
    assert float(figures["monitor/update_norm"]) > 0


def test_update_needs_params():
    tx = adaptx.monitor(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"monitor: this transformation needs the current param"):
        tx.update(grads(0), tx.init(PARAMS))


def test_a_skipped_step_leaves_the_figures_and_the_inner_state_as_they_were():
    for inner in (adaptx.adamw(1e-2), optax.sgd(0.1, momentum=0.9)):
        tx = adaptx.monitor(inner, per_tensor=True)
        assert skip_lib.honours(tx)
        params, _, state = run(tx, steps=2)
        skipped = jax.jit(tx.update)
        updates, new = skipped(grads(5), state, params, adaptx_skip=jnp.bool_(True))
        same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, new)
        assert all(jax.tree.leaves(same))
        assert all(not jnp.any(u) for u in jax.tree.leaves(updates))


def test_inside_a_guard_the_figures_describe_the_last_step_taken():
    guarded = adaptx.guard(adaptx.monitor(adaptx.adamw(1e-2)))
    _, _, state = run(guarded, steps=3, nan_at=(2,))
    _, _, taken = run(adaptx.monitor(adaptx.adamw(1e-2)), steps=2)
    figures, want = adaptx.telemetry(state), adaptx.telemetry(taken)
    assert int(figures["guard/skipped"]) == 1
    for key in ("monitor/param_norm", "monitor/update_norm", "monitor/update_ratio"):
        np.testing.assert_allclose(figures[key], want[key], rtol=1e-6)


def test_adaptx_check_raises_on_a_nonfinite_parameter_norm():
    tx = adaptx.monitor(optax.sgd(0.1), per_tensor=True)
    bad = {**PARAMS, "head": jnp.array([jnp.inf, 0.0])}
    _, state = tx.update(grads(0), tx.init(bad), bad)
    with pytest.raises(adaptx.DivergedError, match="head"):
        adaptx.check(jax.device_get(adaptx.telemetry(state, per_tensor=True)))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def test_inside_nnx_optimizer():
    model = _Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, adaptx.monitor(adaptx.adamw(1e-2), per_tensor=True), wrt=nnx.Param
    )
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return adaptx.telemetry(optimizer, per_tensor=True)

    kernel = np.asarray(model.linear.kernel[...])
    figures = step(model, optimizer)
    assert float(figures["monitor/tensor_param_norm/linear/kernel"]) == pytest.approx(norm(kernel))
    assert float(figures["monitor/update_ratio"]) > 0


def test_inner_and_per_tensor_are_checked():
    with pytest.raises(ValueError, match="monitor: `inner` must be an optax"):
        adaptx.monitor(0.1)
    with pytest.raises(ValueError, match="monitor: `per_tensor` must be a bool, got per_tensor=1"):
        adaptx.monitor(optax.sgd(0.1), per_tensor=1)


@pytest.mark.perf
def test_per_tensor_figures_cost_no_extra_pass():
    # The global norms are the sums of the per-leaf ones: the compiled step touches
    # full-size arrays exactly as often with the per-leaf figures as without.
    from bench.stability.probes import full_size_passes

    plain = full_size_passes(adaptx.monitor(adaptx.adamw(1e-3)), n=1 << 18)
    per_tensor = full_size_passes(adaptx.monitor(adaptx.adamw(1e-3), per_tensor=True), n=1 << 18)
    assert per_tensor == plain
