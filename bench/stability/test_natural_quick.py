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
    # the recurrent cell draws minibatches and is read on its fixed batch; the full-batch not
    assert data["results"]["rnn_addition"]["addition T=10"]["fixed_batch"] is True
    assert data["results"]["adam_spikes"]["w16 d1 smooth lr0.01"]["fixed_batch"] is False
    assert "episodes of the minibatch loss" in text
    assert "## How much of the late-loss condition is seed noise" in text
    # re-written from the recorded cells, it keeps the date they were trained
    sweep.main(["--quick", "--families", "", "--merge", "--out", str(out)])
    again = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert again["date"] == data["meta"]["date"] and "rendered" in again
    assert "from the recorded cells, with no training" in out.with_suffix(".md").read_text()


def _noisy_workload(fixed: bool):
    """A one-parameter fit whose minibatch loss is the fixed loss times a factor that is
    1 or 20 from batch to batch: sampling noise, with no jump of the parameters at all."""
    import jax
    import jax.numpy as jnp

    from bench.stability.natural import runner

    def fit(p):
        return 1e-3 + (p["x"] - 1.0) ** 2

    def loss(p, key):
        return fit(p) * jnp.where(jax.random.bernoulli(key, 0.05), 20.0, 1.0)

    return runner.Workload(
        name="noisy",
        family="test",
        init=lambda key: {"x": jnp.zeros([])},
        loss=loss,
        steps=400,
        learning_rate=0.05,
        eval_loss=fit if fixed else None,
    )


def test_a_stochastic_workload_is_read_on_its_fixed_batch_and_its_noise_kept_apart():
    import optax

    from bench.stability.natural import runner

    curves = runner.train(_noisy_workload(fixed=True), optax.adam(0.05), seeds=2)
    assert curves.fixed is not None and curves.fixed.shape == curves.train.shape == (2, 400)
    assert curves.watched is curves.fixed
    for fixed, minibatch in zip(curves.fixed, curves.train, strict=True):
        figs = metrics.run_figures(fixed, None, minibatch)
        # the minibatch's 20x draws are spikes of the rule; the parameters never jumped
        assert figs["minibatch_episodes"] >= 5 and figs["episodes"] == 0
    # a full-batch workload has one curve, and the figures read it
    full = runner.train(_noisy_workload(fixed=False), optax.adam(0.05), seeds=1)
    assert full.fixed is None and full.watched is full.train


def test_cells_run_differently_are_replaced_not_mixed_on_merge():
    cell = {"steps": 10, "seeds": 3, "fixed_batch": True, "optimizers": {"a": 1}, "kinds": {}}
    results = {"f": {"w": {**cell, "optimizers": {"a": 0, "b": 0}}}}
    sweep._merge(results, {"f": {"w": cell}})
    assert results["f"]["w"]["optimizers"] == {"a": 1, "b": 0}  # run alike: rows updated
    more = {**cell, "seeds": 10, "optimizers": {"a": 2}}
    sweep._merge(results, {"f": {"w": more}})
    assert results["f"]["w"]["optimizers"] == {"a": 2}  # more seeds: the cell is replaced


def test_rescore_recomputes_failures_at_the_workloads_current_level():
    (w,) = [w for w in sweep.FAMILIES["rnn"].variants(True)]  # the quick adding problem
    runs = [{"late": late, "failed": False} for late in (0.01, 0.5, float("inf"))]
    cell = {"fail_above": None, "optimizers": {"a": {"per_seed": runs, "fail_rate": 0.0}}}
    results = {w.family: {w.name: cell}, "other": {"not a workload": {"optimizers": {}}}}
    sweep.rescore(results, quick=True)
    assert cell["fail_above"] == w.fail_above
    assert [r["failed"] for r in runs] == [False, True, True]
    assert abs(cell["optimizers"]["a"]["fail_rate"] - 2 / 3) < 1e-12


def test_a_language_model_fails_at_the_unigram_models_loss_on_its_own_fixed_batch():
    import jax.numpy as jnp
    import numpy as np

    from bench.stability.natural import post_ln, runner, text

    (w,) = post_ln.variants(True)  # 8-character windows
    data = text.stream()
    _, targets = text.batch(runner.fixed_key(), jnp.asarray(data), post_ln.FIXED_WINDOWS, 8)
    freq = np.bincount(data, minlength=len(text.VOCAB)) / data.size
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(freq, jnp.float32)), (*targets.shape, freq.size))
    at_the_level = float(text.cross_entropy(logits, targets))
    assert abs(w.fail_above - at_the_level) < 1e-4
    # the whole text's entropy is another number: a stalled model would pass or fail by luck
    assert abs(w.fail_above - text.unigram_loss(data)) > 1e-3


def test_the_late_condition_against_a_rerun_allows_for_no_more_than_the_seeds_spread():
    flat = [1.0] * 6
    assert goal.chance_late_ok(flat, flat) == 1.0  # no spread: a re-run is the same
    assert goal.chance_late_ok([2.0] * 6, flat) == 0.0  # 2x worse on every seed: never
    assert goal.chance_late_ok([float("inf")] * 3, [float("inf")] * 3) == 1.0  # a tie
    assert goal.chance_late_ok([float("inf")] * 3, flat) == 0.0
    # one optimizer against a re-run of itself, seeds spread 25x: about a coin's toss,
    # not the certainty that comparing one set of seeds with itself would give
    spread = list(np.geomspace(1e-7, 2.5e-6, 10))
    assert 0.4 < goal.chance_late_ok(spread, spread) < 0.8
    assert goal.chance_late_ok(spread, spread, seed=1) != goal.chance_late_ok(spread, spread)


def test_every_workload_is_in_exactly_one_split_and_each_family_keeps_one_held_out():
    names = [w.name for fam in sweep.FAMILIES.values() for w in fam.variants(False)]
    assert set(goal.CALIBRATION) <= set(names)  # no stale name
    for fam in sweep.FAMILIES.values():
        split = [goal.split(w.name) for w in fam.variants(False)]
        assert "held-out" in split  # every family is reported on a workload not tuned on
        assert split.count("calibration") <= 1
