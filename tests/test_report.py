"""``adaptx.report``: reading a metrics log, finding its events, the summary, the picture, the CLI.

Every log here is synthetic and written to ``tmp_path``, except in the last test, which
trains the text classifier example for a few seconds and reports on its log.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptx import report
from adaptx.report import _output

ROOT = Path(__file__).resolve().parent.parent
TENSORS = ["embed/embedding", "encoder/layers_0/attn/qkv/kernel", "encoder/layers_0/mlp/kernel"]


def healthy_rows(n: int = 60, seed: int = 0, tensors: list[str] | None = None) -> list[dict]:
    """Per-step records of a quiet run guarded by ``adaptx.guard(clip_spikes(...))``."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n):
        norm = float(1.0 + 0.05 * rng.standard_normal())
        row = {
            "step": step,
            "loss": 2.0 * math.exp(-step / 30) + 0.3,
            "accuracy": 0.5,
            "grad_norm": norm,
            "guard/grad_norm": norm,
            "guard/skipped": 0,
            "guard/last_reason": 0,
            "guard/forced": 0,
            "clip_spikes/grad_norm": norm,
            "clip_spikes/threshold": 4.0,
            "clip_spikes/scale": 1.0,
            "clip_spikes/spike": 0,
        }
        for i, name in enumerate(tensors or []):
            # Squared norms in proportions 1 : 2 : 1, so the total is the norm above.
            weight = (2.0 if i == 1 else 1.0) / (len(tensors) + 1)
            row[f"clip_spikes/tensor_grad_norm/{name}"] = norm * math.sqrt(weight)
        rows.append(row)
    return rows


def write_log(path: Path, rows: list[dict], tail: str = "") -> Path:
    """Writes ``rows`` as the example does (non-finite floats as strings), then ``tail``."""

    def value(v):
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: value(v) for k, v in r.items()}) + "\n" for r in rows]
    path.write_text("".join(lines) + tail)
    return path


def skip_spike(rows: list[dict], step: int, norm: float) -> None:
    """Turns ``step`` into a norm spike the guard skipped (clip_spikes' figures stay stale)."""
    for row in rows[step:]:
        row["guard/skipped"] += 1
    rows[step].update({"grad_norm": norm, "guard/grad_norm": norm, "guard/last_reason": 2})


# ----------------------------------------------------------------------------- events


