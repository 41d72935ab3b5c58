"""The stability benchmark runs end to end in its quick configuration, and its protocol is
fair: faults where the text says, calibration and report on disjoint runs, every part of a
defense counted.

No timing is asserted; the structure of the output and the scoring of known cases are.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bench.stability import defenses, faults, observe, peers, record, replay, run


def _trace(n: int = 400, seed: int = 0) -> dict:
    norms = np.exp(np.random.default_rng(seed).normal(0.0, 0.1, n)).astype(np.float32)
    return {"grad_norm": norms, "loss": np.ones(n, np.float32)}


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "stab"
    run.main(
        ["--quick", "--out", str(out), "--defenses", "none,adaptx.robust_adamw,optax clip 1.0"]
    )
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) == {"meta", "scores", "cost"}
    assert res["meta"]["quick"] is True
    splits = {m["split"] for m in res["meta"]["traces"].values()}
    assert splits == {"calibration", "held-out"}
    for per in res["scores"].values():
        for s in per.values():
            assert 0.0 <= s["steady_rate"] <= 1.0 and 0.0 <= s["warmup_rate"] <= 1.0
            assert set(s["steady_recall"]) == set(faults.KINDS)
            assert set(s["warmup_recall"]) == set(faults.KINDS)
    assert math.isfinite(res["cost"]["adaptx.robust_adamw"]["ratio"])
    text = out.with_suffix(".md").read_text()
    assert "| `adaptx.robust_adamw` |" in text


def test_step_costs_can_be_read_from_an_earlier_timed_run_with_its_provenance(tmp_path):
    earlier = tmp_path / "timed.json"
    cost = {"adaptx.adamw": {"ms": 8.0, "ratio": 1.0, "min": 1.0, "max": 1.0}}
    meta = {"command": "python -m bench.stability", "date": "2026-01-02", "jax": "0.1"}
    earlier.write_text(json.dumps({"meta": {**meta, "device": "cpu:0"}, "cost": cost}))
    out = tmp_path / "stab"
    run.main(["--quick", "--out", str(out), "--defenses", "none", "--cost-from", str(earlier)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["cost"] == cost  # not re-timed
    assert res["meta"]["cost_from"] == {**meta, "device": "cpu:0", "path": str(earlier)}
    assert (
        "Timed by `python -m bench.stability` on 2026-01-02" in out.with_suffix(".md").read_text()
    )
    # read again from the new result, the provenance stays the timed run's
    again = tmp_path / "again"
    run.main(
        ["--quick", "--out", str(again), "--defenses", "none", "--cost-from", str(out) + ".json"]
    )
    assert json.loads(again.with_suffix(".json").read_text())["meta"]["cost_from"]["path"] == str(
        earlier
    )


def test_cost_only_times_the_steps_on_the_named_tree_and_replays_nothing(tmp_path):
    out = tmp_path / "cost"
    run.main(["--cost-only", "--tree", "32,1,64", "--out", str(out), "--defenses", "none"])
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) == {"meta", "cost"}
    # 32x64 embed and head; per layer 32x96, 32x32, 32x128, 128x32, 32 and 128
    assert res["meta"]["cost_tree"] == {"leaves": 8, "parameters": 2 * 32 * 64 + 12448}
    assert set(res["cost"]) >= {"adaptx.adamw", "none"}
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Stability benchmark: step time")
    assert "a tree of 8 leaves, 0.0M parameters" in text and "## Traces" not in text


@pytest.mark.parametrize("tree", ["256,4", "a,b,c", "256,0,8192"])
def test_a_malformed_tree_is_refused_with_its_text(tree, capsys):
    with pytest.raises(SystemExit):
        run.main(["--cost-only", "--tree", tree, "--out", "unused"])
    err = capsys.readouterr().err
    assert "--tree" in err and repr(tree) in err


def test_no_defense_catches_nothing_and_a_skip_everything_rule_catches_all():
    trace = _trace()
    none = replay.score(defenses.by_name("none"), trace, seed=0)
    assert none["steady_rate"] == 0.0 and none["warmup_rate"] == 0.0
    assert none["steady_recall"]["spike 1e4x"] == 0.0 and none["steady_recall"]["nan"] == 0.0
    zero = defenses._chain("zero", "zeroes every gradient", optax.set_to_zero)
    everything = replay.score(zero, trace, seed=0)
    assert everything["steady_rate"] == 1.0
    assert all(v == 1.0 for v in everything["steady_recall"].values())
    assert all(v == 1.0 for v in everything["warmup_recall"].values())


def test_window_rule_is_blinded_by_a_nan_for_its_window():
    """As read from the published code: a NaN enters the window, and every step after it
    is skipped until it rolls out (the comparison with a NaN mean is false)."""
    norms = np.ones(300, np.float32) + 0.01 * np.arange(300, dtype=np.float32) % 0.05
    losses = norms.copy()
    norms[150], losses[150] = np.nan, np.nan
    step = replay.observe_one(defenses.by_name("MaxText (no clip, skip)"), norms, losses)
    assert np.all(step.skip[151 : 151 + 128])
    assert not np.any(step.skip[151 + 128 :])


def test_maxtext_measures_the_norm_after_its_clip():
    tx = peers.maxtext(optax.sgd(0.1), clip=1.0)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    for g in (0.1, 100.0, 5.0):
        _, state = tx.update({"w": jnp.full(4, g)}, state, params, value=jnp.float32(1.0))
    assert float(state.norms.max()) <= 1.0 + 1e-6


def test_steady_state_faults_never_land_inside_a_window():
    for n in (300, 400, 636, 800, 2000):
        for seed in range(50):
            steps = faults.steady_steps(n, seed)
            assert steps.size >= 1
            assert steps[0] > faults.LONGEST_WINDOW  # every window full before the first
            assert np.all(np.diff(steps) > faults.LONGEST_WINDOW)  # the last fault has left
            assert steps[-1] < n - faults.AFTERSHOCK
            warm = faults.warmup_steps(seed)
            assert warm[0] == 0 and np.all(warm < faults.WARMUP_END)
            assert faults.WARMUP_END <= 64  # before any window rule may skip


def test_calibration_and_held_out_runs_do_not_overlap():
    meta = json.loads((run.HERE / "traces.json").read_text())
    run.check_split(meta)
    calib = {n for n, m in meta.items() if m["split"] == "calibration"}
    held = {n for n, m in meta.items() if m["split"] == "held-out"}
    assert calib and held and not calib & held and calib | held == set(meta)
    assert calib == set(record.CALIBRATION)
    # The held-out runs include kinds the calibration never saw (another optimizer).
    assert {meta[n]["optimizer"] for n in held} - {meta[n]["optimizer"] for n in calib}


def test_the_pick_reads_calibration_runs_only():
    meta = {
        "a": {"split": "calibration", "healthy": True},
        "b": {"split": "held-out", "healthy": True},
    }
    good = replay.score(defenses.by_name("adaptx.robust_adamw"), _trace(), seed=0)
    bad = replay.score(defenses.by_name("none"), _trace(), seed=0)
    rows = [
        {"hp": {}, "per_trace": {"a": bad, "b": good}},
        {"hp": {}, "per_trace": {"a": good, "b": bad}},
    ]
    assert run.pick(rows, meta) == 1
    rows[1]["per_trace"]["b"] = good  # held-out scores change: the pick does not
    assert run.pick(rows, meta) == 1


def test_an_update_clip_counts_as_an_intervention():
    """With a fixed direction Adam's update RMS is about 1: a clip at 0.5 acts on every step."""
    clipped = defenses._recipe(
        "clipped", "", lambda **hp: defenses.robust(update_rms_clip=0.5, **hp)
    )
    trace = _trace()
    step = replay.observe_one(clipped, trace["grad_norm"], trace["loss"])
    assert np.all(step.update_clip[1:])
    assert np.all(replay.intervened(step)[1:])
    s = replay.score(clipped, trace, seed=0)
    assert s["steady_parts"]["update_clip"] == 1.0 and s["steady_rate"] == 1.0


