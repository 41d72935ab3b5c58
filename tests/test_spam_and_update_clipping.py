"""SPAM (spike-aware clipping, momentum reset) and StableAdamW update clipping in scale_by_adam,
checked step by step against NumPy references of the papers' rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptx


def spam_reference(grads, b1, b2, eps, theta, interval, warmup, start):
    """SPAM as in Huang et al. 2025 (Algorithm 1 and the reference code), in float64."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(grads[0], np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64).copy()
        phase = t % interval if interval else t
        if interval and phase == 0:
            m[:] = 0.0
            v[:] = 0.0
        spikes = 0
        if theta and t >= start and (not interval or phase >= start):
            mask = (v > 0) & (g**2 > theta * v)  # no history, no reference
            spikes = int(mask.sum())
            g[mask] = np.sign(g[mask]) * np.sqrt(theta * v[mask])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if interval and t >= interval and phase < warmup:
            u = u * (1 - 0.99 * 0.5 * (1 + np.cos(np.pi * phase / (warmup + 1))))
        out.append((u, spikes))
    return out


# 16 elements: the spike count is one int32 sum; 192: it is summed in rows of 64 first.
@pytest.mark.parametrize("n", [16, 192])
def test_spam_matches_reference_step_by_step(n):
    rng = np.random.default_rng(0)
    steps = 40
    grads = rng.normal(size=(steps, n)).astype(np.float32)
    grads[12, 3] = 500.0  # element spikes
    grads[25, [0, 7]] = [-800.0, 300.0]
    grads[33, 5] = 1e4  # lands inside a post-reset warm-up, before clipping restarts
    kw = dict(b1=0.9, b2=0.99, eps=1e-8)
    tx = adaptx.scale_by_adam(
        **kw, spike_threshold=50.0, reset_interval=15, reset_warmup=6, spike_start=3
    )
    ref = spam_reference(grads, theta=50.0, interval=15, warmup=6, start=3, **kw)
    state = tx.init(jnp.zeros(n))
    update = jax.jit(tx.update)
    total_spikes = 0
    for t in range(steps):
        u, state = update(jnp.asarray(grads[t]), state)
        expected, spikes = ref[t]
        np.testing.assert_allclose(u, expected, rtol=2e-4, atol=1e-6, err_msg=f"step {t + 1}")
        assert int(state.spikes) == spikes, f"step {t + 1}"
        total_spikes += spikes
    assert total_spikes >= 3  # the scripted spikes were caught


def test_spike_count_is_exact_on_a_large_tensor():
    # Every element of a 2^20-element tensor spikes at once: the count must not saturate
    # or round (it is summed in one-byte rows first, then in int32).
    n = 1 << 20
    tx = adaptx.scale_by_adam(b2=0.9, spike_threshold=4.0, spike_start=10)
    state = tx.init(jnp.zeros(n))
    update = jax.jit(tx.update)
    for _ in range(9):  # the rule starts at step 10
        _, state = update(jnp.ones(n), state)
        assert int(state.spikes) == 0
    g = jnp.where(jnp.arange(n) % 3 == 0, 100.0, 1.0)  # every third element spikes
    _, state = update(g, state)
    assert int(state.spikes) == len(range(0, n, 3))


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="HLO checked on XLA:CPU")
def test_spam_step_does_not_copy_the_second_moment():
    # The spike test needs v_{t-1}; if a kernel read it after v is updated in place, XLA
    # would first copy all of v. The spike mask is written once instead (one byte per
    # element) and the first moment's bound is recovered from v_t.
    n = 1 << 16
    tx = adaptx.spam(1e-3)
    p, g = jnp.zeros(n), jnp.full(n, 1e-3)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return params + u, state

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), g).compile().as_text()
    assert [ln for ln in hlo.splitlines() if f"f32[{n}]" in ln and " copy(" in ln] == []


def test_spam_clipping_bounds_a_spike_by_the_second_moment():
    tx = adaptx.scale_by_adam(b2=0.9, spike_threshold=4.0, spike_start=1)
    state = tx.init(jnp.zeros(2))
    for _ in range(10):
        _, state = tx.update(jnp.ones(2), state)
    v_prev = np.asarray(state.nu)
    _, state = tx.update(jnp.array([1e6, 1.0]), state)
    # the spike entered the moment as sqrt(theta * v_prev), not 1e6
    expected_v0 = 0.9 * v_prev[0] + 0.1 * (4.0 * v_prev[0])
    np.testing.assert_allclose(state.nu[0], expected_v0, rtol=1e-5)
    assert int(state.spikes) == 1


