"""The stability benchmark: does a defense catch faults, and leave a healthy run alone?

    python -m bench.stability            # all traces and defenses, calibration grid, step cost
    python -m bench.stability --quick    # two short traces, no grid, a short cost run
    python -m bench.stability --no-cost --defenses "adaptx.robust_adamw,none"

Replays every trace of ``traces.npz`` (recorded by ``python -m bench.stability.record``)
through every defense of ``defenses.py``, clean and with each fault of ``faults.py``,
and writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
import optax

import adaptx
from bench.stability import cost, defenses, probes, report
from bench.stability import replay as replay_lib

HERE = Path(__file__).resolve().parent

#: clip_spikes settings tried for the recipe's defaults.
GRID = {
    "clip_z": (3.0, 4.0, 6.0),
    "clip_ratio": (3.0, 4.0),
    "clip_max_ratio": (10.0, 30.0, 100.0),
    "clip_alpha": (0.95, 0.98),
}


def load_traces(path: Path, quick: bool) -> tuple[dict, dict]:
    meta = json.loads(path.with_suffix(".json").read_text())
    with np.load(path.with_suffix(".npz")) as f:
        arrays = dict(f)
    names = list(meta)[:2] if quick else list(meta)
    traces = {}
    for name in names:
        t = {k: arrays[f"{name}/{k}"] for k in ("loss", "grad_norm")}
        traces[name] = {k: v[:200] for k, v in t.items()} if quick else t
    return traces, {k: meta[k] for k in names}


def score_all(chosen, traces: dict) -> dict:
    out = {}
    for d in chosen:
        t0 = time.perf_counter()
        out[d.name] = {
            name: replay_lib.score(d, trace, seed=i)
            for i, (name, trace) in enumerate(traces.items())
        }
        print(f"  {d.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def calibrate(traces: dict) -> list[dict]:
    """The recipe on every trace for each point of :data:`GRID` (one compilation in all)."""
    d = defenses.by_name("adaptx.robust_adamw")
    rows = []
    for values in itertools.product(*GRID.values()):
        hp = dict(zip(GRID, values, strict=True))
        per = {n: replay_lib.score(d, t, seed=i, hp=hp) for i, (n, t) in enumerate(traces.items())}
        rows.append({"hp": hp, "per_trace": per})
    return rows


def step_cost(chosen, quick: bool) -> dict:
    clipped, plain = "AdamW + update clip, no detector or guard", "AdamW, no detector or guard"
    variants = {"adaptx.adamw": lambda: adaptx.adamw(defenses.LR, max_norm=None)}
    variants[clipped] = probes.unguarded_chain
    variants[plain] = lambda: probes.unguarded_chain(update_rms_clip=None)
    for d in chosen:
        if d.recipe is not None:
            variants[d.name] = d.recipe
    # Each recipe over the same chain without its detector and guard.
    pairs = {
        f"{d.name} over {plain if 'update_rms_clip=None' in d.name else clipped}": (
            d.name,
            plain if "update_rms_clip=None" in d.name else clipped,
        )
        for d in chosen
        if d.recipe is not None and d.name.startswith("adaptx.robust_adamw")
    }
    kw = dict(rounds=3, reps=2, shapes=cost.tree_shapes(64, 1, 512)) if quick else {}
    return cost.paired_ratios(variants, baseline="adaptx.adamw", pairs=pairs, **kw)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two traces cut to 200 steps, no grid")
    p.add_argument("--traces", default=str(HERE / "traces"), help="path prefix of the traces")
    p.add_argument("--defenses", default=None, help="comma-separated names (default: all)")
    p.add_argument("--no-cost", action="store_true", help="skip the step-time measurement")
    p.add_argument("--no-grid", action="store_true", help="skip the calibration grid")
    p.add_argument("--out", default="bench/results/stability", help="path prefix of .json/.md")
    args = p.parse_args(argv)

    traces, meta = load_traces(Path(args.traces), args.quick)
    names = args.defenses.split(",") if args.defenses else [d.name for d in defenses.DEFENSES]
    chosen = [defenses.by_name(n) for n in names]
    print(f"{len(traces)} traces, {len(chosen)} defenses", flush=True)
    results = {
        "meta": {
            "quick": args.quick,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "device": str(jax.devices()[0]),
            "machine": platform.processor() or platform.machine(),
            "traces": meta,
        },
        "scores": score_all(chosen, traces),
    }
    if not (args.quick or args.no_grid):
        results["grid"] = calibrate(traces)
    if not args.no_cost:
        results["cost"] = step_cost(chosen, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = report.markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