def test_healthy_run_has_no_events(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", healthy_rows())
    records = report.read_metrics(log)
    assert len(records) == 60 and records[0]["guard/last_reason"] == 0
    assert report.summarize(records) == []
    text = report.format_summary(records)
    assert text.splitlines() == [
        "60 steps (0-59), 0 events",
        "no events: no step was skipped, clipped or rewound, none non-finite",
    ]


def test_guard_skipped_spike_is_reported_with_its_ratio(tmp_path):
    rows = healthy_rows()
    previous = [r["grad_norm"] for r in rows[:40]]
    skip_spike(rows, 40, 3.1e4)
    # The stale inner figures of a skipped step are not a clip of their own.
    rows[40]["clip_spikes/scale"] = 0.2
    events = report.summarize(report.read_metrics(write_log(tmp_path / "m.jsonl", rows)))
    assert len(events) == 1
    (e,) = events
    assert (e.step, e.kind, e.grad_norm) == (40, "skip_spike", 3.1e4)
    np.testing.assert_allclose(e.ratio, 3.1e4 / np.median(previous), rtol=1e-12)
    assert e.tensor is None and e.share is None
    assert e.actions == ("skipped by guard (gradient-norm spike)",)
    ratio = report._events.number(e.ratio)
    assert str(e) == (
        f"step 40: grad norm 3.1e4 ({ratio}x its running median); "
        "skipped by guard (gradient-norm spike)"
    )
    assert ratio.startswith("3.") and ratio.endswith("e4")


def test_spike_steps_do_not_raise_the_running_median():
    rows = healthy_rows()
    skip_spike(rows, 30, 1e3)
    skip_spike(rows, 31, 1e3)
    second = report.summarize(rows)[1]
    assert second.step == 31 and 900 < second.ratio < 1100


def test_per_tensor_norms_name_the_tensor_holding_the_spike(tmp_path):
    rows = healthy_rows(tensors=TENSORS)
    skip_spike(rows, 45, 0.0)
    qkv = "clip_spikes/tensor_grad_norm/encoder/layers_0/attn/qkv/kernel"
    rows[45][qkv] = 300.0
    squares = [rows[45][f"clip_spikes/tensor_grad_norm/{t}"] ** 2 for t in TENSORS]
    rows[45]["grad_norm"] = rows[45]["guard/grad_norm"] = math.sqrt(sum(squares))
    write_log(tmp_path / "metrics.jsonl", rows)
    (e,) = report.summarize(report.read_metrics(tmp_path))
    assert e.tensor == "encoder/layers_0/attn/qkv/kernel"
    np.testing.assert_allclose(e.share, 300.0**2 / sum(squares), rtol=1e-9)
    assert e.share > 0.99
    assert "100 % of it in encoder/layers_0/attn/qkv/kernel" in str(e)
    text = report.format_summary(report.read_metrics(tmp_path))
    assert text.splitlines()[-1] == (
        "tensors that led the most events: encoder/layers_0/attn/qkv/kernel (1)"
    )


def test_leading_tensor_share_and_non_finite_tensor():
    keys = {t: f"g/tensor_grad_norm/{t}" for t in "abc"}
    row = {"g/tensor_grad_norm/a": 1.0, "g/tensor_grad_norm/b": 3.0, "g/tensor_grad_norm/c": 0.0}
    assert report.leading_tensor(row, keys) == ("b", 0.9)
    row["g/tensor_grad_norm/c"] = "inf"
    assert report.leading_tensor(row, keys) == ("c", None)
    assert report.leading_tensor({}, keys) == (None, None)


def test_nan_and_inf_strings_and_json_literals(tmp_path):
    rows = healthy_rows(20)
    for r in rows:  # no guard: a non-finite step goes through
        for k in [k for k in r if k.startswith("guard/")]:
            del r[k]
    rows[5]["loss"] = math.nan
    rows[9]["grad_norm"] = math.inf
    lines = [json.dumps(r) + "\n" for r in rows]  # NaN / Infinity literals
    lines[12] = lines[12].replace(str(rows[12]["loss"]), '"-inf"')
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    records = report.read_metrics(tmp_path)
    assert math.isnan(records[5]["loss"]) and records[9]["grad_norm"] == math.inf
    assert records[12]["loss"] == -math.inf
    events = report.summarize(records)
    assert [(e.step, e.kind) for e in events] == [
        (5, "nonfinite"),
        (9, "nonfinite"),
        (12, "nonfinite"),
    ]
    assert events[0].actions == ("non-finite loss, not skipped",)
    assert events[1].ratio is None and str(events[1]).startswith("step 9: grad norm inf; ")
    assert events[1].actions == ("non-finite gradient norm, not skipped",)


# The rule for each kind, on a two-line log (the event at step 6).
RULES = [
    ({"guard/last_reason": 0}, {"guard/last_reason": 1}, "skip_nonfinite", "skipped by guard"),
    ({"guard/last_reason": 0}, {"guard/last_reason": 3}, "skip_nonfinite_loss", "loss)"),
    ({"guard/last_reason": 0}, {"guard/last_reason": 4}, "skip_loss_spike", "(loss spike)"),
    ({"1/guard/last_reason": 0}, {"1/guard/last_reason": 2}, "skip_spike", "by 1/guard ("),
    ({"guard/last_reason": 0}, {"guard/last_reason": 5}, "skip_max_grad_norm", "max_grad_norm)"),
    ({"guard/last_reason": 0}, {"guard/last_reason": 6}, "skip_max_loss", "(loss above max_loss)"),
    ({"guard/last_reason": 0}, {"guard/last_reason": 9}, "skip", "(reason 9)"),
    ({"guard/skipped": 0}, {"guard/skipped": 1}, "skip", "skipped by guard"),
    (
        {"dynamic_loss_scale/nonfinite_skipped": 3, "dynamic_loss_scale/scale": 2.0**15},
        {"dynamic_loss_scale/nonfinite_skipped": 4, "dynamic_loss_scale/scale": 2.0**14},
        "skip_nonfinite",
        "skipped by dynamic_loss_scale (non-finite gradients)",
    ),
    ({"zclip/num_skipped": 0}, {"zclip/num_skipped": 1}, "skip_spike", "zeroed by zclip"),
    ({"rewind/rewinds": 0}, {"rewind/rewinds": 1, "rewind/lr_scale": 0.5}, "rewind", "(lr scale"),
    ({"guard/forced": 2}, {"guard/forced": 3}, "forced", "max_consecutive_skips"),
    ({"clip_spikes/spike": 0}, {"clip_spikes/spike": 1, "clip_spikes/scale": 0.1}, "spike", ""),
    ({"zclip/spike": 0}, {"zclip/spike": 1}, "spike", "spike clipped by zclip"),
    ({"0/clip_by_global_norm/scale": 1.0}, {"0/clip_by_global_norm/scale": 0.5}, "clip", "0.5)"),
    ({"autoclip/scale": 1.0}, {"autoclip/scale": 0.98}, "clip", "clipped by autoclip"),
    (
        {"adagc/tensors_clipped": 0},
        {"adagc/tensors_clipped": 3},
        "clip",
        "3 tensors clipped by adagc",
    ),
    (
        {"clip_by_block_rms/tensors_clipped": 0},
        {"clip_by_block_rms/tensors_clipped": 2},
        "clip",
        "2 t",
    ),
    (
        {"scale_by_adam/tensors_clipped": 0},
        {"scale_by_adam/tensors_clipped": 1},
        "clip",
        "1 tensor clipped by scale_by_adam",
    ),
    # a transform the report has never heard of, read by its counters' names alone
    ({"new_clip/num_clipped": 4}, {"new_clip/num_clipped": 5}, "clip", "clipped by new_clip"),
    ({"new_clip/tensors_clipped": 0}, {"new_clip/tensors_clipped": 1}, "clip", "1 tensor clipped"),
    ({"new_guard/nonfinite_skipped": 0}, {"new_guard/nonfinite_skipped": 1}, "skip_nonfinite", ""),
]


@pytest.mark.parametrize("before, after, kind, phrase", RULES)
def test_event_rules(before, after, kind, phrase):
    rows = [{"step": 5, "loss": 1.0, **before}, {"step": 6, "loss": 1.0, **after}]
    (e,) = report.summarize(rows)
    assert (e.step, e.kind) == (6, kind)
    assert phrase in " ".join(e.actions)


@pytest.mark.parametrize(
    "rows",
    [
        # a loss scale below 0.99 is no clip; neither is an unclipped step (scale 0.995)
        [{"step": 0, "dynamic_loss_scale/scale": 0.5, "clip_by_global_norm/scale": 0.995}],
        # cumulative counters that stay put, and a cumulative num_clipped that went up on
        # a clip by less than 1 % (its scale says so)
        [
            {
                "step": s,
                "guard/skipped": 4,
                "clip_spikes/num_clipped": s,
                "clip_spikes/scale": 0.995,
            }
            for s in (7, 8)
        ],
        # the first line of a resumed log: its counters are not news
        [{"step": 100, "guard/skipped": 4, "rewind/rewinds": 1, "loss": 1.0}],
    ],
)
def test_not_events(rows):
    assert report.summarize(rows) == []


def test_counters_start_from_zero_at_step_zero():
    (e,) = report.summarize([{"step": 0, "guard/skipped": 1, "loss": 1.0}])
    assert (e.step, e.kind) == (0, "skip")


def test_epoch_summary_lines_are_not_steps():
    rows = healthy_rows(4)
    rows.insert(2, {"epoch": 1, "step": 2, "train_loss": math.nan, "val_loss": math.nan})
    assert report.summarize(rows) == []
    assert report.format_summary(rows).startswith("4 steps (0-3), 0 events")


def test_summary_caps_event_lines_and_counts_kinds():
    rows = healthy_rows(60)
    for r in rows[10:40]:
        r["clip_spikes/scale"] = 0.5
    skip_spike(rows, 50, 100.0)
    lines = report.format_summary(rows, max_events=20, source="run").splitlines()
    assert lines[0] == "run: 60 steps (0-59), 31 events"
    assert len(lines) == 1 + 20 + 2
    assert lines[21] == "... and 11 more"
    assert lines[22] == "interventions: 1 skipped (gradient-norm spike), 30 clipped"


# ----------------------------------------------------------------------------- reading


def test_truncated_last_line_warns_and_is_skipped(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", healthy_rows(10), tail='{"step": 10, "loss": 0.')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped line 11, .*stopped"):
        records = report.read_metrics(log)
    assert len(records) == 10 and records[-1]["step"] == 9
    assert report.main([str(log), "--no-plot"]) == 0  # (the CLI prints the warning)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ("step,loss\n0,0.5\n1,0.4\n", "line 1 is not JSON"),
        ('{\n  "step": 0,\n  "loss": 1.0\n}\n', "line 1 is not JSON"),
        ('{"step": 0, "loss": 1.0}\nnot json\n{"step": 2}\n', "line 2 is not JSON"),
        ("[1, 2]\n[3, 4]\n", "line 1 is a JSON list, not an object"),
        ('{"text": "a fine film", "label": "pos"}\n', "no line holds a numeric per-step field"),
        ("hello\n", "line 1 is not JSON"),
    ],
)
def test_not_a_log_is_a_clear_error(tmp_path, capsys, content, problem):
    path = tmp_path / "notes.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as info:
        report.read_metrics(path)
    assert str(path) in str(info.value)
    assert report.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and problem in err
    assert not (tmp_path / "stability.png").exists()


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ValueError, match="not a text file"):
        report.read_metrics(path)


