"""The stability benchmark's Markdown: one summary row per defense, and the details.

Every figure of the summary is pooled over the *held-out* runs (``split`` in
``traces.json``); the calibration runs appear only in the calibration grid and in the
per-trace table, marked.
"""

from __future__ import annotations

import numpy as np

from bench.stability import faults as faults_lib
from bench.stability import replay

BIG = tuple(k for k in faults_lib.KINDS if k != "spike 10x")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def summary(per_trace: dict, meta: dict, split: str = "held-out") -> dict:
    """One defense's per-trace scores pooled over the healthy runs of ``split`` (each
    weighing the same), and the steady-state recall of the big faults over every run of
    ``split``, unhealthy ones included."""
    mine = {n: s for n, s in per_trace.items() if meta[n]["split"] == split}
    healthy = {n: s for n, s in mine.items() if meta[n]["healthy"]}
    steady = [s["steady_rate"] for s in healthy.values()]
    warm = [s["warmup_rate"] for s in healthy.values()]
    recall = {k: _mean(s["steady_recall"][k] for s in healthy.values()) for k in faults_lib.KINDS}
    parts = {
        f"{p}_{regime}": max((s[f"{regime}_parts"][p] for s in healthy.values()), default=0.0)
        for p in replay.PARTS
        for regime in ("steady", "warmup")
    }
    return {
        "traces": len(healthy),
        "steady_max": max(steady, default=float("nan")),
        "steady_mean": _mean(steady),
        "warmup_max": max(warm, default=float("nan")),
        "warmup_mean": _mean(warm),
        "parts_max": parts,
        "recall": recall,
        "recall_big": _mean(recall[k] for k in BIG),
        "recall_big_all": _mean(s["steady_recall"][k] for s in mine.values() for k in BIG),
        "warmup_recall_big": _mean(s["warmup_recall"][k] for s in healthy.values() for k in BIG),
        "warmup_recall_10x": _mean(s["warmup_recall"]["spike 10x"] for s in healthy.values()),
        "aftershocks_mean": _mean(s["aftershocks_mean"] for s in healthy.values()),
        "aftershocks_max": int(max((s["aftershocks_max"] for s in healthy.values()), default=0)),
        "adapt_max": int(max((s["shift_adapt_steps"] for s in healthy.values()), default=0)),
        "adapt_never": int(
            sum(s["shift_adapt_steps"] >= s["shift_steps_left"] - 5 for s in healthy.values())
        ),
    }


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells) -> list[str]:
    return [_row(cells), "|" + " --- |" * len(cells)]


def _adapt(s: dict) -> str:
    return f"{s['adapt_max']}" + (f" (never on {s['adapt_never']})" if s["adapt_never"] else "")


def _summary_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    cost = results.get("cost", {})
    lines = _head(
        [
            "defense",
            "interventions after warm-up, worst (mean)",
            "in warm-up, worst (mean)",
            *(f"steady: {k}" for k in faults_lib.KINDS),
            "warm-up: >= 100x, NaN, Inf",
            "warm-up: spike 10x",
            "steady: >= 100x, NaN, Inf, all held-out runs",
            "aftershocks mean / max",
            "10x shift: steps to adapt",
            "step time vs adaptx.adamw",
        ]
    )
    for name, per in results["scores"].items():
        s = summary(per, meta)
        c = cost.get(name)
        lines.append(
            _row(
                [
                    f"`{name}`",
                    f"{_pct(s['steady_max'])} ({_pct(s['steady_mean'])})",
                    f"{_pct(s['warmup_max'])} ({_pct(s['warmup_mean'])})",
                    *(_pct(s["recall"][k]) for k in faults_lib.KINDS),
                    _pct(s["warmup_recall_big"]),
                    _pct(s["warmup_recall_10x"]),
                    _pct(s["recall_big_all"]),
                    f"{s['aftershocks_mean']:+.2f} / {s['aftershocks_max']}",
                    _adapt(s),
                    f"{c['ratio']:.2f}x ({c['min']:.2f}-{c['max']:.2f})" if c else "-",
                ]
            )
        )
    return lines


def _parts_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    head = ["defense"]
    for regime in ("after warm-up", "in warm-up"):
        head += [f"{p.replace('_', ' ')}, {regime}" for p in replay.PARTS]
    lines = _head(head)
    for name, per in results["scores"].items():
        m = summary(per, meta)["parts_max"]
        cells = [_pct(m[f"{p}_{r}"]) for r in ("steady", "warmup") for p in replay.PARTS]
        lines.append(_row([f"`{name}`", *cells]))
    return lines


def _rates_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    names = list(meta)

    def label(n):
        tags = [
            t
            for t, on in (
                ("calibration", meta[n]["split"] == "calibration"),
                ("unhealthy", not meta[n]["healthy"]),
            )
            if on
        ]
        return n + (f" ({', '.join(tags)})" if tags else "")

    lines = _head(["defense", *(label(n) for n in names)])
    for name, per in results["scores"].items():
        lines.append(_row([f"`{name}`", *(_pct(per[n]["steady_rate"]) for n in names)]))
    return lines