def test_elements_without_history_are_not_clipped_to_zero():
    # A parameter whose gradient was zero so far (an unseen embedding row) must
    # still be able to learn once its gradient arrives.
    tx = adaptx.scale_by_adam(spike_threshold=5.0, spike_start=1)
    state = tx.init(jnp.zeros(2))
    for _ in range(5):
        _, state = tx.update(jnp.array([1.0, 0.0]), state)
    u, state = tx.update(jnp.array([1.0, 3.0]), state)
    assert float(u[1]) > 0.5
    np.testing.assert_allclose(state.nu[1], 0.001 * 9.0, rtol=1e-4)  # entered unclipped


def test_momentum_reset_zeroes_moments_and_warms_up():
    tx = adaptx.scale_by_adam(reset_interval=5, reset_warmup=3)
    state = tx.init(jnp.zeros(3))
    scales = []
    for _t in range(1, 12):
        _, state = tx.update(jnp.ones(3), state)
        scales.append(float(state.momentum_scale))
    assert scales[:4] == [1.0] * 4  # no warm-up before the first reset
    np.testing.assert_allclose(scales[4], 0.01, rtol=1e-5)  # step 5: reset, j = 0
    assert 0.01 < scales[5] < scales[6] < 1.0  # j = 1, 2
    assert scales[7] == 1.0  # j = 3 = W: warm-up over


def stable_reference(grads, b1, b2, eps, d):
    """StableAdamW's update (Wortsman et al. 2023, reference implementation), float64."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(grads[0], np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        rms = np.sqrt(np.mean(g**2 / np.maximum(v_hat, eps**2)))
        out.append((m_hat / (np.sqrt(v_hat) + eps) / max(1.0, rms / d), rms))
    return out


def test_update_clipping_matches_reference_on_underestimated_second_moments():
    rng = np.random.default_rng(1)
    small = 1e-3 * rng.normal(size=(30, 8)).astype(np.float32)
    # From step 20 on the gradient is 100x what the second moment has seen.
    grads = np.concatenate([small[:20], 100 * small[20:]])
    tx = adaptx.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8, update_rms_clip=1.0)
    ref = stable_reference(grads, 0.9, 0.99, 1e-8, 1.0)
    state = tx.init(jnp.zeros(8))
    clipped_steps = 0
    for t in range(len(grads)):
        u, state = tx.update(jnp.asarray(grads[t]), state)
        expected, rms = ref[t]
        np.testing.assert_allclose(u, expected, rtol=2e-4, atol=1e-7, err_msg=f"step {t + 1}")
        np.testing.assert_allclose(float(state.max_update_rms), rms, rtol=1e-4)
        assert int(state.tensors_clipped) == int(rms > 1.0)
        clipped_steps += int(rms > 1.0)
    assert clipped_steps >= 3


def test_update_clipping_is_per_tensor():
    tx = adaptx.scale_by_adam(b2=0.99, update_rms_clip=1.0)
    params = {"calm": jnp.zeros(4), "spiky": jnp.zeros(4)}
    state = tx.init(params)
    for _ in range(10):
        _, state = tx.update({"calm": jnp.ones(4), "spiky": jnp.ones(4)}, state)
    plain = adaptx.scale_by_adam(b2=0.99)
    pstate = plain.init(params)
    for _ in range(10):
        _, pstate = plain.update({"calm": jnp.ones(4), "spiky": jnp.ones(4)}, pstate)
    g = {"calm": jnp.ones(4), "spiky": jnp.full(4, 1e3)}
    u, state = tx.update(g, state)
    u_plain, _ = plain.update(g, pstate)
    np.testing.assert_allclose(u["calm"], u_plain["calm"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(u["spiky"]))) < float(jnp.max(jnp.abs(u_plain["spiky"])))
    assert int(state.tensors_clipped) == 1


def test_defaults_are_unchanged_and_state_is_plain():
    state = adaptx.scale_by_adam().init(jnp.zeros(2))
    assert type(state) is adaptx.ScaleByAdamState
    assert adaptx.telemetry(state) == {}


def test_telemetry_reports_spam_and_clipping_figures():
    tx = adaptx.scale_by_adam(spike_threshold=5000.0, update_rms_clip=1.0)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    assert set(adaptx.telemetry(state)) == {
        "scale_by_adam/spikes",
        "scale_by_adam/tensors_clipped",
        "scale_by_adam/max_update_rms",
        "scale_by_adam/momentum_scale",
    }


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"spike_threshold": 0.0}, "spike_threshold"),
        ({"spike_threshold": -5.0}, "spike_threshold"),
        ({"update_rms_clip": -1.0}, "update_rms_clip"),
        ({"reset_interval": 0}, "reset_interval"),
        ({"reset_interval": 2.5}, "reset_interval"),
        ({"reset_warmup": -1}, "reset_warmup"),
        ({"spike_start": -3}, "spike_start"),
    ],
)
def test_bad_defense_settings_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        adaptx.scale_by_adam(**kwargs)