def test_directory_input(tmp_path, capsys):
    run = tmp_path / "run"
    write_log(run / "metrics.jsonl", healthy_rows(12))
    assert len(report.read_metrics(run)) == 12
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{run / 'metrics.jsonl'}: 12 steps (0-11), 0 events"
    assert _output.written_by_report(run / "stability.png")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "stability.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="without a metrics.jsonl"):
        report.read_metrics(empty)
    assert report.main([str(empty)]) == 2
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the picture


def test_refuses_to_overwrite_what_it_did_not_write(tmp_path, capsys):
    log = write_log(tmp_path / "metrics.jsonl", healthy_rows(8))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    before = log.read_bytes()
    for out, problem in [
        (log, "refusing to overwrite the metrics log"),
        (notes, "give a path ending in .png"),
        (tmp_path / "new.svg", "give a path ending in .png"),
        (foreign, "refusing to overwrite a file the report did not write"),
        (tmp_path, "give a path ending in .png"),
    ]:
        assert report.main([str(log), "--out", str(out)]) == 2, out
        assert problem in capsys.readouterr().err, out
    assert log.read_bytes() == before and notes.read_text() == "keep me"
    assert foreign.read_bytes() == b"\x89PNG\r\n\x1a\nnot ours"
    with pytest.raises(FileExistsError, match="did not write"):
        report.plot(healthy_rows(8), foreign)
    # Its own picture it replaces.
    mine = tmp_path / "again.png"
    assert report.main([str(log), "--out", str(mine)]) == 0
    first = mine.stat().st_mtime_ns
    os.utime(mine, ns=(first - 10**9, first - 10**9))
    assert report.main([str(log), "--out", str(mine)]) == 0
    assert mine.stat().st_mtime_ns > first - 10**9
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.png",
        "metrics.jsonl",
        "notes.txt",
        "photo.png",
    ]


