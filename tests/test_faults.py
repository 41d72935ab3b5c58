"""Faults and bad input: what every transform promises when training goes wrong.

* Gradient spikes of 1e3 to 1e8 times the normal size: each defense keeps the step
  bounded, by the bound stated in its test.
* bfloat16 and float16 parameters and gradients, huge and tiny: norms are finite
  and equal the float64 norm of the values as stored, nothing overflows (a state
  that would exceed its dtype saturates at the dtype's largest value), and the
  first step equals the float32 computation rounded to the dtype.
* All-zero gradients: finite outputs and state; zero gradients on zero parameters
  give exactly zero updates.
* Empty trees, ``None`` and ``optax.MaskedNode`` leaves pass through; integer leaves
  are rejected with a ``TypeError`` naming the leaf.
* Updates, state and params whose trees or shapes differ: a ``ValueError`` naming
  the mismatch, from adaptx, not a bare broadcasting error.
* NaN/Inf injected at random steps of a 500-step run under :func:`adaptx.guard`:
  nothing the run computes from ever becomes non-finite, skipped steps leave params
  and state bit-identical, and the counters equal the injected count.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_battery as battery
from helpers import norm64

import adaptx

NAMES = sorted(battery.CASES)
FACTORS = [1e3, 1e4, 1e6, 1e8]


def finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------
# (a) Gradient spikes.

SPIKE_AT, SPIKE_STEPS = 30, 36


def spike_params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
        "b": jnp.asarray(0.1 * rng.standard_normal(4), jnp.float32),
    }


def noisy_grads(steps, seed=1):
    """NumPy gradient trees, noisy around a steady mean (a typical norm of about 6)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (0.5 + rng.standard_normal((8, 4))).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
        }
        for _ in range(steps)
    ]


def spike_grads(t, factor):
    """Step ``t``'s gradients, ``factor`` times larger at the spike."""
    g = noisy_grads(SPIKE_STEPS)[t]
    return {k: jnp.asarray(v * (factor if t == SPIKE_AT else 1.0)) for k, v in g.items()}


@functools.cache
def _jitted_update(make):
    tx = make()
    return tx, jax.jit(tx.update)


def spike_run(make, factor):
    """``SPIKE_STEPS`` jitted steps; per step the gradients, the output, the states before
    and after, and the size of the parameter step."""
    tx, update = _jitted_update(make)
    params = spike_params()
    state = tx.init(params)
    steps = []
    for t in range(SPIKE_STEPS):
        g = spike_grads(t, factor)
        u, new_state = update(g, state, params)
        new_params = optax.apply_updates(params, u)
        size = norm64(jax.tree.map(jnp.subtract, new_params, params))
        steps.append({"grads": g, "out": u, "before": state, "after": new_state, "size": size})
        params, state = new_params, new_state
    assert finite((params, state)), "a spike made the run non-finite"
    return steps


def _clip_by_global_norm():
    return adaptx.clip_by_global_norm(1.0)


def _zclip():
    return adaptx.zclip(warmup_steps=10)


def _autoclip():
    return adaptx.autoclip(percentile=10.0, history=100)


def _adagc():
    return adaptx.adagc(warmup_steps=10)


def _adam_update_clipped():
    return optax.chain(adaptx.scale_by_adam(update_rms_clip=1.0), optax.scale(-1e-2))