def test_the_tap_sees_what_reaches_adam():
    tx = optax.chain(optax.clip_by_global_norm(1.0), observe.tap())
    params = {"w": jnp.zeros(4)}
    _, state = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    assert abs(float(state[1].norm) - 1.0) < 1e-5


def test_the_cnn_trace_trains_its_batchnorm_statistics_and_records_every_step():
    from types import SimpleNamespace

    from bench.stability import cnn

    data = record.example("data")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (64, 12)).astype(np.int32)
    tokens[:, 8:] = 0  # padding
    labels = (tokens[:, 0] > 25).astype(np.int32)
    split = data.Split(tokens, labels)
    ds = SimpleNamespace(train=split, test=split, encoder=SimpleNamespace(vocab=[""] * 50))
    ds.num_classes = 2
    out = cnn.train(ds, optax.adamw(1e-2), steps=20, seed=0, batch_size=16, batches=data.batches)
    assert len(out["history"]) == 20  # 4 batches an epoch: reshuffled and run again
    assert all(np.isfinite([h["loss"] for h in out["history"]]))
    assert all(h["grad_norm"] > 0 for h in out["history"])
    # the forward pass wrote BatchNorm's running statistics, and the test pass used them
    assert float(jnp.abs(out["model"].bn1.mean[...]).max()) > 0
    assert 0.0 <= out["test_accuracy"] <= 1.0
    # an injected spike multiplies the gradient of its step alone
    spiked = cnn.train(ds, optax.adamw(1e-2), 5, 0, 16, data.batches, spikes={3: 10.0})["history"]
    norms = [h["grad_norm"] for h in out["history"][:5]]
    assert [h["grad_norm"] for h in spiked[:3]] == pytest.approx(norms[:3], rel=1e-5)
    assert spiked[3]["grad_norm"] == pytest.approx(10 * norms[3], rel=1e-4)
    with pytest.raises(ValueError, match="batch_size=128 is more than the 64"):
        cnn.train(ds, optax.adamw(1e-2), steps=1, seed=0, batch_size=128, batches=data.batches)
