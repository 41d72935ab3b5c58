"""Writes the sweep's figures as Markdown tables and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bench.stability.natural import goal


def _g(x: float) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _spread(s: dict, digits=_g) -> str:
    return f"{digits(s['median'])} ({digits(s['min'])}-{digits(s['max'])})"


def _int(x: float) -> str:
    return f"{x:.0f}"


def workload_table(per_opt: dict) -> list[str]:
    """One row per optimizer; a column of minibatch episodes where a fixed batch was read."""
    noisy = all("minibatch_episodes" in s for s in per_opt.values())
    extra = " episodes of the minibatch loss |" if noisy else ""
    lines = [
        "| optimizer | spike episodes | failed | late loss | final loss |" + extra,
        "| --- | --- | --- | --- | --- |" + (" --- |" if noisy else ""),
    ]
    for name, s in per_opt.items():
        cells = f" {_spread(s['minibatch_episodes'], _int)} |" if noisy else ""
        lines.append(
            f"| `{name}` | {_spread(s['episodes'], _int)} | {s['fail_rate']:.0%} "
            f"| {_spread(s['late'])} | {_spread(s['final'])} |" + cells
        )
    return lines


def goal_table(goals: dict) -> list[str]:
    lines = [
        "| candidate | workload | episodes (vs ref) | failed (vs ref) | late / best optax (which) "
        "| success (vs best clip) | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cand, per_w in goals.items():
        for w, g in per_w.items():
            if g is None:
                continue
            ep = g.get("episodes", (None, None))  # (candidate, reference)
            fl = g.get("failures", (None, None))
            best = g.get("best_baseline", ("-", None))
            ratio = g["late"] / best[1] if best[1] and math.isfinite(g["late"]) else math.inf
            succ = g.get("success")
            succ_s = f"{succ[0]:.0%} (vs {succ[1]:.0%})" if succ else "-"
            lines.append(
                f"| `{cand}` | {w} | {_g(ep[0])} (vs {_g(ep[1])}) | {_g(fl[0])} (vs {_g(fl[1])}) "
                f"| {_g(ratio)}x (`{best[0]}`) | {succ_s} | {'yes' if g['met'] else 'no'} |"
            )
    return lines


def goal_matrix(goals: dict) -> list[str]:
    """One row per candidate, one column per workload: ``yes`` or the conditions it misses."""
    workloads = list(next(iter(goals.values()), {}))
    held = {w for w in workloads if goal.split(w) == "held-out"}
    heads = [w if w in held else f"{w} (calibration)" for w in workloads]
    lines = [
        "| candidate | " + " | ".join(heads) + " | met on | met on held-out |",
        "| --- |" + " --- |" * (len(workloads) + 2),
    ]
    for cand, per_w in goals.items():
        cells, met, held_met, held_ran = [], 0, 0, 0
        for w in workloads:
            g = per_w.get(w)
            if g is None:
                cells.append("-")
                continue
            keys = ("episodes_ok", "failures_ok", "late_ok", "success_ok")
            missed = [k[0].upper() for k in keys if g.get(k) is False]
            met += g["met"]
            if w in held:
                held_met += g["met"]
                held_ran += 1
            cells.append("yes" if g["met"] else "no: " + "".join(missed))
        ran = sum(per_w.get(w) is not None for w in workloads)
        lines.append(
            f"| `{cand}` | " + " | ".join(cells) + f" | {met}/{ran} | {held_met}/{held_ran} |"
        )
    return lines


def baseline_bar_matrix(results: dict) -> list[str]:
    """The late-loss condition applied to the optax baselines themselves (``goal.py``)."""
    cells = {
        w: goal.baselines_on_the_late_bar(cell["optimizers"], cell["kinds"])
        for per_w in results.values()
        for w, cell in per_w.items()
    }
    workloads = list(cells)
    names = list(dict.fromkeys(n for c in cells.values() for n in c["baselines"]))
    lines = [
        "| optax baseline | " + " | ".join(workloads) + " | met on |",
        "| --- |" + " --- |" * (len(workloads) + 1),
    ]
    for name in names:
        row, met, ran = [], 0, 0
        for w in workloads:
            c = cells[w]["baselines"].get(name)
            if c is None:
                row.append("-")
                continue
            ran += 1
            met += c["ok"]
            why = "the others not finite" if c["ratio"] == 0 else f"{_g(c['ratio'])}x"
            row.append(f"{'yes' if c['ok'] else 'no'} ({why})")
        lines.append(f"| `{name}` | " + " | ".join(row) + f" | {met}/{ran} |")
    spreads = [cells[w]["best_seed_spread"] for w in workloads]
    lines.append(
        "| the best baseline's seed spread (max / min late loss) | "
        + " | ".join("-" if s is None else f"{_g(s)}x" for s in spreads)
        + " | |"
    )
    return lines


def late_noise_table(results: dict, candidates: list[str]) -> list[str]:
    """Per workload, the chance of meeting condition L on a re-run (``goal.late_noise``):
    the best optax baseline against itself, and each candidate against that baseline; the
    last rows: the product over workloads (every one met, if they are independent) and the
    sum (the expected number met)."""
    lines = [
        "| workload | best optax baseline (seeds) | itself, re-run | "
        + " | ".join(f"`{c}`" for c in candidates)
        + " |",
        "| --- | --- | --- |" + " --- |" * len(candidates),
    ]
    self_p: list[float] = []
    cand_p: dict[str, list[float]] = {c: [] for c in candidates}
    for per_w in results.values():
        for w, cell in per_w.items():
            x = goal.late_noise(cell["optimizers"], cell["kinds"], candidates)
            if x is None:
                continue
            self_p.append(x["self"])
            for c, chance in x["candidates"].items():
                if chance is not None:
                    cand_p[c].append(chance)
            cells = ["-" if p is None else f"{p:.0%}" for p in x["candidates"].values()]
            best = f"`{x['best']}` ({x['seeds']})"
            lines.append(f"| {w} | {best} | {x['self']:.0%} | " + " | ".join(cells) + " |")

    def summary(label: str, f) -> str:
        cells = [f(v) if v else "-" for v in cand_p.values()]
        return f"| {label} | | {f(self_p)} | " + " | ".join(cells) + " |"

    lines.append(summary("all met (product)", lambda v: f"{np.prod(v):.2%}"))
    lines.append(summary("expected number met (sum)", lambda v: f"{sum(v):.1f} of {len(v)}"))
    return lines


def write(out: Path, meta: dict, results: dict, goals: dict, notes: dict) -> None:
    """``out.md`` and ``out.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results, "goal": goals}, indent=1, default=str)
    )
    lines = [
        "# Natural instabilities: no fault injected",
        "",
        f"Recorded {meta['date']} (jax {meta['jax']}, optax {meta['optax']}, "
        f"{meta['backend']}; the seeds of each cell are stated with its table)"
        + (
            f"; tables written {meta['rendered']} from the recorded cells, with no training."
            if "rendered" in meta
            else "."
        ),
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"]) + ".",
        "",
        "Each cell: median over seeds (min-max). *Spike episodes*: separate runs of steps whose "
        "loss is non-finite or above 10x its minimum over the previous 200 steps. *Late loss*: "
        "median over the last 20 % of the steps (non-finite counts as inf). *Failed*: the share "
        "of seeds whose late loss is above the workload's failure level (stated per table). "
        "Where a workload draws minibatches, every figure reads the loss of one fixed batch at "
        "the same parameters (the same batch at every step and seed, drawn from the training "
        "distribution; its size is stated per family), so that a jump counts as a spike only "
        "when the parameters moved; the last column counts the episodes of the minibatch loss "
        "itself, sampling noise included.",
        "",
    ]
    for family, per_w in results.items():
        lines += [f"## {family}", "", notes.get(family, ""), ""]
        for w, cell in per_w.items():
            fail = cell["fail_above"]
            level = "no failure level" if fail is None else f"fails above {_g(fail)}"
            read = "; figures read on the fixed batch" if cell.get("fixed_batch") else ""
            seeds = f"{cell['seeds']} seeds, " if "seeds" in cell else ""
            lines += [f"### {w}", "", f"{cell['steps']} steps, {seeds}{level}{read}.", ""]
            lines += workload_table(cell["optimizers"]) + [""]
    lines += ["## Mechanisms under test", "", notes.get("mechanisms", ""), ""]
    lines += ["## The goal, per workload", "", notes.get("goal", ""), ""]
    lines += [
        "E: more than 0.25x the reference's spike episodes; F: more than 0.25x its failure "
        "rate; L: late loss above 1.1x the best optax baseline's; S: success rate below the "
        "best fixed clip's. Workloads marked *(calibration)* are those a successor recipe "
        "may be tuned on (`goal.CALIBRATION`, declared after every mechanism below had been "
        "tried on every workload); the last column counts the others.",
        "",
    ]
    lines += goal_matrix(goals) + ["", "The figures behind each cell:", ""]
    lines += goal_table(goals) + [""]
    lines += [
        "## The late-loss condition, applied to the optax baselines themselves",
        "",
        "Each optax baseline's median late loss over the best median of the other optax "
        f"baselines on the same workload, and whether it is within {goal.LATE_RATIO:g}x: the "
        "condition L "
        "asks of a candidate. The last row is the best baseline's own spread over its seeds.",
        "",
    ]
    lines += baseline_bar_matrix(results) + [""]
    lines += [
        "## How much of the late-loss condition is seed noise",
        "",
        "The chance that condition L holds on a re-run with fresh seeds, by the bootstrap "
        f"(`goal.chance_late_ok`, {goal.DRAWS} draws): each draw resamples the recorded seeds "
        "of both optimizers, with replacement, and compares their medians. *Itself, re-run*: "
        "the best optax baseline against a re-run of itself, an upper bound on the chance of "
        "any optimizer exactly as good (the bar is the best of several baselines, each of "
        "which can be lucky). The other columns: each candidate against a re-run of that "
        "baseline. The last rows treat the workloads as independent.",
        "",
    ]
    lines += late_noise_table(results, list(goals)) + [""]
    out.with_suffix(".md").write_text("\n".join(lines))
