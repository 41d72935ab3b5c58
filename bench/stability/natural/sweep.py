"""``python -m bench.stability.natural``: every workload, every optimizer, no injected fault.

Writes ``bench/measured/natural.md`` and ``.json``. ``--quick`` runs one small variant of
each workload family with a handful of optimizers (the test's configuration).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from bench.stability.natural import (
    adam_spikes,
    fp16,
    goal,
    metrics,
    post_ln,
    report,
    rnn,
    runner,
    temporal_order,
)
from bench.stability.natural import optimizers as opt

FAMILIES = {
    "adam_spikes": adam_spikes,
    "rnn": rnn,
    "temporal_order": temporal_order,
    "post_ln": post_ln,
    "fp16": fp16,
}
NOTES = {
    "adam_spikes": (
        "Full-batch tanh MLP regression, constant rate, Adam family at the stated rate "
        "(`bench/stability/natural/adam_spikes.py`). Never fails by definition: read the "
        "late loss."
    ),
    "rnn_addition": (
        "Plain tanh RNN on the adding problem (recurrent radius 1.2, hidden 32, batch 20); "
        "SGD family at rate 0.05, Adam family at 1e-3. Fails: late MSE above 0.04 "
        f"(chance is 1/6). Fixed batch: {rnn.FIXED_SEQUENCES} sequences."
    ),
    "rnn_order": (
        "The temporal-order problem (`bench/stability/natural/temporal_order.py`) in the "
        "adding problem's tanh RNN: the class of the two marked symbols of a sequence of "
        "distractors, read from the last state. SGD family at rate 0.05, Adam family at "
        "1e-3. Fails: late cross-entropy above a quarter of chance "
        f"({temporal_order.FAIL_ABOVE:.3f} nats; keeping only the later symbol gives "
        f"0.693). Fixed batch: {rnn.FIXED_SEQUENCES} sequences."
    ),
    "rnn_char": (
        "Character RNN LM on the reviews text (recurrent radius 1.5, hidden 64, 32 "
        "characters, batch 16); SGD family at 1.0, Adam family at 3e-3. Fails: late loss "
        f"above the unigram model's loss on the fixed batch of {rnn.FIXED_WINDOWS} windows."
    ),
    "post_ln": (
        "Post-LN character transformer LM on the reviews text (6 layers, width 32, 32 "
        "characters, batch 8), Adam family from step 0 at a constant rate (no warm-up). "
        "Fails: late loss above the unigram model's loss on the fixed batch of "
        f"{post_ln.FIXED_WINDOWS} windows."
    ),
    "fp16": (
        "float16 character MLP LM (params, activations, loss, gradients and optimizer "
        "state in float16), no loss scaling except where named. Fails: late loss not finite "
        "or above the unigram model's loss on the fixed batch "
        f"({fp16.FIXED_BATCHES}x the training batch of 64 contexts)."
    ),
    "mechanisms": (
        "Rows not in the goal's baselines (kind `mechanism`): `optax amsgrad` (the second "
        "moment never decreases), `optax radam` (rectified early steps), `optax adamw + "
        "warm-up 100` (linear warm-up over 100 steps), `catch-up c=1` (the second moment "
        "rises at once to g^2, decays at b2), `lag back-off d=1.2` (the step factor is cut "
        "to d/r, and never recovers, when the loss is above 2x its leaky minimum and "
        "r = max over tensors of RMS(g/sqrt(v)) is above d; `+ RAdam`: with RAdam's "
        "rectified early steps), both prototypes in "
        "`bench/stability/natural/mechanisms.py` with float32 moments; "
        "`robust_adamw(update_rms_clip=None)`; `robust_adamw(nu_dtype=None)` (its second "
        "moment in the parameters' dtype, optax's choice, which was its default until the "
        "float16 rows below showed what it costs: `adaptx.robust_adamw` now keeps it in "
        "float32); `robust parts with float32 moments` (robust_adamw's chain with "
        "`mu_dtype=nu_dtype=float32`); `normalized gradient + adamw` (optax's "
        "`normalize_by_update_norm` in front of AdamW: Adam sees g / ||g||, so the gradient's "
        "global scale, rising or falling, never reaches its moments) and `guard(normalized "
        "gradient + robust Adam)` (the same inside robust_adamw's guard, with its update clip "
        "and a float32 second moment), tried after the normalized gradient solved the "
        "temporal order at T = 20 in a probe of that task and the adding problem at T = 10. "
        "Where a loss reaches float32's noise (the temporal order at T = 20, late loss "
        "3e-10), a jump from 1e-10 counts as an episode."
    ),
    "goal": (
        "Reference for the spike condition: `optax clip 1 + sgd` on the recurrent "
        "workloads, `optax clip 1 + adamw` elsewhere; the late-loss condition compares "
        "with the best optax baseline (any of them, chosen per workload); success "
        "compares with the best of the clip grid on SGD."
    ),
}
SEEDS = {"adam_spikes": 10, "rnn": 6, "temporal_order": 6, "post_ln": 3, "fp16": 6}
"""Seeds per cell by default: most where the runs are cheap and their late loss varies
most from seed to seed (the full-batch fits vary up to 15x over 3 seeds), fewest where one
run takes longest (the Post-LN stack, whose runs agree to 2 %)."""
RNN_ADAM = {
    "optax adamw",
    "optax clip 1 + adamw",
    "adaptx.robust_adamw",
    "adaptx.stable_adamw",
    "adaptx.spam",
    "adaptx.adam_atan2",
}
CANDIDATES = (
    "adaptx.robust_adamw",
    "adaptx.stable_adamw",
    "adaptx.spam",
    "adaptx.adam_atan2",
    "adaptx.clip_spikes + adamw",
    "robust_adamw(update_rms_clip=None)",
    "lag back-off d=1.2",
    "lag back-off d=1.2 + RAdam",
    "catch-up c=1",
    "robust_adamw(nu_dtype=None)",
    "robust parts with float32 moments",
    "optax amsgrad",
    "optax radam",
    "optax adamw + warm-up 100",
    "normalized gradient + adamw",
    "guard(normalized gradient + robust Adam)",
)


def entries_for(w: runner.Workload, quick: bool, only: set[str] | None) -> list[opt.Entry]:
    out = opt.adam_entries() + opt.mechanism_entries()
    if w.family.startswith("rnn"):
        out = [e for e in out if e.name in RNN_ADAM or e.kind == "mechanism"] + opt.sgd_entries()
    if w.family == "fp16":
        out += opt.loss_scale_entries()
    if quick:  # the candidate and the one reference its goal is checked against
        out = [e for e in out if e.name in opt.QUICK]
        if w.sgd_learning_rate is not None:
            out = [e for e in out if e.family == "sgd" or e.kind != "optax"]
    if only:
        out = [e for e in out if e.name in only]
    return out


def run_workload(w: runner.Workload, entries: list[opt.Entry], seeds: int, log) -> dict:
    per_opt, kinds = {}, {}
    for e in entries:
        lr = w.sgd_learning_rate if e.family == "sgd" else w.learning_rate
        t0 = time.perf_counter()
        curves = runner.train(w, e.make(lr), seeds, loss_scaled=e.loss_scaled)
        minibatch = curves.train if curves.fixed is not None else [None] * seeds
        runs = [
            metrics.run_figures(row, w.fail_above, mb)
            for row, mb in zip(curves.watched, minibatch, strict=True)
        ]
        per_opt[e.name] = metrics.over_seeds(runs) | {"per_seed": runs}
        kinds[e.name] = e.kind
        s = per_opt[e.name]
        log(
            f"  {e.name:40s} episodes {s['episodes']['median']:5.0f} fail {s['fail_rate']:.2f} "
            f"late {s['late']['median']:.3g} ({time.perf_counter() - t0:.0f}s)"
        )
    return {
        "steps": w.steps,
        "fail_above": w.fail_above,
        "seeds": seeds,
        "fixed_batch": w.eval_loss is not None,
        "optimizers": per_opt,
        "kinds": kinds,
    }


TABLE_ORDER = ("adam_spikes", "rnn_addition", "rnn_order", "rnn_char", "post_ln", "fp16")


def _table_order(family: str) -> int:
    """Families in :data:`TABLE_ORDER`, however they were recorded; any other last."""
    return TABLE_ORDER.index(family) if family in TABLE_ORDER else len(TABLE_ORDER)


def _merge(results: dict, new: dict) -> None:
    """Adds ``new``'s cells to ``results``. The rows of a cell already there are updated
    when both were run alike (steps, seeds, fixed batch); otherwise the new cell replaces it."""
    alike = ("steps", "seeds", "fixed_batch")
    for family, per_w in new.items():
        for name, cell in per_w.items():
            old = results.setdefault(family, {}).get(name)
            if old is not None and all(old.get(k) == cell.get(k) for k in alike):
                old["optimizers"].update(cell["optimizers"])
                old["kinds"].update(cell["kinds"])
            else:
                results[family][name] = cell


def rescore(results: dict, quick: bool) -> None:
    """Recomputes each recorded cell's failures from its per-seed late losses, at the
    failure level its workload has now (no training: the curves are the recorded ones)."""
    levels = {w.name: w.fail_above for f in FAMILIES.values() for w in f.variants(quick)}
    for per_w in results.values():
        for name, cell in per_w.items():
            if name not in levels:
                continue
            cell["fail_above"] = level = levels[name]
            for s in cell["optimizers"].values():
                for run in s["per_seed"]:
                    run["failed"] = metrics.failed(run["late"], level)
                s["fail_rate"] = float(np.mean([run["failed"] for run in s["per_seed"]]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.stability.natural", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny steps and seeds, one variant each")
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per cell (default: per family; quick 2)"
    )
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families")
    p.add_argument("--only", default=None, help="comma-separated optimizer names to run")
    p.add_argument(
        "--candidates", default=",".join(CANDIDATES), help="recipes checked against the goal"
    )
    p.add_argument("--out", default="bench/measured/natural", help="output path without suffix")
    p.add_argument("--merge", action="store_true", help="keep the other families already in --out")
    p.add_argument("--include", default=None, help="a results .json of another run to merge in")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="recompute the recorded cells' failures at their workloads' current failure levels",
    )
    args = p.parse_args(argv)
    seeds = {f: args.seeds or (2 if args.quick else n) for f, n in SEEDS.items()}
    only = set(args.only.split(",")) if args.only else None
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {}
    commands: list[str] = []
    previous = Path(args.out).with_suffix(".json")
    recorded = None  # the date of the last training, kept when nothing is trained now
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        results, commands = old["results"], old["meta"]["commands"]
        recorded = old["meta"]["date"]
    if args.include:
        other = json.loads(Path(args.include).read_text())
        _merge(results, other["results"])
        commands += other["meta"]["commands"]
    for fam in filter(None, args.families.split(",")):
        for w in FAMILIES[fam].variants(args.quick):
            log(f"{w.family} / {w.name}")
            cell = run_workload(w, entries_for(w, args.quick, only), seeds[fam], log)
            _merge(results, {w.family: {w.name: cell}})
    if args.rescore:
        rescore(results, args.quick)
    results = {f: results[f] for f in sorted(results, key=_table_order)}
    goals = {
        c: {
            w: goal.check(c, cell["optimizers"], cell["kinds"])
            for per_w in results.values()
            for w, cell in per_w.items()
        }
        for c in args.candidates.split(",")
    }
    this_command = shlex.join(["python", "-m", "bench.stability.natural", *(argv or sys.argv[1:])])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    trained = bool(args.families.strip(",") or args.include or args.rescore or not recorded)
    meta = {
        "date": now if trained else recorded,
        **({} if trained else {"rendered": now}),
        # Each command once, in the order first run (a re-merge adds nothing new).
        "commands": list(dict.fromkeys([*commands, this_command])),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "seeds": seeds,
        "quick": args.quick,
    }
    report.write(Path(args.out), meta, results, goals, NOTES)
    return {"meta": meta, "results": results, "goal": goals}