def test_heat_map_only_with_per_tensor_norms(tmp_path):
    rows = healthy_rows(30)
    skip_spike(rows, 20, 50.0)
    assert report.plot(rows, tmp_path / "plain.png") == 2
    with_tensors = healthy_rows(30, tensors=TENSORS)
    skip_spike(with_tensors, 20, 50.0)
    with_tensors[25]["clip_spikes/tensor_grad_norm/embed/embedding"] = math.nan
    assert report.plot(with_tensors, tmp_path / "tensors.png") == 3
    for name in ("plain.png", "tensors.png"):
        assert _output.png_text(tmp_path / name)["Software"] == "adaptx.report"
        assert (tmp_path / name).stat().st_size > 10_000
    # Taller with the third panel (the PNG's height is in its IHDR chunk).
    heights = [
        int.from_bytes((tmp_path / n).read_bytes()[20:24], "big")
        for n in ("plain.png", "tensors.png")
    ]
    assert heights[1] > heights[0]


def test_plot_copes_with_a_log_without_loss_or_norm(tmp_path):
    rows = [{"step": s, "accuracy": 0.5} for s in range(5)]
    assert report.plot(rows, tmp_path / "bare.png") == 2
    with pytest.raises(ValueError, match="measures anything"):
        report.plot([{"step": 0}], tmp_path / "none.png")


