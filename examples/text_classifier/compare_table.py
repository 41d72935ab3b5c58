"""``compare.py``'s table: each run summarised from its per-step history, then one row per
optimizer (see the columns in ``compare.py``'s docstring)."""

from __future__ import annotations

import math

import numpy as np


def summarize(result: dict) -> dict:
    hist = result["history"]
    nonfinite = next(
        (r["step"] for r in hist if not r["params_finite"] or not math.isfinite(r["loss"])), None
    )
    skipped_steps = [r["update_norm"] == 0.0 for r in hist]

    # A skipped step leaves the inner state (and its last clip scale) untouched: not counted.
    # (Per-tensor keys, "<transform>/tensor_<figure>/<param path>", are not figures of a step:
    # a path can end in "/scale", a layer norm's.)
    def steps_where(test) -> int:
        return sum(
            any(test(k, v) for k, v in r.items() if "/tensor_" not in k) and not skip
            for r, skip in zip(hist, skipped_steps, strict=True)
        )

    def reports(suffix: str) -> bool:
        return any(k.endswith(suffix) and "/tensor_" not in k for k in hist[0]) if hist else False

    clipped = steps_where(lambda k, v: k.endswith("/scale") and v < 1.0)
    spikes = steps_where(lambda k, v: k.endswith("/spike") and v > 0)
    tensors_clipped = steps_where(lambda k, v: k.endswith("/tensors_clipped") and v > 0)
    finite = result["params_finite"]
    acc = result["test_accuracy"]
    outcome = "diverged" if not finite else ("not learning" if acc < 0.6 else "ok")
    norms = [r["grad_norm"] for r in hist if math.isfinite(r["grad_norm"])]
    return {
        "test_acc": acc,
        "nonfinite_step": nonfinite,
        "max_grad_norm": max(norms, default=0.0),
        "clipped": clipped if reports("/scale") else None,
        "spikes": spikes if reports("/spike") else None,
        "tensors_clipped": tensors_clipped if reports("/tensors_clipped") else None,
        "skipped": sum(skipped_steps),
        "outcome": outcome,
    }


def _mean_of(runs: list[dict], key: str) -> str:
    return "-" if runs[0][key] is None else f"{np.mean([r[key] for r in runs]):.0f}"


def format_table(rows: dict[str, list[dict]]) -> str:
    head = (
        f"{'optimizer':<34} {'test acc':>15} {'non-finite at':>13} {'max |g|':>8} "
        f"{'clipped':>8} {'spikes':>7} {'tens-clip':>9} {'skipped':>8}  outcome"
    )
    lines = [head, "-" * len(head)]
    for name, runs in rows.items():
        accs = [r["test_acc"] for r in runs]
        acc = f"{np.mean(accs):.3f}" + (f" ± {np.std(accs):.3f}" if len(runs) > 1 else "")
        nf = [r["nonfinite_step"] for r in runs]
        nf_s = "/".join("-" if s is None else str(s) for s in nf)
        outcomes = sorted({r["outcome"] for r in runs})
        outcome = (
            ", ".join(f"{o} {sum(r['outcome'] == o for r in runs)}/{len(runs)}" for o in outcomes)
            if len(runs) > 1
            else outcomes[0]
        )
        gmax = f"{np.median([r['max_grad_norm'] for r in runs]):.2g}"
        lines.append(
            f"{name:<34} {acc:>15} {nf_s:>13} {gmax:>8} {_mean_of(runs, 'clipped'):>8} "
            f"{_mean_of(runs, 'spikes'):>7} {_mean_of(runs, 'tensors_clipped'):>9} "
            f"{_mean_of(runs, 'skipped'):>8}  {outcome}"
        )
    return "\n".join(lines)