def _traces_table(meta: dict) -> list[str]:
    lines = _head(
        ["trace", "split", "steps", "healthy", "optimizer", "final (test acc. or val. loss)"]
    )
    for n, m in meta.items():
        lines.append(
            _row(
                [
                    n,
                    m["split"],
                    str(m["steps"]),
                    "yes" if m["healthy"] else "no",
                    m["optimizer"],
                    f"{m['final']:.4g}",
                ]
            )
        )
    return lines


def _cost_table(results: dict) -> list[str]:
    lines = _head(["step", "ms (median)", "paired ratio, median (min-max)"])
    for name, c in results["cost"].items():
        over = " over ".join(f"`{x}`" for x in c["pair"]) if "pair" in c else f"`{name}`"
        ms = "-" if c["ms"] is None else f"{c['ms']:.2f}"
        lines.append(f"| {over} | {ms} | {c['ratio']:.3f} ({c['min']:.3f}-{c['max']:.3f}) |")
    return lines


def grid_cells(s: dict) -> list[str]:
    """The grid's figures of one setting on one split."""
    return [
        _pct(s["steady_max"]),
        _pct(s["warmup_max"]),
        _pct(s["recall"]["spike 10x"]),
        _pct(s["recall_big"]),
        _pct(s["warmup_recall_big"]),
        str(s["aftershocks_max"]),
        str(s["adapt_max"]),
    ]


GRID_FIGURES = (
    "after warm-up, worst",
    "in warm-up, worst",
    "steady 10x",
    "steady >= 100x, NaN, Inf",
    "warm-up >= 100x, NaN, Inf",
    "aftershocks max",
    "10x shift: steps",
)


def _grid_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    grid = results["grid"]
    knobs = list(grid["rows"][0]["hp"])
    head = [*knobs, *(f"{f} (calibration)" for f in GRID_FIGURES)]
    head += [f"{f} (held-out)" for f in GRID_FIGURES]
    lines = _head(head)
    for i, row in enumerate(grid["rows"]):
        bold = i == grid["pick"]
        cells = [f"**{row['hp'][k]:g}**" if bold else f"{row['hp'][k]:g}" for k in knobs]
        cells += grid_cells(summary(row["per_trace"], meta, "calibration"))
        cells += grid_cells(summary(row["per_trace"], meta, "held-out"))
        lines.append(_row(cells))
    return lines


def _replay_sections(results: dict) -> list[str]:
    return [
        "## Traces",
        "",
        *_traces_table(results["meta"]["traces"]),
        "",
        "## Defenses (held-out runs only)",
        "",
        *_summary_table(results),
        "",
        "## Interventions by part, worst held-out run (no fault injected)",
        "",
        *_parts_table(results),
        "",
        "## Intervention rate per trace, any part (steps after the first tenth)",
        "",
        *_rates_table(results),
        "",
    ]


def _cost_section(results: dict) -> list[str]:
    src = results["meta"].get("cost_from")
    tree = results["meta"].get("cost_tree")
    what = (
        f"a tree of {tree['leaves']} leaves, {tree['parameters'] / 1e6:.1f}M parameters"
        if tree
        else "the tree of `cost.tree_shapes()`"
    )
    out = [f"## Step time ({what}; ratios against `adaptx.adamw` unless a pair is named)", ""]
    if src:
        out += [
            f"Timed by `{src['command']}` on {src['date']} (jax {src['jax']}, "
            f"{src['device']}) and read from `{src['path']}`: a step's cost does not "
            "depend on the traces.",
            "",
        ]
    return [*out, *_cost_table(results), ""]


def _hp(hp: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def markdown(results: dict) -> str:
    m = results["meta"]
    title = "Stability benchmark" if "scores" in results else "Stability benchmark: step time"
    out = [
        f"# {title}{' (quick)' if m['quick'] else ''}",
        "",
        f"`{m['command']}`, {m['date']}; jax {m['jax']}, optax {m['optax']}, {m['device']}.",
        "",
    ]
    if "scores" in results:
        out += _replay_sections(results)
    if "cost" in results:
        out += _cost_section(results)
    if "grid" in results:
        g = results["grid"]
        ties = [_hp(g["rows"][i]["hp"]) for i in g["ties"] if i != g["pick"]]
        chosen = _hp(g["rows"][g["pick"]]["hp"])
        out += [
            "## Calibration of adaptx.robust_adamw (clip_spikes settings)",
            "",
            f"Chosen on the calibration runs alone by `run.pick`: {g['rule']}. "
            f"Pick (in bold; the first in grid order among equals): {chosen}; "
            f"equal on every one of those figures: {'; '.join(ties) or 'none'}. "
            f"The recipe's defaults: {_hp(g['defaults'])}. The held-out columns are shown "
            "for checking; they play no part in the pick.",
            "",
            *_grid_table(results),
            "",
        ]
    return "\n".join(out)
