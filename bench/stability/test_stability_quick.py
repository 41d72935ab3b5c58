"""The stability benchmark runs end to end in its quick configuration, and its scoring is right.

No timing is asserted; the structure of the output and the scoring of known cases are.
"""

from __future__ import annotations

import json
import math

import numpy as np
import optax

from bench.stability import defenses, faults, peers, replay, run


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "stab"
    run.main(
        ["--quick", "--out", str(out), "--defenses", "none,adaptx.robust_adamw,optax clip 1.0"]
    )
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) == {"meta", "scores", "cost"}
    assert res["meta"]["quick"] is True
    for per in res["scores"].values():
        for s in per.values():
            assert 0.0 <= s["healthy_rate"] <= 1.0
            assert set(s["recall"]) == set(faults.KINDS)
    assert math.isfinite(res["cost"]["adaptx.robust_adamw"]["ratio"])
    text = out.with_suffix(".md").read_text()
    assert "| `adaptx.robust_adamw` |" in text


def test_no_defense_catches_nothing_and_a_skip_everything_rule_catches_all():
    norms = np.exp(np.random.default_rng(0).normal(0.0, 0.1, 300)).astype(np.float32)
    trace = {"grad_norm": norms, "loss": np.ones(300, np.float32)}
    none = replay.score(defenses.by_name("none"), trace, seed=0)
    assert none["healthy_rate"] == 0.0
    assert none["recall"]["spike 1e4x"] == 0.0 and none["recall"]["nan"] == 0.0
    zero = defenses.Defense(
        "zero", lambda: optax.set_to_zero(), {}, defenses._out, None, "skips everything"
    )
    everything = replay.score(zero, trace, seed=0)
    assert everything["healthy_rate"] == 1.0
    assert all(v == 1.0 for v in everything["recall"].values())


def test_window_rule_is_blinded_by_a_nan_for_its_window():
    """As read from the published code: a NaN enters the window, and every step after it
    is skipped until it rolls out (the comparison with a NaN mean is false)."""
    norms = np.ones(300, np.float32) + 0.01 * np.arange(300, dtype=np.float32) % 0.05
    losses = norms.copy()
    norms[150], losses[150] = np.nan, np.nan
    d = defenses.Defense("w", lambda: peers.maxtext(optax.identity()), {}, defenses._out, None, "")
    passed = replay.passed_norms(d, norms, losses)
    assert np.all(passed[151 : 151 + 128] == 0.0)
    assert np.all(passed[151 + 128 :] > 0.0)


def test_fault_steps_start_in_the_warm_up_and_leave_room_for_aftershocks():
    steps = faults.fault_steps(600, seed=3)
    assert 1 <= steps[0] < 30
    assert np.all(np.diff(steps) >= faults.AFTERSHOCK + 10)
    assert steps[-1] < 600 - faults.AFTERSHOCK
