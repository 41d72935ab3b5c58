"""The stability benchmark's Markdown: one summary row per defense, and the details."""

from __future__ import annotations

import numpy as np

from bench.stability import faults as faults_lib


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def summary(per_trace: dict, meta: dict) -> dict:
    """One defense's per-trace scores pooled: over the healthy traces (each weighing the
    same), and the recall of the big faults over every trace, unhealthy ones included."""
    healthy = {n: s for n, s in per_trace.items() if meta[n]["healthy"]}
    big = [k for k in faults_lib.KINDS if k != "spike 10x"]

    def mean(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else float("nan")

    rates = [s["healthy_rate"] for s in healthy.values()]
    recall = {k: mean(s["recall"][k] for s in healthy.values()) for k in faults_lib.KINDS}
    return {
        "healthy_max": max(rates, default=float("nan")),
        "healthy_mean": mean(rates),
        "recall": recall,
        "recall_100x_up": mean(recall[k] for k in big),
        "recall_100x_up_all": mean(s["recall"][k] for s in per_trace.values() for k in big),
        "first_step": mean(s["first_step_caught"][k] for s in healthy.values() for k in big),
        "aftershocks_mean": mean(s["aftershocks_mean"] for s in healthy.values()),
        "aftershocks_max": int(max((s["aftershocks_max"] for s in healthy.values()), default=0)),
        "adapt_max": int(max((s["shift_adapt_steps"] for s in healthy.values()), default=0)),
        "adapt_never": int(
            sum(s["shift_adapt_steps"] >= s["shift_steps_left"] - 5 for s in healthy.values())
        ),
    }


def _summary_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    cost = results.get("cost", {})
    head = [
        "defense",
        "healthy rate, worst (mean)",
        *faults_lib.KINDS,
        "first step",
        ">= 100x, NaN, Inf: all traces",
        "aftershocks mean / max",
        "10x shift: steps to adapt",
        "step time vs adaptx.adamw",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, per in results["scores"].items():
        s = summary(per, meta)
        c = cost.get(name)
        step = f"{c['ratio']:.2f}x ({c['min']:.2f}-{c['max']:.2f})" if c else "-"
        adapt = f"{s['adapt_max']}" + (
            f" (never on {s['adapt_never']})" if s["adapt_never"] else ""
        )
        row = [
            f"`{name}`",
            f"{_pct(s['healthy_max'])} ({_pct(s['healthy_mean'])})",
            *(_pct(s["recall"][k]) for k in faults_lib.KINDS),
            _pct(s["first_step"]),
            _pct(s["recall_100x_up_all"]),
            f"{s['aftershocks_mean']:+.2f} / {s['aftershocks_max']}",
            adapt,
            step,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _cost_table(results: dict) -> list[str]:
    lines = ["| step | ms (median) | paired ratio, median (min-max) |", "| --- | --- | --- |"]
    for name, c in results["cost"].items():
        over = " over ".join(f"`{x}`" for x in c["pair"]) if "pair" in c else f"`{name}`"
        ms = "-" if c["ms"] is None else f"{c['ms']:.2f}"
        lines.append(f"| {over} | {ms} | {c['ratio']:.3f} ({c['min']:.3f}-{c['max']:.3f}) |")
    return lines


def _rates_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    names = list(meta)
    head = ["defense", *(f"{n}{'' if meta[n]['healthy'] else ' (unhealthy)'}" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, per in results["scores"].items():
        lines.append(
            "| " + " | ".join([f"`{name}`", *(_pct(per[n]["healthy_rate"]) for n in names)]) + " |"
        )
    return lines


def _traces_table(meta: dict) -> list[str]:
    lines = [
        "| trace | steps | healthy | optimizer | final (test acc. or val. loss) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, m in meta.items():
        lines.append(
            f"| {n} | {m['steps']} | {'yes' if m['healthy'] else 'no'} | "
            f"{m['optimizer']} | {m['final']:.4g} |"
        )
    return lines


def _grid_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    knobs = list(results["grid"][0]["hp"])
    head = [
        *knobs,
        "healthy rate, worst",
        "spike 10x",
        ">= 100x, NaN, Inf",
        "first step",
        ">= 100x, NaN, Inf: all traces",
        "aftershocks max",
        "10x shift: steps to adapt",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["grid"]:
        s = summary(row["per_trace"], meta)
        cells = [f"{row['hp'][k]:g}" for k in knobs] + [
            _pct(s["healthy_max"]),
            _pct(s["recall"]["spike 10x"]),
            _pct(s["recall_100x_up"]),
            _pct(s["first_step"]),
            _pct(s["recall_100x_up_all"]),
            str(s["aftershocks_max"]),
            str(s["adapt_max"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    m = results["meta"]
    out = [
        f"# Stability benchmark{' (quick)' if m['quick'] else ''}",
        "",
        f"jax {m['jax']}, optax {m['optax']}, {m['device']}.",
        "",
        "## Traces",
        "",
        *_traces_table(m["traces"]),
        "",
        "## Defenses",
        "",
        *_summary_table(results),
        "",
        "## Healthy intervention rate per trace (steps after the first tenth)",
        "",
        *_rates_table(results),
        "",
    ]
    if "cost" in results:
        out += [
            "## Step time (the tree of `cost.tree_shapes()`; ratios against `adaptx.adamw`"
            " unless a pair is named)",
            "",
            *_cost_table(results),
            "",
        ]
    if "grid" in results:
        out += [
            "## Calibration of adaptx.robust_adamw (clip_spikes settings)",
            "",
            *_grid_table(results),
            "",
        ]
    return "\n".join(out)