def _robust_adamw():
    return adaptx.robust_adamw(1e-2)


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_clip_by_global_norm_bounds_the_norm_by_max_norm(factor):
    """Bound: every output has global norm <= ``max_norm`` (1.0), in the spike's direction;
    the pre-clip norm is recorded exactly."""
    steps = spike_run(_clip_by_global_norm, factor)
    for s in steps:
        assert norm64(s["out"]) <= 1.0 * (1 + 1e-6)
    spike = steps[SPIKE_AT]
    np.testing.assert_allclose(norm64(spike["out"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(spike["after"].grad_norm), norm64(spike["grads"]), rtol=1e-6)


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_zclip_bounds_the_norm_by_mean_plus_z_thresh_std(factor):
    """Bound: a spike after warm-up is clipped to at most ``mean + z_thresh * std`` of the
    statistics before it (the adaptive threshold lies between the mean and that)."""
    steps = spike_run(_zclip, factor)
    spike = steps[SPIKE_AT]
    before = spike["before"]
    bound = float(before.mean) + 2.5 * float(jnp.sqrt(before.var))
    assert int(spike["after"].spike) == 1
    assert norm64(spike["out"]) <= bound * (1 + 1e-6)
    assert norm64(spike["out"]) >= float(before.mean) * (1 - 1e-6)


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_autoclip_bounds_the_norm_by_the_largest_earlier_norm(factor):
    """Bound: with ``percentile < 100`` the spike is clipped to a percentile of a window
    in which it is the largest norm, so to at most the largest norm recorded before it."""
    steps = spike_run(_autoclip, factor)
    spike = steps[SPIKE_AT]
    before = spike["before"]
    largest_earlier = float(jnp.max(before.norms[: int(before.filled)]))
    assert norm64(spike["out"]) <= largest_earlier * (1 + 1e-6)


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_adagc_bounds_each_tensor_by_lambda_rel_times_its_reference(factor):
    """Bound: after warm-up each tensor's norm is at most ``lambda_rel`` (1.05) times its
    reference norm from before the spike."""
    steps = spike_run(_adagc, factor)
    spike = steps[SPIKE_AT]
    for key in ("w", "b"):
        gamma = float(spike["before"].gamma[key])
        assert gamma > 0
        assert norm64({key: spike["out"][key]}) <= 1.05 * gamma * (1 + 1e-6)
    assert int(spike["after"].tensors_clipped) == 2


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_update_clipped_adam_step_is_no_larger_than_a_normal_step(factor):
    """Bound: with ``update_rms_clip=1`` the spike's own parameter step is at most the
    largest normal step (measured: about a quarter of it), and the momentum's echo in
    the next steps at most 1.5 times it (measured: 1.09)."""
    steps = spike_run(_adam_update_clipped, factor)
    sizes = np.array([s["size"] for s in steps])
    normal = sizes[10:SPIKE_AT].max()
    assert sizes[SPIKE_AT] <= normal
    assert sizes[SPIKE_AT + 1 :].max() <= 1.5 * normal
    assert int(steps[SPIKE_AT]["after"][0].tensors_clipped) >= 1


@pytest.mark.parametrize("factor", FACTORS)
def test_spike_robust_adamw_step_is_no_larger_than_a_normal_step(factor):
    """Bound: robust_adamw's parameter step at the spike is at most the largest normal
    step, and the steps after it at most 1.5 times it (measured: about 1.0; clip_spikes keeps
    the spike out of Adam's moments, so nothing echoes)."""
    steps = spike_run(_robust_adamw, factor)
    sizes = np.array([s["size"] for s in steps])
    normal = sizes[10:SPIKE_AT].max()
    assert sizes[SPIKE_AT] <= normal * (1 + 1e-6)
    assert sizes[SPIKE_AT + 1 :].max() <= 1.5 * normal
    figures = adaptx.telemetry(steps[SPIKE_AT]["after"])
    assert int(figures["clip_spikes/spike"]) == 1


# ---------------------------------------------------------------------------------------
# (b) Low precision, huge and tiny.


def small_params(dtype=jnp.float32):
    """A kernel and a bias. The eager tests below share these shapes, so that JAX compiles
    each operation once for all of them."""
    rng = np.random.default_rng(3)
    return {
        "kernel": jnp.asarray(rng.standard_normal((16, 8)), dtype),
        "bias": jnp.asarray(0.1 * rng.standard_normal(8), dtype),
    }


# "huge": float16 near its largest value (65504), bfloat16 far beyond float16's range.
MAGNITUDES = {
    (jnp.float16, "huge"): 1e4,
    (jnp.float16, "tiny"): 1e-6,  # below float16's smallest normal: subnormal
    (jnp.bfloat16, "huge"): 1e15,
    (jnp.bfloat16, "tiny"): 1e-6,
}


# accumulate's inner transforms see the mean of a window, not the step's gradient: its
# low-precision window sum is specified in tests/test_accumulate.py.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "accumulate"])
@pytest.mark.parametrize(
    ("dtype", "size"), list(MAGNITUDES), ids=lambda x: getattr(x, "__name__", x)
)
def test_low_precision_norms_are_correct_and_nothing_overflows(name, dtype, size):
    """Norms equal the float64 norm of the stored values; updates and state stay finite
    for 2 steps; the first step is the float32 computation up to a few roundings to the
    dtype (adaptx rounds once; a recipe's optax weight decay and learning rate round
    again, in the dtype)."""
    magnitude = MAGNITUDES[(dtype, size)]
    # 136 elements: at 1e4 the float16 norm (about 1.2e5) is beyond float16's range.
    params = small_params(dtype)
    rng = np.random.default_rng(0)
    tx = battery.make(name)
    state = tx.init(params)
    for t in range(2):
        g = jax.tree.map(
            lambda x: jnp.asarray(magnitude * rng.standard_normal(x.shape), dtype), params
        )
        assert finite(g)
        if size == "huge":  # the norm is beyond float16's range (for float16: its own)
            assert norm64(g) > float(jnp.finfo(jnp.float16).max)
        u, state = tx.update(g, state, params)
        assert finite(u), f"step {t}: updates overflowed"
        assert finite(state), f"step {t}: state overflowed"
        assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
        norms = {k: v for k, v in adaptx.telemetry(state).items() if k.endswith("grad_norm")}
        for key, value in norms.items():
            np.testing.assert_allclose(float(value), norm64(g), rtol=1e-5, err_msg=key)
        if t == 0:
            first, first_grads = u, g
    # The same first step in float32, on the same (upcast) values.
    up = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    tx32 = battery.make(name)
    ref, _ = tx32.update(up(first_grads), tx32.init(up(params)), up(params))
    info = jnp.finfo(dtype)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(ref), strict=True):
        b = np.asarray(b, np.float64)
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            b,
            rtol=4 * float(info.eps),
            atol=max(float(info.eps) * float(np.abs(b).max()), float(info.smallest_subnormal)),
        )


