"""AdaGC (Wang et al. 2025): per-tensor clipping against an EMA of clipped norms.

The reference below is Algorithm 1 of the paper as the authors' Megatron-LM code
runs it, written out step by step with a plain loop: for steps 1..T the tree is
clipped by global norm to ``lambda_abs`` and each tensor's reference norm is the
running minimum of its clipped norms; afterwards each tensor is clipped to
``lambda_rel`` times its reference norm, which then becomes the EMA (``beta``) of
the clipped norms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptx

NAMES = ("a", "b", "c")
SHAPES = {"a": (4, 3), "b": (6,), "c": (2, 2, 2)}


def adagc_reference(norm_rows, beta=0.98, lambda_rel=1.05, lambda_abs=1.0, warmup_steps=100):
    """Per step: the scale of each tensor, each reference norm after the step, the global norm."""
    gamma, rows = {}, []
    for t, norms in enumerate(norm_rows, start=1):
        total = float(np.sqrt(sum(n * n for n in norms)))
        scales = []
        if t <= warmup_steps:
            coef = min(1.0, lambda_abs / total)
            for i, n in enumerate(norms):
                scales.append(coef)
                gamma[i] = n * coef if i not in gamma else min(gamma[i], n * coef)
        else:
            for i, n in enumerate(norms):
                if i not in gamma:
                    gamma[i] = n
                avg = gamma[i]
                if n > lambda_rel * avg:
                    scales.append(lambda_rel * avg / n)
                    clipped = lambda_rel * avg
                else:
                    scales.append(1.0)
                    clipped = n
                gamma[i] = beta * avg + (1 - beta) * clipped
        rows.append(
            {"scales": scales, "gamma": [gamma[i] for i in range(len(norms))], "total": total}
        )
    return rows


def scripted_grads(steps, seed=0):
    """Three tensors: "a" steady ~0.8, "b" decaying from 0.3, "c" ~0.5; all with 5% noise.

    Spikes: all of "c" x50 at step 3 (warm-up), "c" alone x50 at step 25, "a" x20 and
    "b" x5 together at step 40, and "b" exactly zero at step 33.
    """
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, steps + 1):
        level = {"a": 0.8, "b": 0.3 * np.exp(-t / 30), "c": 0.5}
        mult = {(3, "c"): 50.0, (25, "c"): 50.0, (40, "a"): 20.0, (40, "b"): 5.0, (33, "b"): 0.0}
        g = {}
        for k in NAMES:
            x = rng.standard_normal(SHAPES[k])
            norm = level[k] * (1 + 0.05 * rng.standard_normal()) * mult.get((t, k), 1.0)
            g[k] = jnp.asarray(x / np.linalg.norm(x) * norm, jnp.float32)
        out.append(g)
    return out


def tensor_norms(tree):
    return [float(np.linalg.norm(np.asarray(tree[k], np.float64))) for k in NAMES]


CONFIGS = {
    "defaults_short_warmup": {"warmup_steps": 10},
    "tight": {"beta": 0.9, "lambda_rel": 1.01, "lambda_abs": 0.9, "warmup_steps": 10},
    "no_warmup": {"warmup_steps": 0, "lambda_rel": 1.2},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_step_by_step(config):
    kwargs = CONFIGS[config]
    # The step-33 zero gradient is left out here: the reference code would record
    # it (see test_zero_gradient_tensor_keeps_its_reference_norm).
    grads = [g for t, g in enumerate(scripted_grads(60), start=1) if t != 33]
    norm_rows = [tensor_norms(g) for g in grads]
    ref = adagc_reference(norm_rows, **kwargs)
    outs, states = run(adaptx.adagc(**kwargs), grads)

    warmup = kwargs["warmup_steps"]
    lambda_rel = kwargs.get("lambda_rel", 1.05)
    lambda_abs = kwargs.get("lambda_abs", 1.0)
    # No step sits on a decision boundary, and both kinds of clipping happen.
    for t, (r, norms) in enumerate(zip(ref, norm_rows, strict=True), start=1):
        if t <= warmup:
            assert abs(r["total"] - lambda_abs) > 1e-4
        elif t > 1:
            prev = ref[t - 2]["gamma"]
            assert all(abs(n - lambda_rel * p) > 1e-4 * n for n, p in zip(norms, prev, strict=True))
    assert any(s < 1 for r in ref[warmup:] for s in r["scales"])

    for t, (r, u, s, g) in enumerate(zip(ref, outs, states, grads, strict=True), start=1):
        msg = f"step {t}"
        np.testing.assert_allclose(float(s.grad_norm), r["total"], rtol=1e-6, err_msg=msg)
        for i, k in enumerate(NAMES):
            np.testing.assert_allclose(
                u[k], np.asarray(g[k]) * r["scales"][i], rtol=2e-5, atol=1e-7, err_msg=msg
            )
            np.testing.assert_allclose(float(s.gamma[k]), r["gamma"][i], rtol=2e-5, err_msg=msg)
        assert int(s.tensors_clipped) == sum(x < 1 for x in r["scales"]), msg
        np.testing.assert_allclose(float(s.gamma_mean), np.mean(r["gamma"]), rtol=2e-5)
        assert int(s.count) == t


def test_warmup_clips_the_whole_tree_by_global_norm():
    tx = adaptx.adagc(lambda_abs=1.0, warmup_steps=5)
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [0.0, 0.8], rtol=1e-6)
    assert int(state.tensors_clipped) == 2
    # The reference norms are the clipped norms.
    np.testing.assert_allclose([float(state.gamma["a"]), float(state.gamma["b"])], [0.6, 0.8])


def test_warmup_reference_norm_is_the_running_minimum():
    tx = adaptx.adagc(warmup_steps=3)
    state = tx.init({"a": jnp.zeros(1)})
    for n in [0.5, 0.2, 0.4]:
        _, state = tx.update({"a": jnp.array([n])}, state)
    np.testing.assert_allclose(float(state.gamma["a"]), 0.2, rtol=1e-6)


def test_after_warmup_a_spike_in_one_tensor_leaves_the_others_untouched():
    tx = adaptx.adagc(warmup_steps=1)
    grads = {"a": jnp.array([0.5]), "b": jnp.array([0.5])}
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    spike = {"a": jnp.array([500.0]), "b": jnp.array([0.5])}
    updates, state = tx.update(spike, state)
    np.testing.assert_allclose(updates["a"], [1.05 * 0.5], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], [0.5])
    assert int(state.tensors_clipped) == 1
    # The EMA is fed the clipped norm, not the spike.
    np.testing.assert_allclose(float(state.gamma["a"]), 0.98 * 0.5 + 0.02 * 0.525, rtol=1e-6)


def test_growth_is_bounded_by_lambda_rel_per_step():
    tx = adaptx.adagc(lambda_rel=1.05, warmup_steps=1)
    state = tx.init({"a": jnp.zeros(1)})
    _, state = tx.update({"a": jnp.array([1.0])}, state)
    previous = 1.0
    for _ in range(20):  # a sustained 10x rise is let in gradually
        gamma_before = float(state.gamma["a"])
        updates, state = tx.update({"a": jnp.array([10.0])}, state)
        out = float(updates["a"][0])
        np.testing.assert_allclose(out, 1.05 * gamma_before, rtol=1e-6)
        assert out > previous
        previous = out


def test_no_warmup_starts_each_reference_norm_from_the_first_norm():
    tx = adaptx.adagc(warmup_steps=0)
    grads = {"a": jnp.array([3.0]), "b": jnp.array([40.0])}
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["a"], grads["a"])
    np.testing.assert_array_equal(updates["b"], grads["b"])
    np.testing.assert_allclose([float(state.gamma["a"]), float(state.gamma["b"])], [3.0, 40.0])


def test_zero_gradient_tensor_keeps_its_reference_norm():
    # An unused parameter (zero gradient) must not get gamma = 0, which would
    # freeze it for the rest of training.
    tx = adaptx.adagc(warmup_steps=2)
    state = tx.init({"a": jnp.zeros(1), "unused": jnp.zeros(1)})
    for _ in range(2):
        _, state = tx.update({"a": jnp.array([0.5]), "unused": jnp.zeros(1)}, state)
    assert float(state.gamma["unused"]) == 0.0  # nothing recorded yet
    _, state = tx.update({"a": jnp.array([0.5]), "unused": jnp.zeros(1)}, state)
    assert float(state.gamma["unused"]) == 0.0
    updates, state = tx.update({"a": jnp.array([0.5]), "unused": jnp.array([0.3])}, state)
    np.testing.assert_allclose(updates["unused"], [0.3])  # starts from its first norm
    np.testing.assert_allclose(float(state.gamma["unused"]), 0.3, rtol=1e-6)
    gamma = float(state.gamma["unused"])
    updates, state = tx.update({"a": jnp.array([0.5]), "unused": jnp.zeros(1)}, state)
    assert float(state.gamma["unused"]) == gamma  # a later zero leaves it alone


def test_non_finite_tensor_does_not_poison_its_reference_norm_or_the_others():
    tx = adaptx.adagc(warmup_steps=1)
    grads = {"a": jnp.array([0.5]), "b": jnp.array([0.5])}
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    for bad in [np.inf, np.nan]:
        updates, new = tx.update({"a": jnp.array([bad]), "b": jnp.array([0.5])}, state)
        assert float(new.gamma["a"]) == float(state.gamma["a"])
        np.testing.assert_array_equal(updates["b"], [0.5])
        assert np.isfinite(float(new.gamma["b"]))


def test_zero_gradients_give_zero_updates_and_finite_state():
    tx = adaptx.adagc(warmup_steps=2)
    grads = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    state = tx.init(grads)
    for _ in range(4):
        updates, state = tx.update(grads, state)
        for x in jax.tree.leaves(updates):
            np.testing.assert_array_equal(x, np.zeros_like(x))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_counter_saturates():
    tx = adaptx.adagc(warmup_steps=1)
    grads = {"a": jnp.array([0.5])}
    state = tx.init(grads)._replace(count=jnp.int32(np.iinfo(np.int32).max))
    _, state = tx.update(grads, state)
    assert int(state.count) == np.iinfo(np.int32).max


def test_jit_does_not_recompile_and_state_dtypes_are_fixed():
    tx = adaptx.adagc(warmup_steps=3)
    traces = []

    @jax.jit
    def step(g, s):
        traces.append(1)
        return tx.update(g, s)

    grads = scripted_grads(8)
    state0 = tx.init(grads[0])
    state = state0
    for g in grads:
        _, state = step(g, state)
    assert len(traces) == 1
    assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, state0)


def test_bf16_and_f16_gradients_keep_their_dtype_and_clip_by_the_f32_norms():
    grads32 = scripted_grads(8)
    for dtype in [jnp.bfloat16, jnp.float16]:
        # Scaled up so the f16 squared norms would overflow their own dtype.
        grads = [jax.tree.map(lambda x, d=dtype: (x * 1000.0).astype(d), g) for g in grads32]
        norm_rows = [tensor_norms(g) for g in grads]
        ref = adagc_reference(norm_rows, lambda_abs=1000.0, warmup_steps=4)
        outs, states = run(adaptx.adagc(lambda_abs=1000.0, warmup_steps=4), grads)
        for r, s, u in zip(ref, states, outs, strict=True):
            for i, k in enumerate(NAMES):
                assert u[k].dtype == dtype
                assert s.gamma[k].dtype == jnp.float32
                np.testing.assert_allclose(float(s.gamma[k]), r["gamma"][i], rtol=1e-5)
                assert np.all(np.isfinite(np.asarray(u[k], np.float32)))


def test_none_leaves_pass_through():
    tx = adaptx.adagc(warmup_steps=1)
    grads = {"a": jnp.array([3.0, 4.0]), "frozen": None}
    state = tx.init(grads)
    assert state.gamma["frozen"] is None
    updates, state = jax.jit(tx.update)(grads, state)
    assert updates["frozen"] is None
    assert float(state.grad_norm) == 5.0


def test_empty_tree_is_a_no_op():
    tx = adaptx.adagc()
    updates, state = tx.update({}, tx.init({}))
    assert updates == {} and int(state.count) == 1


def test_mismatched_tree_raises_naming_both_structures():
    tx = adaptx.adagc()
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="different structures"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"lambda_rel": 0.0}, "lambda_rel"),
        ({"lambda_rel": -1.05}, "lambda_rel"),
        ({"lambda_abs": 0.0}, "lambda_abs"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 10.5}, "warmup_steps"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=f"`{name}`.*{name}={value!r}"):
        adaptx.adagc(**kwargs)


def test_hyperparameters_may_be_traced_under_inject_hyperparams():
    grads = scripted_grads(20)
    kwargs = {"beta": 0.9, "lambda_rel": 1.01, "lambda_abs": 0.9, "warmup_steps": 5}
    direct, _ = run(adaptx.adagc(**kwargs), grads)
    injected, states = run(optax.inject_hyperparams(adaptx.adagc)(**kwargs), grads)
    for a, b in zip(direct, injected, strict=True):
        for k in NAMES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert set(kwargs) <= set(states[-1].hyperparams)


def test_telemetry_reports_every_figure_as_a_scalar():
    tx = adaptx.adagc(warmup_steps=1)
    grads = scripted_grads(2)
    state = tx.init(grads[0])
    for g in grads:
        _, state = tx.update(g, state)
    figures = adaptx.telemetry(state)
    assert list(figures) == ["adagc/grad_norm", "adagc/tensors_clipped", "adagc/gamma_mean"]
    assert all(v.shape == () for v in figures.values())


PROPERTY_STEPS = 10
PROPERTY_TX = adaptx.adagc(lambda_abs=5.0, warmup_steps=3)
PROPERTY_UPDATE = jax.jit(PROPERTY_TX.update)
tensor_norm_rows = st.lists(
    st.tuples(*[st.one_of(st.just(0.0), st.floats(1e-3, 1e4))] * 3),
    min_size=PROPERTY_STEPS,
    max_size=PROPERTY_STEPS,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_norm_rows)
def test_property_each_tensor_is_bounded_by_lambda_rel_times_its_reference(rows):
    rng = np.random.default_rng(0)
    state = PROPERTY_TX.init({k: jnp.zeros(SHAPES[k]) for k in NAMES})
    for t, norms in enumerate(rows, start=1):
        g = {}
        for k, n in zip(NAMES, norms, strict=True):
            x = rng.standard_normal(SHAPES[k])
            g[k] = jnp.asarray(x / np.linalg.norm(x) * n, jnp.float32)
        prev = state
        updates, state = PROPERTY_UPDATE(g, state)
        out, inp = tensor_norms(updates), tensor_norms(g)
        for i, k in enumerate(NAMES):
            assert out[i] <= inp[i] * (1 + 1e-6) + 1e-30
            gamma = float(prev.gamma[k])
            if t > 3 and gamma > 0:
                assert out[i] <= 1.05 * gamma * (1 + 1e-5)
            assert np.isfinite(float(state.gamma[k])) and float(state.gamma[k]) >= 0
        if t <= 3:
            assert np.sqrt(sum(x * x for x in out)) <= 5.0 * (1 + 1e-5)
