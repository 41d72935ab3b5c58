"""clip_spikes: clips the global norm only when it is an outlier of its own log-norm history.

The NumPy reference below is the rule as its docstring states it, written out step by step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx


def reference(
    norms,
    z_thresh=6.0,
    min_ratio=4.0,
    alpha=0.95,
    max_ratio=10.0,
    initial_max_norm=None,
    max_norm=None,
):
    """One dict per step: scale, threshold, spike, and the statistics after the step."""
    count, mean, var, rows = 0, 0.0, 0.0, []
    for n in norms:
        finite, positive = math.isfinite(n), n > 0
        log_n = math.log(n) if finite and positive else 0.0
        if count == 0:
            threshold = math.inf if initial_max_norm is None else initial_max_norm
            bound = math.log(threshold)
            spike = False
            clip_to = threshold
        else:
            width = max(z_thresh * math.sqrt(var), math.log(min_ratio))
            bound = mean + min(width, math.log(max_ratio))
            threshold = math.exp(bound)
            spike = finite and log_n > bound
            clip_to = math.exp(mean) if spike else math.inf
        if max_norm is not None:
            threshold, clip_to = min(threshold, max_norm), min(clip_to, max_norm)
        scale = clip_to / n if n > clip_to else 1.0
        if finite and positive:
            fed = min(log_n, bound)
            count += 1
            w = max(1.0 / count, 1.0 - alpha)
            d = fed - mean
            mean += w * d
            if not spike:  # an outlier moves the mean only
                var = (1 - w) * (var + w * d * d)
        rows.append(dict(scale=scale, threshold=threshold, spike=spike, mean=mean, var=var))
    return rows


def run(tx, norms):
    """Feeds gradients of the given global norms; returns (outputs, states)."""
    state = tx.init({"w": jnp.zeros(3)})
    step = jax.jit(tx.update)
    direction = jnp.array([0.6, 0.0, 0.8])
    outs, states = [], []
    for n in norms:
        out, state = step({"w": direction * jnp.float32(n)}, state)
        outs.append(out)
        states.append(state)
    return outs, states


def healthy_norms(steps, seed=0, drift=3.0):
    """A log-normal trace that drifts up by ``drift``x over the run, like a learning model."""
    rng = np.random.default_rng(seed)
    trend = np.linspace(0.0, np.log(drift), steps)
    return np.exp(np.log(0.5) + trend + 0.15 * rng.standard_normal(steps))


CONFIGS = {
    "defaults": {},
    "tight": {"z_thresh": 2.0, "min_ratio": 1.5, "alpha": 0.9},
    "max_ratio": {"z_thresh": 50.0, "max_ratio": 8.0},
    "ceilings": {"initial_max_norm": 0.3, "max_norm": 2.0},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_the_reference_step_by_step(config):
    kwargs = CONFIGS[config]
    norms = healthy_norms(120)
    for t, k in {30: 1e3, 31: 50.0, 60: 1e8, 90: 0.01}.items():
        norms[t] *= k
    ref = reference(norms, **kwargs)
    outs, states = run(adaptx.clip_spikes(**kwargs), norms)
    assert any(r["spike"] for r in ref)
    for t, (r, out, s) in enumerate(zip(ref, outs, states, strict=True)):
        assert bool(s.spike) == r["spike"], t
        np.testing.assert_allclose(float(s.scale), r["scale"], rtol=1e-5, err_msg=f"step {t}")
        expected = r["threshold"] if math.isfinite(r["threshold"]) else 0.0  # none yet: 0
        np.testing.assert_allclose(float(s.threshold), expected, rtol=1e-5)
        np.testing.assert_allclose(float(s.log_mean), r["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(s.log_var), r["var"], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            float(optax.tree.norm(out)), norms[t] * r["scale"], rtol=1e-5, err_msg=f"step {t}"
        )
    assert int(states[-1].num_clipped) == sum(r["scale"] < 1 for r in ref)


def test_leaves_a_healthy_drifting_run_alone():
    norms = healthy_norms(1000, drift=10.0)
    _, states = run(adaptx.clip_spikes(), norms)
    assert int(states[-1].num_clipped) == 0


def test_clips_a_spike_to_the_typical_norm():
    norms = np.full(20, 2.0)
    norms[10] = 2e6
    outs, states = run(adaptx.clip_spikes(), norms)
    np.testing.assert_allclose(float(optax.tree.norm(outs[10])), 2.0, rtol=1e-5)
    assert int(states[10].spike) == 1 and int(states[-1].num_clipped) == 1


def test_first_step_is_clipped_to_initial_max_norm_only_when_given():
    outs, _ = run(adaptx.clip_spikes(initial_max_norm=1.0), [50.0])
    np.testing.assert_allclose(float(optax.tree.norm(outs[0])), 1.0, rtol=1e-6)
    outs, _ = run(adaptx.clip_spikes(), [50.0])
    np.testing.assert_allclose(float(optax.tree.norm(outs[0])), 50.0, rtol=1e-6)


def test_a_spike_leaves_no_aftershock():
    clean = healthy_norms(200)
    spiked = clean.copy()
    spiked[100] *= 1e8
    _, s_clean = run(adaptx.clip_spikes(), clean)
    _, s_spiked = run(adaptx.clip_spikes(), spiked)
    # The spike moved the mean of the log-norm by at most (1 - alpha) * log(max_ratio), and
    # left the variance alone: afterwards the rule judges (nearly) as if nothing had happened.
    most = np.exp((1 - 0.95) * np.log(10.0))
    for t in range(101, 200):
        ratio = float(s_spiked[t].threshold) / float(s_clean[t].threshold)
        assert 1 / most < ratio < most, t
        assert int(s_spiked[t].spike) == 0
    assert abs(float(s_spiked[-1].threshold) / float(s_clean[-1].threshold) - 1) < 0.01


def test_a_spike_does_not_blind_the_rule_to_the_next():
    norms = healthy_norms(300)
    for t in range(60, 300, 40):
        norms[t] *= 1e4
    outs, states = run(adaptx.clip_spikes(), norms)
    for t in range(60, 300, 40):
        typical = float(np.exp(states[t - 1].log_mean))
        np.testing.assert_allclose(float(optax.tree.norm(outs[t])), typical, rtol=1e-4)


def test_adapts_to_a_lasting_jump_within_the_stated_bound():
    z, r, alpha, jump = 6.0, 4.0, 0.95, 10.0
    flat = healthy_norms(400, drift=1.0)
    norms = np.concatenate([flat[:200], jump * flat[200:]])
    _, states = run(adaptx.clip_spikes(z, r, alpha, max_ratio=100.0), norms)
    clipped = [t - 200 for t in range(200, 400) if float(states[t].scale) < 1]
    bound = math.log(jump / r) / ((1 - alpha) * math.log(r))
    assert clipped and max(clipped) < bound


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_norms_are_never_recorded(bad):
    norms = [1.0, 1.2, bad, 0.9]
    _, states = run(adaptx.clip_spikes(), norms)
    assert int(states[2].count) == int(states[1].count) == 2
    assert float(states[2].log_mean) == float(states[1].log_mean)
    assert np.isfinite(float(states[3].log_mean)) and np.isfinite(float(states[3].log_var))


def test_zero_gradients_pass_and_are_not_recorded():
    outs, states = run(adaptx.clip_spikes(), [0.0, 0.0, 1.0])
    assert float(optax.tree.norm(outs[0])) == 0.0
    assert int(states[1].count) == 0 and int(states[2].count) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"z_thresh": 0.0}, "z_thresh"),
        ({"min_ratio": 1.0}, "min_ratio"),
        ({"max_ratio": 0.5}, "max_ratio"),
        ({"alpha": 1.0}, "alpha"),
        ({"initial_max_norm": -1.0}, "initial_max_norm"),
        ({"max_norm": 0.0}, "max_norm"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"clip_spikes: `{name}`"):
        adaptx.clip_spikes(**kwargs)


def test_telemetry_reports_the_figures():
    _, states = run(adaptx.clip_spikes(), [1.0, 1.0, 100.0])
    figures = adaptx.telemetry(states[-1])
    assert int(figures["clip_spikes/spike"]) == 1
    np.testing.assert_allclose(
        float(figures["clip_spikes/typical"]), np.exp(float(states[-1].log_mean))
    )
    assert set(figures) == {
        f"clip_spikes/{k}"
        for k in ("grad_norm", "threshold", "typical", "scale", "z", "spike", "num_clipped")
    }


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="HLO checked on XLA:CPU")
def test_robust_adamw_detector_and_guard_add_one_full_size_pass():
    """The guard's and the clip's norms are one reduction, and the skip is selected inside
    Adam's fused update: one pass over the gradients more than the chain without them."""
    from bench.stability.probes import full_size_passes, unguarded_chain

    robust = full_size_passes(adaptx.robust_adamw(1e-3, weight_decay=1e-4), 1 << 20)
    assert round(robust) <= round(full_size_passes(unguarded_chain(), 1 << 20)) + 1


def test_telemetry_of_an_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaptx.clip_spikes(), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    optimizer.update(model, grads)
    figures = adaptx.telemetry(optimizer)
    assert float(figures["clip_spikes/typical"]) == pytest.approx(
        float(figures["clip_spikes/grad_norm"])
    )