def test_float16_second_moment_saturates_instead_of_freezing_the_parameter():
    """A float16 second moment that would exceed 65504 is stored as 65504, not inf.

    An infinite second moment would make every later step ``m / inf = 0``: the
    parameter would stop learning for good, silently.
    """
    tx = adaptx.scale_by_adam()
    params = {"w": jnp.zeros(3, jnp.float16)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(3, 3e4, jnp.float16)}, state)
    assert float(jnp.max(state.nu["w"])) == float(jnp.finfo(jnp.float16).max)
    u, state = tx.update({"w": jnp.full(3, 1.0, jnp.float16)}, state)
    assert finite(state) and float(jnp.min(jnp.abs(u["w"]))) > 0


# ---------------------------------------------------------------------------------------
# (c) All-zero gradients.


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_finite_outputs_and_zero_updates_on_zero_params(name):
    """Three all-zero steps: finite outputs and state (no 0/0); on zero parameters
    (nothing to decay) the updates are exactly zero; a normal step afterwards is finite."""
    for zero_params in (True, False):
        params = small_params()
        if zero_params:
            params = jax.tree.map(jnp.zeros_like, params)
        tx = battery.make(name)
        state = tx.init(params)
        for _ in range(3):
            u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
            assert finite(u) and finite(state)
            if zero_params:
                assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
        g = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
        u, state = tx.update(g, state, params)
        assert finite(u) and finite(state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: adaptx.zclip(warmup_steps=3),
        lambda: adaptx.guard(optax.sgd(1.0), spike_z=3.0, spike_warmup=3),
        lambda: adaptx.robust_adamw(1e-2, spike_z=3.0),
        lambda: adaptx.clip_spikes(),
    ],
    ids=["zclip", "guard_spike_z", "robust_adamw_spike_z", "clip_spikes"],
)
def test_a_warmup_of_zero_gradients_does_not_stall_the_run(make):
    """All-zero gradients first (frozen layers, a masked-out loss), then normal ones: the
    normal ones are applied. Zero norms are not recorded in the running statistics;
    recorded, they would give mean = std = 0, and every later gradient would be a spike,
    clipped to zero (zclip) or skipped (guard), for the rest of the run."""
    tx = make()
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    for _ in range(5):
        u, state = tx.update({"w": jnp.zeros(4)}, state, params)
    rng = np.random.default_rng(0)
    for _ in range(10):
        g = {"w": jnp.asarray(1.0 + 0.1 * rng.standard_normal(4), jnp.float32)}
        u, state = tx.update(g, state, params)
        assert float(jnp.min(jnp.abs(u["w"]))) > 0
    figures = adaptx.telemetry(state)
    assert all(int(v) == 0 for k, v in figures.items() if k.endswith(("skipped", "spike")))


