"""One battery over every public transform.

Each case must: run under jit with the same result as eager; keep its state finite
and its state dtypes fixed; return updates in the gradient's dtype (f32, bf16,
f16); not recompile on the second call; pass ``None`` leaves through; work inside
``optax.inject_hyperparams`` and ``flax.nnx.Optimizer``. Inside ``optax.chain``,
``optax.masked`` and ``optax.MultiSteps`` the checks are on what adaptx owns, not on what
optax guarantees by itself: the extra arguments reach it, it keeps state only for the
masked-in leaves, its state advances once per accumulated step, and ``adaptx.telemetry``
reads the same figures through each wrapper as from the transform alone.
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
    "scale_by_learning_rate": (adaptx.scale_by_learning_rate, {"learning_rate": 1e-2}),
    "monitor": (lambda: adaptx.monitor(adaptx.adamw(1e-2)), {}),
    "accumulate": (lambda: adaptx.accumulate(adaptx.adamw(1e-2), 2), {}),
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
    return run_on(tx, params, [grads_like(params, t) for t in range(steps)], jit=jit)


def run_on(tx, params, grads, losses=None, jit=True):
    """Steps ``tx`` through ``grads``, passing ``losses`` (when given) the optax way, as
    ``value=``, which the guards read."""
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t, g in enumerate(grads):
        extra = {} if losses is None else {"value": losses[t]}
        u, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


def losses_for(steps):
    return [jnp.float32(1.0 + 0.1 * t) for t in range(steps)]


def assert_same_leaves(a, b):
    """Two states hold the same arrays, in the same order (their trees may differ)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert [(x.shape, x.dtype) for x in a] == [(y.shape, y.dtype) for y in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), 1e-5, 1e-7)


def assert_same_telemetry(a, b):
    """``adaptx.telemetry`` reads the same figures, under the same keys, from both states."""
    fa, fb = adaptx.telemetry(a, per_tensor=True), adaptx.telemetry(b, per_tensor=True)
    assert list(fa) == list(fb)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-5, atol=1e-7, err_msg=k)


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
def test_inside_chain_gets_the_loss_and_reports_as_alone(name):
    # optax.chain hands extra arguments (the guards' value=loss) only to members that are
    # GradientTransformationExtraArgs; adaptx's state must come through unchanged and
    # telemetry must find it, under the same keys as alone.
    assert isinstance(make(name), optax.GradientTransformationExtraArgs)
    params, losses = params_tree(), losses_for(4)
    grads = [grads_like(params, t) for t in range(4)]
    alone_out, alone, _ = run_on(make(name), params, grads, losses)
    chain = optax.chain(optax.identity(), make(name), optax.identity())
    chained_out, chained, _ = run_on(chain, params, grads, losses)
    jax.tree.map(np.testing.assert_array_equal, alone_out, chained_out)
    jax.tree.map(np.testing.assert_array_equal, alone, chained[1])
    assert_same_telemetry(alone, chained)


@names
def test_inside_masked_only_the_masked_in_leaves_have_state(name):
    # optax.masked gives the inner transform optax.MaskedNode for masked-out leaves: adaptx
    # must allocate no state for them (nor pack them), leave them out of its norms and
    # statistics, and name only the masked-in leaves in its per-tensor figures. The small
    # leaves: "bias" (3 elements) is masked in, "scale" (5) out.
    params, losses = params_tree(), losses_for(4)
    mask = {"dense": {"kernel": True, "bias": True}, "conv": True, "scale": False}

    def masked_in(tree):
        return {"dense": tree["dense"], "conv": tree["conv"]}

    grads = [grads_like(params, t) for t in range(4)]
    _, masked, _ = run_on(optax.masked(make(name), mask), params, grads, losses)
    _, alone, _ = run_on(make(name), masked_in(params), [masked_in(g) for g in grads], losses)
    assert_same_leaves(masked.inner_state, alone)
    assert_same_telemetry(masked, alone)


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
def test_inside_multisteps_the_state_advances_once_per_k(name):
    # optax.MultiSteps(k=2) runs the inner update on every mini-step and keeps its state
    # only every second one: adaptx's state (counters, statistics) must be exactly that of
    # the transform stepped once per pair on the pair's mean gradient (nothing may leak
    # from the discarded calls), and telemetry must read it through MultiStepsState.
    params, losses = params_tree(), losses_for(4)
    grads = [grads_like(params, t) for t in range(4)]
    ms = optax.MultiSteps(make(name), every_k_schedule=2)
    _, accumulated, _ = run_on(ms, params, grads, losses)
    # optax's running mean of two gradients: g0 + (g1 - g0) / 2.
    means = [jax.tree.map(lambda a, b: a + (b - a) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    _, alone, _ = run_on(make(name), params, means, [losses[1], losses[3]])
    assert_same_leaves(accumulated.inner_opt_state, alone)
    assert_same_telemetry(accumulated, alone)


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
