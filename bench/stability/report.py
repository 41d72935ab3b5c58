"""The stability benchmark's Markdown: one summary row per defense, and the details."""

from __future__ import annotations

import numpy as np

from bench.stability import faults as faults_lib


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def summary(per_trace: dict, meta: dict) -> dict:
    """Pools one defense's per-trace scores: worst healthy rate, recalls over every fault."""
    healthy = [s["healthy_rate"] for n, s in per_trace.items() if meta[n]["healthy"]]
    recall = {
        k: float(np.mean([s["recall"][k] for s in per_trace.values()])) for k in faults_lib.KINDS
    }
    big = [k for k in faults_lib.KINDS if k not in ("spike 10x",)]
    first = [s["first_step_caught"][k] for s in per_trace.values() for k in big]
    adapt = [s["shift_adapt_steps"] for s in per_trace.values()]
    never = [s["shift_adapt_steps"] >= s["shift_steps_left"] - 5 for s in per_trace.values()]
    return {
        "healthy_max": max(healthy) if healthy else float("nan"),
        "healthy_mean": float(np.mean(healthy)) if healthy else float("nan"),
        "recall": recall,
        "recall_100x_up": float(np.mean([recall[k] for k in big])),
        "first_step": float(np.mean(first)),
        "aftershocks_mean": float(np.mean([s["aftershocks_mean"] for s in per_trace.values()])),
        "aftershocks_max": int(max(s["aftershocks_max"] for s in per_trace.values())),
        "adapt_max": int(max(adapt)),
        "adapt_never": int(sum(never)),
    }


def _summary_table(results: dict) -> list[str]:
    meta = results["meta"]["traces"]
    cost = results.get("cost", {})
    head = [
        "defense",
        "healthy rate, worst (mean)",
        *faults_lib.KINDS,
        "first step",
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
            f"{s['aftershocks_mean']:+.2f} / {s['aftershocks_max']}",
            adapt,
            step,
        ]
        lines.append("| " + " | ".join(row) + " |")
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
    head = [
        "clip_z",
        "clip_ratio",
        "clip_alpha",
        "healthy rate, worst",
        "spike 10x",
        "spikes >= 100x, NaN, Inf",
        "aftershocks max",
        "shift: steps to adapt, worst",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["grid"]:
        s = summary(row["per_trace"], meta)
        hp = row["hp"]
        lines.append(
            f"| {hp['clip_z']:g} | {hp['clip_ratio']:g} | {hp['clip_alpha']:g} | "
            f"{_pct(s['healthy_max'])} | {_pct(s['recall']['spike 10x'])} | "
            f"{_pct(s['recall_100x_up'])} | {s['aftershocks_max']} | {s['adapt_max']} |"
        )
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
    if "grid" in results:
        out += [
            "## Calibration of adaptx.robust_adamw (clip_spikes settings)",
            "",
            *_grid_table(results),
            "",
        ]
    return "\n".join(out)
