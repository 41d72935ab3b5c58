"""The benchmark scripts run end to end in their quick configuration.

No timing is asserted (timings on a shared machine are noise); the output's structure
and finiteness are.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"adaptx_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_update_step_quick(tmp_path):
    mod = _load("update_step")
    out = tmp_path / "update"
    mod.main(
        [
            "--quick",
            "--trees",
            "many_small",
            "--pipelines",
            "clip+adamw,robust_adamw",
            "--reps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) == {"meta", "trees", "ceilings", "cells", "targets"}
    meta = res["meta"]
    for key in ("jax", "jaxlib", "optax", "adaptx", "torch"):
        assert key in meta["versions"]
    assert meta["device"]["platform"]
    assert meta["quick"] is True
    assert [t["kind"] for t in res["trees"].values()] == ["many_small"]
    for name, ceil in res["ceilings"].items():
        assert name in res["trees"]
        assert _finite(ceil["jax"]["gbps"]) and ceil["jax"]["gbps"] > 0
    ok = [c for c in res["cells"] if c["status"] == "ok"]
    seen = {(c["tree"], c["pipeline"], c["impl"]) for c in ok}
    for tree in res["trees"]:
        for impl in ("optax", "adaptx", "jax", "adaptx-packed"):
            assert (tree, "clip+adamw", impl) in seen
        if "robust_adamw" in meta["recipes_available"]:
            for impl in ("optax", "adaptx", "adaptx-base"):
                assert (tree, "robust_adamw", impl) in seen
    for c in ok:
        for key in (
            "median_ms",
            "min_ms",
            "max_ms",
            "gbps",
            "ceiling_ratio",
            "model_bytes",
            "first_call_s",
        ):
            assert _finite(c[key]) and c[key] >= 0, (c["impl"], key, c[key])
        assert c["min_ms"] <= c["median_ms"] <= c["max_ms"]
        assert c["reps"] == 2
        if c["impl"] not in ("torch", "c"):
            for key in ("compile_s", "trace_s", "lower_s", "xla_compile_s", "xla_peak_bytes"):
                assert _finite(c[key]) and c[key] >= 0, (c["impl"], key)
            assert c["fusions"] >= 1
        if c["impl"] != "optax":
            assert _finite(c["vs_optax"]["median"])
    for t in res["targets"]:
        assert t["met"] in (True, False, None)
    md = out.with_suffix(".md").read_text()
    assert "| pipeline | impl | step ms |" in md


def test_train_step_quick(tmp_path):
    mod = _load("train_step")
    out = tmp_path / "train"
    mod.main(
        [
            "--quick",
            "--model",
            "fallback",
            "--encoder",
            "mean",
            "--recipes",
            "adamw,grad-only",
            "--reps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["meta"]["model"].endswith("FallbackClassifier")
    cells = {(c["recipe"], c["impl"]): c for c in res["cells"]}
    assert set(cells) == {("adamw", "optax"), ("adamw", "adaptx"), ("grad-only", "none")}
    for c in cells.values():
        for key in ("median_ms", "min_ms", "max_ms", "compile_s", "first_call_s"):
            assert _finite(c[key]) and c[key] >= 0
        assert c["loss_finite"] and c["loss_finite_end"]
    assert _finite(cells[("adamw", "adaptx")]["vs_optax"]["median"])
    assert "| recipe | impl |" in out.with_suffix(".md").read_text()


def test_before_exports_a_revision_as_its_own_package(tmp_path):
    """``bench/before.py`` renames every import of the exported package, so the earlier
    revision runs beside the working tree's without touching it."""
    import subprocess
    import sys

    from bench import before

    package = before.export("HEAD", tmp_path)
    assert package.name == before.NAME and (package / "__init__.py").exists()
    for path in package.rglob("*.py"):
        assert not before._IMPORT.search(path.read_text()), path
    code = (
        "import adaptx_before, sys; tx = adaptx_before.adamw(1e-3); "
        "assert 'adaptx' not in sys.modules, sorted(m for m in sys.modules if 'adaptx' in m)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_skip_select_quick(tmp_path):
    from bench import skip_select

    rows = skip_select.main(["--quick", "--trees", "transformer", "--reps", "1"])
    assert {r["variant"] for r in rows} == set(skip_select.VARIANTS)
    for r in rows:
        assert _finite(r["step_ms"]) and _finite(r["passes"]) and r["kernels"] > 0


def test_paired_chain_quick():
    from bench import paired

    rows = paired.main(
        ["chain", "--quick", "--trees", "transformer", "--recipes", "robust_adamw", "--reps", "1"]
    )
    (row,) = rows
    assert _finite(row["A"]["passes"]) and _finite(row["B"]["passes"])
    assert _finite(row["ratio_b_over_a"]["median"])


def test_monitor_cost_quick():
    from bench import monitor_cost

    rows = monitor_cost.main(["--quick"])
    assert [r["variant"] for r in rows] == list(monitor_cost.VARIANTS)
    for r in rows:
        assert _finite(r["passes"]) and _finite(r["traffic"]) and r["kernels"] > 0
        assert r["largest_leaf"]


def test_writer_cost_quick():
    from bench import writer_cost

    rows = writer_cost.main(["--quick", "--trees", "many_small"])
    (row,) = rows
    # 8 steps a round, the writer fetching every 4: two fetches, against one per step.
    assert row["writer"]["device_gets_per_round"] == 2
    assert row["fetch each step"]["device_gets_per_round"] == 8
    assert row["kept_device_gets_per_round"] == 0
    assert row["writer"]["min"] > 0 and row["kept_step_ms"] > 0
