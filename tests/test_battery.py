"""One battery over every public transform.

Each case must: run under jit with the same result as eager; keep its state finite
and its state dtypes fixed; return updates in the gradient's dtype (f32, bf16,
f16); not recompile on the second call; pass ``None`` leaves through; work inside
``optax.chain``, ``optax.masked``, ``optax.inject_hyperparams``,
``optax.MultiSteps`` and ``flax.nnx.Optimizer``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptx

# name -> (factory, kwargs). kwargs must be floats so inject_hyperparams can trace them.
CASES = {
    "clip_by_global_norm": (adaptx.clip_by_global_norm, {"max_norm": 0.5}),
    "clip_by_value": (adaptx.clip_by_value, {"max_abs": 0.05}),
    "clip_by_block_rms": (adaptx.clip_by_block_rms, {"threshold": 0.05}),
    "adaptive_grad_clip": (adaptx.adaptive_grad_clip, {"clipping": 0.05}),
    "scale_by_adam": (adaptx.scale_by_adam, {"b1": 0.8, "b2": 0.95}),
    "scale_by_adam_nesterov": (
        functools.partial(adaptx.scale_by_adam, nesterov=True),
        {"b1": 0.8},
    ),
    "scale_by_rms": (adaptx.scale_by_rms, {"decay": 0.8}),
    "scale_by_adagrad": (adaptx.scale_by_adagrad, {"eps": 1e-6}),
    "momentum": (adaptx.momentum, {"decay": 0.8}),
    "momentum_nesterov": (functools.partial(adaptx.momentum, nesterov=True), {"decay": 0.8}),
    "ema": (adaptx.ema, {"decay": 0.8}),
    "adamw": (adaptx.adamw, {"learning_rate": 1e-2, "weight_decay": 1e-2}),
    # Leaves of <= 8 elements (the biases and scales below) share flat moment buffers.
    "adamw_packed": (
        functools.partial(adaptx.adamw, pack_small_leaves=8),
        {"learning_rate": 1e-2, "weight_decay": 1e-2},
    ),
    "robust_adamw_packed": (
        functools.partial(adaptx.robust_adamw, pack_small_leaves=8),
        {"learning_rate": 1e-2},
    ),
    "scale_by_adam_spam_packed": (
        functools.partial(
            adaptx.scale_by_adam, spike_threshold=2.0, spike_start=1, pack_small_leaves=8
        ),
        {"b1": 0.8},
    ),
    "scale_by_adam_atan2": (adaptx.scale_by_adam_atan2, {"b1": 0.8, "a": 1.5}),
    "adam_atan2": (adaptx.adam_atan2, {"learning_rate": 1e-2, "weight_decay": 1e-2}),
    "adam_atan2_packed": (
        functools.partial(adaptx.adam_atan2, pack_small_leaves=8),
        {"learning_rate": 1e-2},
    ),
    "sgd": (adaptx.sgd, {"learning_rate": 1e-2, "momentum": 0.5}),
    "clip_spikes": (adaptx.clip_spikes, {"z_thresh": 3.0, "min_ratio": 2.0}),
}

CASES |= {
    "autoclip": (adaptx.autoclip, {"percentile": 50.0}),
    "zclip": (adaptx.zclip, {"alpha": 0.9}),
    "adagc": (adaptx.adagc, {"beta": 0.9}),
    "stable_adamw": (adaptx.stable_adamw, {"learning_rate": 1e-2}),
    "spam": (adaptx.spam, {"learning_rate": 1e-2}),
    "robust_adamw": (adaptx.robust_adamw, {"learning_rate": 1e-2}),
    "dynamic_loss_scale": (adaptx.dynamic_loss_scale, {"init_scale": 8.0}),
    "guard": (lambda: adaptx.guard(adaptx.adamw(1e-2)), {}),
    # Per-tensor telemetry: one figure per leaf, with its path, in the state.
    "robust_adamw_per_tensor": (
        functools.partial(adaptx.robust_adamw, per_tensor=True),
        {"learning_rate": 1e-2},
    ),
    "adagc_per_tensor": (functools.partial(adaptx.adagc, per_tensor=True), {"beta": 0.9}),
    "zclip_per_tensor": (functools.partial(adaptx.zclip, per_tensor=True), {"alpha": 0.9}),
}


def make(name, **overrides):
    factory, kw = CASES[name]
    return factory(**{**kw, **overrides})


def params_tree(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (4, 3)).astype(dtype),
            "bias": jnp.zeros((3,), dtype),
        },
        "conv": jax.random.normal(k2, (2, 2, 3, 2)).astype(dtype),
        "scale": (1.0 + 0.1 * jax.random.normal(k3, (5,))).astype(dtype),
    }


def grads_like(params, step, magnitude=1.0):
    key = jax.random.fold_in(jax.random.key(1), step)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        (magnitude * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def run(tx, params, steps=4, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t in range(steps):
        u, state = update(grads_like(params, t), state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


def dtypes_of(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


names = pytest.mark.parametrize("name", sorted(CASES))


@names
def test_jit_matches_eager(name):
    eager, s_eager, _ = run(make(name), params_tree(), jit=False)
    jitted, s_jit, _ = run(make(name), params_tree(), jit=True)
    for a, b in zip(eager, jitted, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@names
def test_state_stays_finite_and_updates_move(name):
    outs, state, _ = run(make(name), params_tree(), steps=6)
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(outs[-1]))


@names
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_kept(name, dtype):
    params = params_tree(dtype)
    tx = make(name)
    state0 = tx.init(params)
    outs, state, new_params = run(tx, params, steps=3)
    assert dtypes_of(outs[-1]) == dtypes_of(params)
    assert dtypes_of(new_params) == dtypes_of(params)
    assert dtypes_of(state) == dtypes_of(state0)


@names
def test_no_recompile_on_second_call(name):
    tx = make(name)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    params = params_tree()
    state = tx.init(params)
    for t in range(3):
        _, state = step(grads_like(params, t), state, params)
    assert len(traces) == 1


@names
def test_none_leaves_pass_through(name):
    params = {"a": jnp.ones((3, 2)), "frozen": None, "b": jnp.full((2,), 0.5)}
    tx = make(name)
    state = tx.init(params)
    grads = {"a": jnp.full((3, 2), 0.3), "frozen": None, "b": jnp.full((2,), -0.2)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["frozen"] is None
    assert updates["a"].shape == (3, 2)


@names
def test_inside_chain_equals_alone(name):
    alone, _, _ = run(make(name), params_tree())
    chained, _, _ = run(optax.chain(optax.identity(), make(name), optax.identity()), params_tree())
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), alone, chained)


@names
def test_masked_applies_only_where_mask_is_true(name):
    params = params_tree()
    mask = {"dense": {"kernel": True, "bias": False}, "conv": True, "scale": False}
    tx = optax.masked(make(name), mask)
    state = tx.init(params)
    grads = grads_like(params, 0)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])
    np.testing.assert_array_equal(updates["scale"], grads["scale"])


@names
def test_inject_hyperparams_matches_direct(name):
    factory, kw = CASES[name]
    if not kw:
        pytest.skip("no float hyperparameters")
    direct, _, _ = run(make(name), params_tree())
    # pack_small_leaves sizes buffers: it must stay a Python int, not an injected array.
    static = ("pack_small_leaves",) if "packed" in name else ()
    injected, state, _ = run(
        optax.inject_hyperparams(factory, static_args=static)(**kw), params_tree()
    )
    for a, b in zip(direct, injected, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), a, b)
    assert set(kw) <= set(state.hyperparams)


@names
@jax.numpy_dtype_promotion("standard")  # optax.MultiSteps itself divides by an int32 count
def test_inside_multisteps(name):
    tx = optax.MultiSteps(make(name), every_k_schedule=2)
    params = params_tree()
    state = tx.init(params)
    update = jax.jit(tx.update)
    u0, state = update(grads_like(params, 0), state, params)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u0))
    u1, state = update(grads_like(params, 1), state, params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u1))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.out = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.linear(x)))


@names
def test_inside_nnx_optimizer(name):
    model = _Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make(name), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(2), (8, 4))
    y = jnp.ones((8, 1))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss, adaptx.telemetry(optimizer)

    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    for _ in range(3):
        loss, figures = train_step(model, optimizer)
    assert np.isfinite(float(loss))
    after = nnx.state(model, nnx.Param)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert any(jax.tree.leaves(moved))
    assert all(v.shape == () for v in figures.values())


@names
def test_fresh_state_can_be_donated(name):
    # Every state array is its own buffer: jit(..., donate_argnums) accepts a fresh state
    # (as nnx.Optimizer train steps with donation do on their first call).
    state = make(name).init(params_tree())
    ids = [id(x) for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))
    out = jax.jit(lambda s: s, donate_argnums=0)(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
