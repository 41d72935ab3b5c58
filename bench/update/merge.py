"""Several result files as one (``--from-json``): a later file's cell replaces an earlier one's.

Lets a re-run of some cells (``--trees``/``--pipelines`` subsets) update a full run.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.update.config import CORE_PIPELINES, IMPLS, RECIPES


def _source(path, run) -> dict:
    m = run["meta"]
    return {
        "path": Path(path).name,
        "date": m["date"],
        "argv": m["argv"],
        "git": m.get("git"),
        "loadavg_start": m.get("loadavg_start"),
        "loadavg_end": m.get("loadavg_end"),
    }


def merge(paths: list[str]) -> dict:
    """The runs in ``paths`` as one result, its cells in tree, pipeline and IMPLS order."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {"meta": dict(runs[0]["meta"]), "trees": {}, "ceilings": {}, "cells": []}
    out["meta"]["merged_from"] = [_source(p, r) for p, r in zip(paths, runs, strict=True)]
    out["meta"]["loadavg_end"] = runs[-1]["meta"].get("loadavg_end")
    cells: dict[tuple, dict] = {}
    for r in runs:
        for name, t in r["trees"].items():
            out["trees"].setdefault(name, t)
        for name, c in r["ceilings"].items():
            out["ceilings"].setdefault(name, c)
        for c in r["cells"]:
            cells[(c["tree"], c["pipeline"], c["impl"])] = c
    order = {k: i for i, k in enumerate(IMPLS)}
    trees = list(out["trees"])
    pipelines = list(CORE_PIPELINES + RECIPES)
    out["cells"] = sorted(
        cells.values(),
        key=lambda c: (
            trees.index(c["tree"]),
            pipelines.index(c["pipeline"]) if c["pipeline"] in pipelines else 99,
            order.get(c["impl"], 99),
        ),
    )
    return out