# ----------------------------------------------------------------------------- the command line


def test_cli_end_to_end(tmp_path, capsys):
    rows = healthy_rows(80, tensors=TENSORS)
    skip_spike(rows, 50, 0.0)
    rows[50]["clip_spikes/tensor_grad_norm/encoder/layers_0/mlp/kernel"] = 2e4
    rows[50]["grad_norm"] = rows[50]["guard/grad_norm"] = 2e4
    rows[60]["loss"] = math.nan
    rows[60]["guard/last_reason"] = 3
    for r in rows[60:]:
        r["guard/skipped"] += 1
    log = write_log(tmp_path / "run" / "metrics.jsonl", rows)
    assert report.main([str(log)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{log}: 80 steps (0-79), 2 events"
    assert out[1].startswith("step 50: grad norm 2e4 (")
    assert out[1].endswith(
        "x its running median); 100 % of it in encoder/layers_0/mlp/kernel; "
        "skipped by guard (gradient-norm spike)"
    )
    assert out[2].startswith("step 60: grad norm ") and out[2].endswith("(non-finite loss)")
    assert out[3] == "interventions: 1 skipped (non-finite loss), 1 skipped (gradient-norm spike)"
    assert out[4].startswith("tensors that led the most events: encoder/layers_0/mlp/kernel (1), ")
    assert out[5] == f"wrote {log.parent / 'stability.png'} (3 panels)"


def test_module_runs_as_a_program(tmp_path, capsys):
    rows = healthy_rows(30)
    skip_spike(rows, 25, 99.0)
    write_log(tmp_path / "metrics.jsonl", rows)
    cmd = [sys.executable, "-m", "adaptx.report", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "step 25: grad norm 99 (" in done.stdout
    assert _output.written_by_report(tmp_path / "stability.png")
    with pytest.raises(SystemExit) as info:
        report.main(["--help"])
    assert info.value.code == 0
    helped = capsys.readouterr().out
    assert helped.startswith("usage: python -m adaptx.report ") and "--out PATH" in helped


def test_bad_steps_file_lists_skipped_clipped_and_non_finite_steps(tmp_path, capsys):
    rows = healthy_rows(60, tensors=TENSORS)
    skip_spike(rows, 20, 80.0)
    rows[20]["clip_spikes/tensor_grad_norm/embed/embedding"] = 80.0
    rows[30].update({"loss": math.nan, "guard/last_reason": 3})
    for r in rows[30:]:
        r["guard/skipped"] += 1
    rows[40].update({"clip_spikes/spike": 1, "clip_spikes/scale": 0.25, "grad_norm": 4.0})
    rows[45]["clip_spikes/scale"] = 0.5
    for r in rows[50:]:  # a spike let through: not a bad step of its own
        r["guard/forced"] = 1
    rows[55].update({"grad_norm": math.inf, "guard/grad_norm": math.inf})  # not skipped
    log = write_log(tmp_path / "run" / "metrics.jsonl", rows)
    out = tmp_path / "bad_steps.json"
    assert report.main([str(log), "--no-plot", "--bad-steps", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out} (5 bad steps)"
    steps = json.loads(out.read_text())
    assert [(s["step"], s["kind"], s["reason"]) for s in steps] == [
        (20, "skipped", "gradient-norm spike"),
        (30, "skipped", "non-finite loss"),
        (40, "clipped", "gradient-norm spike"),
        (45, "clipped", "clipped by clip_spikes (scale 0.5)"),
        (55, "non-finite", "non-finite loss or gradient norm, not skipped"),
    ]
    assert steps[0]["actions"] == ["skipped by guard (gradient-norm spike)"]
    assert steps[0]["tensor"] == "embed/embedding" and steps[0]["grad_norm"] == 80.0
    assert steps[1]["loss"] == "nan" and steps[4]["grad_norm"] == "inf"  # strict JSON
    assert steps == report.bad_steps(report.read_metrics(log))
    # Its own earlier file it replaces; nothing else, and never the log.
    assert report.main([str(log), "--no-plot", "--bad-steps", str(out)]) == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"keep": "me"}')
    before = log.read_bytes()
    for target, problem in [
        (notes, "not a list of bad steps"),
        (log, "refusing to overwrite the metrics log"),
        (tmp_path, "is a directory"),
    ]:
        assert report.main([str(log), "--no-plot", "--bad-steps", str(target)]) == 2
        assert problem in capsys.readouterr().err
    assert notes.read_text() == '{"keep": "me"}' and log.read_bytes() == before


def test_bad_steps_of_a_healthy_run_is_an_empty_list(tmp_path, capsys):
    log = write_log(tmp_path / "metrics.jsonl", healthy_rows(10))
    out = tmp_path / "bad.json"
    assert report.main([str(log), "--no-plot", "--bad-steps", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    assert f"wrote {out} (0 bad steps)" in capsys.readouterr().out


JAX_FREE = """
import importlib.abc, sys, types
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "optax", "flax"):
            raise ImportError("report imported " + name)
sys.meta_path.insert(0, Refuse())
# adaptx/__init__.py imports JAX: stand in for the package to load only adaptx.report.
pkg = types.ModuleType("adaptx")
pkg.__path__ = [{root!r} + "/adaptx"]
sys.modules["adaptx"] = pkg
from adaptx import report
rows = [{{"step": s, "loss": 1.0, "guard/grad_norm": 1.0, "guard/last_reason": int(s == 9)}}
        for s in range(10)]
print(report.summarize(rows)[0].kind, report.plot(rows, {out!r}))
print(sorted(m for m in sys.modules if m.startswith("adaptx")))
"""


def test_report_needs_neither_jax_nor_the_rest_of_adaptx(tmp_path):
    script = JAX_FREE.format(root=str(ROOT), out=str(tmp_path / "s.png"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, modules = done.stdout.splitlines()
    assert first == "skip_nonfinite 2"
    assert all(m == "adaptx" or m.startswith("adaptx.report") for m in ast.literal_eval(modules))


def test_on_a_real_log_of_the_text_classifier_example(tmp_path):
    """About 20 s: 2 epochs of a tiny model; the example itself writes stability.png."""
    pytest.importorskip("flax")
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    words = {"0": "dull boring awful".split(), "1": "great superb moving".split()}
    filler = "the film a story of it is".split()
    data = tmp_path / "reviews.jsonl"
    lines = []
    for i in range(320):
        label = str(i % 2)
        text = " ".join(rng.choice(filler, 5).tolist() + [rng.choice(words[label])])
        lines.append(json.dumps({"text": text, "label": label}))
    data.write_text("\n".join(lines) + "\n")
    flags = "--embed-dim 8 --hidden-dim 8 --max-len 12 --bigrams 0 --buckets 1 --epochs 2"
    flags += " --batch-size 32 --max-norm 0.05 --no-checkpoint --no-progress --pretrain-epochs 0"
    train = ROOT / "examples" / "text_classifier" / "train.py"
    cmd = [sys.executable, str(train), "--data", str(data), "--out", str(tmp_path), "--name", "r"]
    done = subprocess.run(cmd + flags.split(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "r"
    assert "stability.png" in done.stdout.splitlines()[-1]
    assert _output.written_by_report(run / "stability.png")
    records = report.read_metrics(run)
    steps = [r for r in records if "epoch" not in r]
    events = report.summarize(records)
    # With max_norm 0.05 nearly every step is clipped, and nothing else happens.
    assert events and {e.kind for e in events} == {"clip"}
    assert all(e.actions[0].startswith("clipped by clip_by_global_norm (scale ") for e in events)
    scales = {r["step"]: r["clip_by_global_norm/scale"] for r in steps}
    assert [e.step for e in events] == [s for s, v in scales.items() if v < 0.99]
    assert report.main([str(run)]) == 0  # replaces the example's picture: the report's own
