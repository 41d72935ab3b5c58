"""The natural-instability benchmark: its metrics on constructed loss curves, and a quick run.

No timing is asserted; the scoring of known curves and the structure of the output are.
"""

from __future__ import annotations

import json

import numpy as np

from bench.stability.natural import goal, metrics, sweep


def test_a_jump_above_ten_times_the_recent_minimum_is_one_episode_however_long():
    loss = np.ones(1000)
    loss[100:105] = 20.0  # one episode of five steps
    loss[300] = np.nan  # a non-finite loss is an episode
    loss[500:510] = 5.0  # 5x the minimum: not a spike
    loss[700] = 11.0  # just above 10x
    assert metrics.spike_episodes(loss) == 3
    assert metrics.spiking(loss).sum() == 5 + 1 + 1


def test_the_reference_is_the_minimum_of_the_previous_window_only():
    loss = np.concatenate([np.full(10, 0.01), np.ones(300)])
    # the jump from 0.01 to 1 is an episode until the 0.01 steps leave the 200-step window
    flag = metrics.spiking(loss)
    assert flag[10] and flag[209] and not flag[210]
    assert metrics.spike_episodes(loss) == 1
    assert metrics.spike_episodes(loss, window=5) == 1
    assert metrics.spiking(loss, window=5)[14] and not metrics.spiking(loss, window=5)[15]


def test_a_decreasing_curve_has_no_episode_and_a_sawtooth_has_one_per_tooth():
    assert metrics.spike_episodes(np.geomspace(10.0, 1e-6, 2000)) == 0
    saw = np.tile(np.geomspace(1.0, 1e-3, 100), 10)  # each restart is 1000x the previous step
    assert metrics.spike_episodes(saw) == 9


def test_late_loss_is_the_median_of_the_last_fifth_and_counts_nan_as_inf():
    loss = np.arange(100, dtype=np.float64)  # last 20 steps: 80..99, median 89.5
    assert metrics.late_loss(loss) == 89.5
    loss[-11:] = np.nan  # most of the last fifth diverged
    assert metrics.late_loss(loss) == np.inf
    assert metrics.final_loss(loss) == np.inf
    figs = metrics.run_figures(loss, fail_above=50.0)
    assert figs["failed"] and figs["nonfinite"]


def test_figures_over_seeds_give_median_min_max_and_failure_rate():
    runs = [
        {"episodes": e, "late": x, "final": x, "failed": f, "nonfinite": False}
        for e, x, f in [(1, 0.1, False), (5, 0.3, True), (3, 0.2, False)]
    ]
    s = metrics.over_seeds(runs)
    assert s["episodes"] == {"median": 3.0, "min": 1.0, "max": 5.0, "total": 9.0}
    assert s["late"]["median"] == 0.2 and abs(s["fail_rate"] - 1 / 3) < 1e-12


def _fig(episodes, late, fail):
    return {"episodes": {"total": episodes}, "late": {"median": late}, "fail_rate": fail}


def test_goal_needs_a_quarter_of_the_reference_episodes_and_a_late_loss_within_ten_percent():
    per = {
        "optax clip 1 + adamw": _fig(40, 1e-3, 0.0),
        "optax adam": _fig(100, 1e-4, 0.0),
        "cand": _fig(10, 1.09e-4, 0.0),
    }
    kinds = {"optax clip 1 + adamw": "optax", "optax adam": "optax", "cand": "adaptx"}
    g = goal.check("cand", per, kinds)
    assert g["episodes_ok"] and g["failures_ok"] and g["late_ok"] and g["met"]
    per["cand"] = _fig(11, 1.09e-4, 0.0)
    assert not goal.check("cand", per, kinds)["met"]
    per["cand"] = _fig(0, 1.2e-4, 0.0)
    assert not goal.check("cand", per, kinds)["late_ok"]
    assert goal.check("absent", per, kinds) is None


def test_goal_on_a_recurrent_task_compares_success_with_the_best_fixed_clip():
    per = {
        "optax clip 1 + sgd": _fig(4, 0.05, 2 / 3),
        "optax clip 0.1 + sgd": _fig(0, 0.03, 0.0),
        "cand": _fig(0, 0.03, 1 / 3),
    }
    kinds = {"optax clip 1 + sgd": "optax", "optax clip 0.1 + sgd": "optax", "cand": "adaptx"}
    g = goal.check("cand", per, kinds)
    assert g["reference"] == "optax clip 1 + sgd"
    assert g["success"] == (1 - 1 / 3, 1.0) and not g["success_ok"] and not g["met"]


def test_quick_run_writes_a_table_per_workload_and_the_goal(tmp_path):
    out = tmp_path / "natural"
    res = sweep.main(["--quick", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["jax"]
    assert set(data["results"]) == set(res["results"])
    for per_w in data["results"].values():
        for cell in per_w.values():
            for s in cell["optimizers"].values():
                assert s["seeds"] == 2 and 0.0 <= s["fail_rate"] <= 1.0
    text = out.with_suffix(".md").read_text()
    assert "| `adaptx.robust_adamw` |" in text
    assert "## The goal, per workload" in text
