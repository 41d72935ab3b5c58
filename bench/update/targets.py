"""The speed targets, checked on a run's results.

Per tree, on the clip + AdamW pipeline: adaptx's step against optax's (and, on one
leaf, against the C floor), its compile time on the many-leaf trees, and its peak
memory; on the recipes, ``robust_adamw`` against its own chain without ``guard``, and
every pipeline's peak memory against optax's.

>>> cell = {"tree": "t", "pipeline": "clip+adamw", "impl": "adaptx", "status": "ok"}
>>> find_cell({"cells": [cell]}, "t", "clip+adamw", "adaptx") is cell
True
"""

from __future__ import annotations

MEMORY_SLACK = 4096  # bytes: adaptx keeps scalar telemetry (norms, scales) in its state
#: The step-time target, a multiple of optax's, per tree kind.
STEP_LIMITS = {"single16": 0.5, "single64": 0.5, "transformer": 0.65, "many_small": 1.0}


def find_cell(results, tree, pipeline, impl):
    for c in results["cells"]:
        if (c["tree"], c["pipeline"], c["impl"]) == (tree, pipeline, impl) and c["status"] == "ok":
            return c
    return None


def speed_targets(add, tree, kind, limit, impl, cell, o):
    """The step and compile targets for one implementation's clip + AdamW cell."""
    if o:
        r = cell["vs_optax"]
        add(
            f"{tree}: {impl} step <= {limit}x optax",
            f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}] "
            f"({cell['median_ms']:.2f} vs {o['median_ms']:.2f} ms)",
            r["median"] <= limit,
        )
    if kind == "transformer" and o:
        rc = cell["compile_s"] / o["compile_s"]
        add(
            f"{tree}: {impl} compile <= 0.1x optax",
            f"{rc:.2f}x ({cell['compile_s']:.2f} vs {o['compile_s']:.2f} s)",
            rc <= 0.1,
        )
    if kind == "many_small":
        add(
            f"{tree}: {impl} compile <= 2 s",
            f"{cell['compile_s']:.2f} s",
            cell["compile_s"] <= 2.0,
        )


def _memory_target(add, tree, pipeline, a, o):
    """``a``'s XLA static peak against optax's ``o``, when both were measured."""
    if a and o and a.get("xla_peak_bytes") is not None and o.get("xla_peak_bytes") is not None:
        d = a["xla_peak_bytes"] - o["xla_peak_bytes"]
        add(
            f"{tree}: {pipeline}: adaptx peak memory <= optax's (XLA static)",
            f"{a['xla_peak_bytes']:,} vs {o['xla_peak_bytes']:,} bytes ({d:+,})",
            d <= MEMORY_SLACK,
        )


def _c_floor_target(add, tree, a, c):
    if c:
        r = a["vs_c"]["median"]
        add(
            f"{tree}: adaptx step <= 1.5x C floor",
            f"{r:.2f}x ({a['median_ms']:.2f} vs {c['median_ms']:.2f} ms)",
            r <= 1.5,
        )
    else:
        add(f"{tree}: adaptx step <= 1.5x C floor", "C floor not measured", None)


def _guard_target(add, results, tree, recipe):
    """``recipe`` against its own chain without guard and telemetry (``adaptx-base``)."""
    ra = find_cell(results, tree, recipe, "adaptx")
    rb = find_cell(results, tree, recipe, "adaptx-base")
    if ra and rb:
        r = ra["vs_adaptx-base"]
        add(
            f"{tree}: {recipe} <= 1.10x the chain without guard/telemetry",
            f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}] "
            f"({ra['median_ms']:.2f} vs {rb['median_ms']:.2f} ms)",
            r["median"] <= 1.10,
        )


def _tree_targets(add, results, tree, kind):
    limit = STEP_LIMITS[kind]
    a = find_cell(results, tree, "clip+adamw", "adaptx")
    o = find_cell(results, tree, "clip+adamw", "optax")
    if a:
        speed_targets(add, tree, kind, limit, "adaptx", a, o)
    _memory_target(add, tree, "clip+adamw", a, o)
    ap = find_cell(results, tree, "clip+adamw", "adaptx-packed")
    if ap and o and kind in ("transformer", "many_small"):
        speed_targets(add, tree, kind, limit, "adaptx-packed", ap, o)
    if a and kind in ("single16", "single64"):
        _c_floor_target(add, tree, a, find_cell(results, tree, "clip+adamw", "c"))
    _guard_target(add, results, tree, "robust_adamw")
    for pipeline in sorted({c["pipeline"] for c in results["cells"]} - {"clip+adamw"}):
        pa = find_cell(results, tree, pipeline, "adaptx")
        _memory_target(add, tree, pipeline, pa, find_cell(results, tree, pipeline, "optax"))


def evaluate_targets(results: dict) -> list[dict]:
    """The speed targets, checked on the clip+adamw pipeline (and the recipes)."""
    out = []

    def add(target, measured, met):
        out.append({"target": target, "measured": measured, "met": met})

    for tree, t in results["trees"].items():
        _tree_targets(add, results, tree, t["kind"])
    return out