# ---------------------------------------------------------------------------------------
# (d) Empty trees, None and MaskedNode leaves, integer leaves.


@pytest.mark.parametrize("name", NAMES)
def test_empty_tree_passes_through(name):
    """``{}`` in, ``{}`` out, with a finite state."""
    tx = battery.make(name)
    state = tx.init({})
    for _ in range(2):
        u, state = tx.update({}, state, {})
        assert u == {} and finite(state)


@pytest.mark.parametrize("name", NAMES)
def test_none_and_masked_node_leaves_pass_through(name):
    """``None`` (a frozen parameter) and ``optax.MaskedNode`` (a leaf masked out by
    ``optax.masked``) come back in place; the other leaves are updated."""
    kernel = small_params()["kernel"]
    params = {"kernel": kernel, "frozen": None, "masked": optax.MaskedNode()}
    grads = {"kernel": 0.3 * kernel, "frozen": None, "masked": optax.MaskedNode()}
    tx = battery.make(name)
    state = tx.init(params)
    u, state = tx.update(grads, state, params)
    assert u["frozen"] is None
    assert isinstance(u["masked"], optax.MaskedNode)
    assert u["kernel"].shape == (16, 8) and finite(u["kernel"]) and finite(state)


@pytest.mark.parametrize("name", NAMES)
def test_integer_leaves_are_rejected_naming_the_leaf(name):
    """An integer leaf (a step counter left in the tree) raises ``TypeError`` naming it."""
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    tx = battery.make(name)
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"leaf \['step'\] has dtype int32.*optax.masked"):
        tx.update({"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}, state, params)


# ---------------------------------------------------------------------------------------
# (e) Mismatched trees.


def _state_follows_the_tree(name) -> bool:
    tx, x = battery.make(name), jnp.ones(3)
    return len(jax.tree.leaves(tx.init({"a": x}))) != len(
        jax.tree.leaves(tx.init({"a": x, "b": x}))
    )


def _needs_params(name) -> bool:
    tx = battery.make(name)
    p = {"a": jnp.ones(3)}
    try:
        tx.update(p, tx.init(p), None)
    except ValueError:
        return True
    return False


TREE_STATE = [n for n in NAMES if _state_follows_the_tree(n)]
USE_PARAMS = [n for n in NAMES if _needs_params(n)]

# (wrong tree, what the error must show)
MISMATCHES = {
    "renamed": ({"a": jnp.ones(3), "c": jnp.ones(5)}, r"different structures(.|\n)*'c'"),
    "missing": ({"a": jnp.ones(3)}, r"different structures"),
    "extra": ({"a": jnp.ones(3), "b": jnp.ones(5), "z": jnp.ones(1)}, "different structures"),
    "reshaped": ({"a": jnp.ones(3), "b": jnp.ones(4)}, r"\['b'\] has shape \([45],\).*\([45],\)"),
}
GOOD = {"a": jnp.ones(3), "b": jnp.ones(5)}


def test_the_mismatch_tests_cover_the_stateful_transforms():
    assert {"scale_by_adam", "momentum", "ema", "adagc", "robust_adamw", "guard"} <= set(TREE_STATE)
    assert {"adaptive_grad_clip", "adamw", "robust_adamw"} <= set(USE_PARAMS)


@pytest.mark.parametrize("kind", list(MISMATCHES))
@pytest.mark.parametrize("name", TREE_STATE)
def test_updates_that_do_not_fit_the_state_raise_naming_the_mismatch(name, kind):
    """A state initialised for one tree, updated with another (a checkpoint of a
    different model): ``ValueError`` that names the transform and the mismatch."""
    wrong, message = MISMATCHES[kind]
    if name in ("adagc", "adagc_per_tensor") and kind == "reshaped":
        pytest.skip("adagc keeps one scalar per tensor: any shape fits")
    tx = battery.make(name)
    state = tx.init(GOOD)
    with pytest.raises(ValueError, match=message):
        tx.update(wrong, state, wrong)


@pytest.mark.parametrize("kind", list(MISMATCHES))
@pytest.mark.parametrize("name", USE_PARAMS)
def test_params_that_do_not_fit_the_updates_raise_naming_the_mismatch(name, kind):
    """Right updates and state, wrong params: ``ValueError`` naming the mismatch."""
    wrong, message = MISMATCHES[kind]
    tx = battery.make(name)
    state = tx.init(GOOD)
    with pytest.raises(ValueError, match=message.replace("different", r"updates tree .*different")):
        tx.update(GOOD, state, wrong)


# ---------------------------------------------------------------------------------------
# (f) NaN/Inf at random steps of a long run under guard.

LONG_STEPS = 500


def _inner(name):
    return {
        "adamw": lambda: adaptx.guard(adaptx.adamw(1e-2)),
        "robust_adamw": lambda: adaptx.robust_adamw(1e-2),  # guard over its inner chain
        "sgd": lambda: adaptx.guard(adaptx.sgd(1e-2, momentum=0.9)),
        "zclip_chain": lambda: adaptx.guard(
            optax.chain(adaptx.zclip(warmup_steps=10), adaptx.momentum(0.9), optax.scale(-1e-2))
        ),
        "spike_guard": lambda: adaptx.guard(
            adaptx.adamw(1e-2), spike_z=6.0, max_consecutive_skips=3
        ),
    }[name]()


def _faults(seed):
    """About 50 faulty steps: single steps and bursts of 2-4, each a NaN, +inf or -inf in
    one element of a random leaf, or in every element of the tree."""
    rng = np.random.default_rng(seed)
    faults = {}
    while len(faults) < 50:
        start = int(rng.integers(5, LONG_STEPS))
        for t in range(start, min(start + int(rng.choice([1, 1, 1, 2, 4])), LONG_STEPS)):
            faults[t] = (rng.choice(["nan", "inf", "-inf"]), rng.choice(["w", "b", "all"]))
    return faults


@pytest.mark.parametrize("name", ["adamw", "robust_adamw", "sgd", "zclip_chain", "spike_guard"])
def test_long_run_with_random_nonfinite_steps_under_guard(name):
    """Every step: params and state finite (the guard's ``grad_norm`` reports the incoming
    norm as measured: NaN or inf exactly on the faulty steps); a faulty step leaves params
    and the inner state bit-identical and a clean step moves the params; at the end the
    skip counter equals the number of faulty steps. (``test_guard.py`` runs the adamw
    case with fewer checks.) The 500 steps run as one ``lax.scan``."""
    faults = _faults(seed=len(name))
    value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    grads = noisy_grads(LONG_STEPS, seed=2)
    for t, (kind, where) in faults.items():
        for key in ("w", "b") if where == "all" else (where,):
            if where == "all":
                grads[t][key][...] = value[kind]
            else:
                grads[t][key][(t % 4,) * grads[t][key].ndim] = value[kind]
    stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *grads)
    tx = _inner(name)

    def all_finite(tree):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

    def all_equal(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in pairs]))

    def step(carry, g):
        params, state = carry
        u, new_state = tx.update(g, state, params)
        new_params = optax.apply_updates(params, u)
        checked = new_state._replace(grad_norm=jnp.zeros([], jnp.float32))
        record = {
            "finite": all_finite((new_params, checked)),
            "unchanged": all_equal(
                (params, state.inner_state), (new_params, new_state.inner_state)
            ),
            "reason": new_state.last_reason,
            "norm_finite": jnp.isfinite(new_state.grad_norm),
        }
        return (new_params, new_state), record

    params = spike_params()
    (params, state), rec = jax.jit(lambda c, xs: jax.lax.scan(step, c, xs))(
        (params, tx.init(params)), stacked
    )
    rec = jax.tree.map(np.asarray, rec)
    faulty = np.isin(np.arange(LONG_STEPS), sorted(faults))
    spike_skips = rec["reason"] == 2
    assert rec["finite"].all(), np.flatnonzero(~rec["finite"])
    np.testing.assert_array_equal(rec["unchanged"], faulty | spike_skips)
    np.testing.assert_array_equal(rec["norm_finite"], ~faulty)
    np.testing.assert_array_equal(rec["reason"][faulty], 1)
    assert int(state.skipped) == len(faults) + int(spike_skips.sum())
    assert spike_skips.sum() <= 2  # the spike detector (where on) does not fire on clean noise
    assert finite(params)
