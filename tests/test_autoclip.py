"""AutoClip (Seetharaman et al. 2020): clip to a percentile of the recent global norms.

The reference below is the rule of the paper's official code, written out step by
step with a plain loop: append the current pre-clip norm to the history, keep
the last ``history`` norms, take ``np.percentile`` (linear interpolation) of
them, and clip the global norm to it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import grads_with_norm, norm64, run, scripted_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptx


def autoclip_reference(norms, percentile=10.0, history=1000):
    """One (threshold, scale) pair per step."""
    seen, rows = [], []
    for n in norms:
        seen.append(n)
        threshold = float(np.percentile(seen[-history:], percentile))
        rows.append((threshold, 1.0 if n <= threshold else threshold / n))
    return rows


SPIKES = {0: 50.0, 13: 50.0, 14: 50.0, 40: 50.0, 41: 0.0, 66: 50.0}


@pytest.mark.parametrize(
    "percentile, history", [(10.0, 1000), (10.0, 16), (50.0, 7), (0.0, 5), (100.0, 5), (37.5, 1)]
)
def test_matches_reference_step_by_step(percentile, history):
    grads = scripted_grads(80, SPIKES, decay=True)
    norms = [norm64(g) for g in grads]
    ref = autoclip_reference(norms, percentile, history)
    outs, states = run(adaptx.autoclip(percentile, history), grads)
    for t, ((threshold, scale), u, s, g) in enumerate(zip(ref, outs, states, grads, strict=True)):
        np.testing.assert_allclose(float(s.grad_norm), norms[t], rtol=1e-6)
        np.testing.assert_allclose(float(s.threshold), threshold, rtol=1e-5, err_msg=f"step {t}")
        np.testing.assert_allclose(float(s.scale), scale, rtol=1e-5, err_msg=f"step {t}")
        assert (float(s.scale) < 1) == (scale < 1 - 1e-6), t
        for k in g:
            np.testing.assert_allclose(u[k], np.asarray(g[k]) * scale, rtol=1e-5, atol=1e-7)
        assert int(s.filled) == min(t + 1, history)


def test_scripted_spikes_are_cut_back_to_a_typical_norm():
    grads = scripted_grads(80, SPIKES, decay=True)
    outs, states = run(adaptx.autoclip(), grads)
    for t in [13, 14, 40, 66]:
        assert norm64(outs[t]) < 2.5, t
        assert float(states[t].scale) < 0.05, t


def test_first_step_clips_nothing_however_large():
    tx = adaptx.autoclip()
    state = tx.init(grads_with_norm(0.0))
    updates, state = tx.update(grads_with_norm(1e6), state)
    np.testing.assert_array_equal(updates["w"], [1e6, 0.0])
    assert float(state.threshold) == 1e6
    assert float(state.scale) == 1.0


def test_current_norm_is_part_of_the_history_it_is_judged_by():
    # With history (1, 2) + current 10 the median is 2; without the current norm it would be 1.5.
    tx = adaptx.autoclip(percentile=50.0)
    state = tx.init(grads_with_norm(0.0))
    for n in [1.0, 2.0]:
        _, state = tx.update(grads_with_norm(n), state)
    updates, state = tx.update(grads_with_norm(10.0), state)
    np.testing.assert_allclose(updates["w"], [2.0, 0.0])


def test_history_wraps_around_and_forgets_the_oldest_norm():
    tx = adaptx.autoclip(percentile=0.0, history=3)  # clip to the minimum of the window
    state = tx.init(grads_with_norm(0.0))
    thresholds = []
    for n in [1.0, 5.0, 6.0, 7.0, 8.0, 2.0]:
        _, state = tx.update(grads_with_norm(n), state)
        thresholds.append(float(state.threshold))
    assert thresholds == [1.0, 1.0, 1.0, 5.0, 6.0, 2.0]
    assert int(state.filled) == 3
    assert int(state.index) == 6 % 3
    np.testing.assert_array_equal(np.sort(np.asarray(state.norms)), [2.0, 7.0, 8.0])


def test_percentile_100_never_clips():
    grads = scripted_grads(30, {10: 50.0, 20: 1e4}, decay=True)
    outs, states = run(adaptx.autoclip(100.0, 8), grads)
    for g, u in zip(grads, outs, strict=True):
        np.testing.assert_array_equal(u["w"], g["w"])


def test_zero_gradients_are_recorded_and_give_no_nan():
    tx = adaptx.autoclip(percentile=50.0)
    state = tx.init(grads_with_norm(0.0))
    for _ in range(2):
        updates, state = tx.update(grads_with_norm(0.0), state)
        np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    # History (0, 0, 1): the median is 0, so this step is scaled to zero, as in the reference.
    updates, state = tx.update(grads_with_norm(1.0), state)
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    assert int(state.filled) == 3 and float(state.threshold) == 0.0


def test_non_finite_norms_are_not_recorded():
    tx = adaptx.autoclip(percentile=50.0)
    state = tx.init(grads_with_norm(0.0))
    # Before any norm is recorded the threshold is inf: nothing is scaled.
    updates, state = tx.update(grads_with_norm(np.inf), state)
    assert int(state.filled) == 0 and float(state.threshold) == np.inf
    assert float(state.scale) == 1.0
    _, state = tx.update(grads_with_norm(2.0), state)
    updates, state = tx.update(grads_with_norm(np.nan), state)
    assert int(state.filled) == 1 and float(state.threshold) == 2.0
    assert np.isnan(updates["w"][0])  # NaN passes through: adaptx.guard skips it
    updates, state = tx.update(grads_with_norm(np.inf), state)
    assert float(state.scale) == 0.0 and int(state.filled) == 1
    _, state = tx.update(grads_with_norm(4.0), state)
    assert float(state.threshold) == 3.0  # median of (2, 4): the bad steps left no trace


def test_jit_does_not_recompile_and_state_dtypes_are_fixed():
    tx = adaptx.autoclip(history=4)
    traces = []

    @jax.jit
    def step(g, s):
        traces.append(1)
        return tx.update(g, s)

    grads = scripted_grads(9, {5: 50.0}, decay=True)
    state0 = tx.init(grads[0])
    state = state0
    for g in grads:
        _, state = step(g, state)
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == jax.tree.map(
        lambda x: (x.dtype, x.shape), state0
    )


def test_bf16_and_f16_gradients_keep_their_dtype_and_clip_by_the_f32_norm():
    grads32 = scripted_grads(6, {5: 50.0}, decay=True)
    for dtype in [jnp.bfloat16, jnp.float16]:
        # Scaled up so the f16 squared norm would overflow its own dtype.
        grads = [jax.tree.map(lambda x, d=dtype: (x * 1000.0).astype(d), g) for g in grads32]
        outs, states = run(adaptx.autoclip(percentile=50.0), grads)
        norms = [norm64(g) for g in grads]
        threshold, scale = autoclip_reference(norms, 50.0)[-1]
        assert outs[-1]["w"].dtype == dtype
        assert states[-1].norms.dtype == jnp.float32
        np.testing.assert_allclose(float(states[-1].threshold), threshold, rtol=1e-5)
        np.testing.assert_allclose(float(states[-1].scale), scale, rtol=1e-5)
        np.testing.assert_allclose(norm64(outs[-1]), threshold, rtol=1e-2)


def test_none_leaves_pass_through():
    tx = adaptx.autoclip()
    grads = {"a": jnp.array([3.0, 4.0]), "frozen": None}
    state = tx.init(grads)
    updates, state = jax.jit(tx.update)(grads, state)
    assert updates["frozen"] is None
    assert float(state.grad_norm) == 5.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"percentile": -1.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
        ({"history": 0}, "history"),
        ({"history": 10.0}, "history"),
        ({"history": True}, "history"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=f"`{name}`.*{name}={value!r}"):
        adaptx.autoclip(**kwargs)


def test_hyperparameters_may_be_traced_under_inject_hyperparams():
    grads = scripted_grads(12, {9: 50.0}, decay=True)
    direct, _ = run(adaptx.autoclip(percentile=30.0, history=5), grads)
    injected, states = run(optax.inject_hyperparams(adaptx.autoclip)(30.0, 5), grads)
    for a, b in zip(direct, injected, strict=True):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    assert states[-1].inner_state.norms.shape == (5,)


def test_init_under_jit_with_a_traced_history_explains_the_fix():
    with pytest.raises(ValueError, match="`history` sizes the optimizer state"):
        jax.jit(lambda h: adaptx.autoclip(history=h).init({"w": jnp.zeros(2)}))(3)


def test_telemetry_reports_every_figure_as_a_scalar():
    tx = adaptx.autoclip()
    state = tx.init(grads_with_norm(0.0))
    _, state = tx.update(grads_with_norm(3.0), state)
    figures = adaptx.telemetry(state)
    assert list(figures) == ["autoclip/grad_norm", "autoclip/threshold", "autoclip/scale"]
    assert all(v.shape == () for v in figures.values())


PROPERTY_STEPS = 12
PROPERTY_TX = adaptx.autoclip(percentile=20.0, history=5)
PROPERTY_UPDATE = jax.jit(PROPERTY_TX.update)
norm_sequences = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-3, 1e4)), min_size=PROPERTY_STEPS, max_size=PROPERTY_STEPS
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm_sequences)
def test_property_update_norm_is_bounded_by_the_window_percentile(norms):
    directions = np.random.default_rng(0).standard_normal((PROPERTY_STEPS, 6))
    state = PROPERTY_TX.init({"w": jnp.zeros(6)})
    window = []
    for n, d in zip(norms, directions, strict=True):
        g = {"w": jnp.asarray(d / np.linalg.norm(d) * n, jnp.float32)}
        updates, state = PROPERTY_UPDATE(g, state)
        window = ([*window, norm64(g)])[-5:]
        threshold = float(state.threshold)
        assert min(window) * (1 - 1e-6) <= threshold <= max(window) * (1 + 1e-6)
        assert 0.0 <= float(state.scale) <= 1.0
        assert norm64(updates) <= min(norm64(g), threshold) * (1 + 1e-5) + 1e-30
