"""Same model, same seed, several optimizers: who survives gradient explosions?

    python examples/text_classifier/compare.py                      # clean run, no faults
    python examples/text_classifier/compare.py --inject-spikes      # 1e4 x gradient spikes
    python examples/text_classifier/compare.py --inject-nan         # one NaN gradient
    python examples/text_classifier/compare.py --model rnn          # exploding plain RNN
    python examples/text_classifier/compare.py --inject-nan --seeds 0,1,2
    python examples/text_classifier/compare.py --inject-spikes --inject-layer encoder/w_rec \
        --per-tensor --only robust_adamw                            # which tensor blew up?

Prints one table (one row per optimizer, averaged over seeds where more than one) and saves
``runs/text_classifier/compare-<scenario>.png`` with loss and gradient-norm curves of the
first seed side by side. Faults are scripted: the gradient the optimizer receives is
multiplied by ``--spike-scale`` (spikes) or by NaN at fixed steps, identically for every
optimizer; with ``--inject-layer``, only that parameter's gradient is. Each run writes its
``metrics.jsonl`` to ``runs/text_classifier/compare-<scenario>/<optimizer>-seed<N>/``, for
``python -m adaptx.report`` (``--per-tensor`` adds the per-tensor figures it names the
leading tensor from).

Columns: ``test acc`` final test accuracy (no early stopping; mean ± std over seeds);
``non-finite at`` first step whose loss or parameters were NaN/inf, per seed; ``max |g|``
largest finite gradient norm the optimizer received (median over seeds); ``clipped`` steps
whose gradient the optimizer scaled down and ``spikes`` steps it flagged as spikes (both from
``adaptx.telemetry``; ``-`` where the optimizer reports no such figure); ``tens-clip`` steps
on which a transform scaled down at least one tensor (``*/tensors_clipped``: update-RMS
clipping in these optimizers; also ``adagc`` and ``clip_by_block_rms``); ``skipped`` steps with
an exactly zero update; ``outcome`` ``ok``, ``diverged`` (ended with non-finite parameters) or
``not learning`` (finite, but test accuracy below 0.6).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import lr_sweep
import numpy as np
import train as train_lib
from compare_table import format_table, summarize
from config import parse_value
from flax import nnx
from model import build_model
from plotting import plot_compare
from scenarios import FAMILIES, SCENARIOS, fault_schedule
from steps import faulty_step, param_path

# --------------------------------------------------------------------------------------
# Fault injection: the train step with the gradients scaled (steps.faulty_step)


def fault_inputs(faults: dict[int, float]):
    """``step -> (scale,)`` for ``train(step_inputs=...)``: the multiplier of each step."""
    return lambda step: (np.float32(faults.get(step, 1.0)),)


def param_paths(config: train_lib.Config, dataset) -> list[str]:
    """The parameter paths of the model ``config`` describes (nothing is allocated)."""
    model = nnx.eval_shape(lambda: build_model(config, dataset.encoder, dataset.num_classes))
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return [param_path(p) for p, _ in flat]


# --------------------------------------------------------------------------------------
# The command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add(
        "--model",
        choices=sorted(SCENARIOS) + ["lm"],
        default="lstm",
        help="the scenario; 'lm' (the causal character LM of lm.py) only with --lr-sweep",
    )
    add(
        "--lr-sweep",
        action="store_true",
        help="train every optimizer of lr_sweep.OPTIMIZERS at every --lrs peak learning rate "
        "and report the final held-out loss and the learning-rate sensitivity",
    )
    add(
        "--lrs",
        default=None,
        help="comma-separated peak learning rates for --lr-sweep (default: six spanning 100x "
        "around the workload's best, lr_sweep.DEFAULT_LRS)",
    )
    add(
        "--inject-spikes",
        action="store_true",
        help="multiply the gradient by --spike-scale at 30%%, 50%% and 70%% of training",
    )
    add("--inject-nan", action="store_true", help="make the gradient NaN at 40%% of training")
    add(
        "--inject-layer",
        default=None,
        metavar="PATH",
        help="inject the faults into this one parameter's gradient only, e.g. encoder/w_rec "
        "(a path as adaptx.telemetry names it; an unknown one lists them)",
    )
    add("--spike-scale", type=float, default=1e4, help="the spikes' gradient multiplier")
    add("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    add("--steps", type=int, default=None, help="training steps per run")
    add("--lr", type=float, default=None, help="peak learning rate (default: the scenario's)")
    add("--only", default=None, help="comma-separated substrings: run only matching optimizers")
    add(
        "--per-tensor",
        action="store_true",
        help="build the adaptx optimizers with per-tensor figures and write them to each "
        "run's metrics.jsonl (python -m adaptx.report then names the leading tensor)",
    )
    add("--out", default="runs/text_classifier", help="folder of the table, plot and run folders")
    add(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override config.Config fields, e.g. --set recurrent_scale=1.2",
    )
    return p


def _base_config(args, p: argparse.ArgumentParser) -> train_lib.Config:
    """The scenario's Config with the --set and --lr overrides; runs write metrics only."""
    fields = {f.name for f in dataclasses.fields(train_lib.Config)}
    overrides = {"checkpoint": False, "plot": False, **SCENARIOS[args.model]["config"]}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            p.error(f"--set: unknown Config field {key!r}")
        overrides[key] = parse_value(key, value)
    if args.lr is not None:
        overrides["lr"] = args.lr
    return train_lib.Config(**overrides, progress=False, out=args.out)


def _slug(name: str) -> str:
    """An optimizer's name as a folder name: ``adaptx guard(adamw)`` -> ``adaptx_guard_adamw``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def _run_all(args, base, dataset, txs: dict, seeds: list[int], total: int, faults, scenario):
    """Trains every optimizer on every seed; returns the rows and the first seed's curves."""
    rows: dict[str, list[dict]] = {name: [] for name in txs}
    curves: dict[str, list[dict]] = {}
    step_fn = faulty_step(args.inject_layer, args.per_tensor)
    for seed in seeds:
        for name, tx in txs.items():
            config = dataclasses.replace(
                base, seed=seed, name=f"{scenario}/{_slug(name)}-seed{seed}"
            )
            result = train_lib.train(
                config,
                dataset=dataset,
                tx=tx,
                max_steps=total,
                step_fn=step_fn,
                step_inputs=fault_inputs(faults),
                early_stopping=False,
                log=lambda *_: None,
                validate=False,
            )
            row = summarize(result)
            rows[name].append(row)
            if seed == seeds[0]:
                curves[name] = result["history"]
            print(
                f"  seed {seed} {name:<34} test {row['test_acc']:.3f} {row['outcome']}"
                f" ({result['seconds']:.0f}s)",
                flush=True,
            )
    return rows, curves


def _name(args) -> str:
    """The scenario and its faults: ``lstm-spikes``, ``lstm-spikes-encoder.w_rec``."""
    name = args.model + "".join(
        s for s, on in (("-spikes", args.inject_spikes), ("-nan", args.inject_nan)) if on
    )
    return name + ("-" + args.inject_layer.replace("/", ".") if args.inject_layer else "")


def _optimizers(args, family: str, base: train_lib.Config, total: int) -> dict:
    """The factories of the scenario's family that ``--only`` selects."""
    lr = train_lib.learning_rate(base, total)
    table = FAMILIES[family](lr, base, args.per_tensor)
    if args.only:
        keys = args.only.split(",")
        table = {k: v for k, v in table.items() if any(s in k for s in keys)}
    return table


def main(argv=None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    if args.lr_sweep:
        return lr_sweep.run(args)
    if args.model == "lm":
        p.error("--model lm needs --lr-sweep")
    if args.inject_layer and not (args.inject_spikes or args.inject_nan):
        p.error("--inject-layer needs --inject-spikes or --inject-nan")
    scenario = SCENARIOS[args.model]
    base = _base_config(args, p)
    seeds = [int(s) for s in args.seeds.split(",")]

    dataset = train_lib.load_data(base)
    if args.inject_layer and args.inject_layer not in (paths := param_paths(base, dataset)):
        p.error(f"--inject-layer: no parameter {args.inject_layer!r}; the model has {paths}")
    steps_per_epoch = len(dataset.train) // base.batch_size
    total = args.steps or scenario.get("steps") or steps_per_epoch * base.epochs
    if total > steps_per_epoch * base.epochs:  # run as many epochs as the steps need
        base = dataclasses.replace(base, epochs=math.ceil(total / steps_per_epoch))
    faults = fault_schedule(total, args.inject_spikes, args.inject_nan, args.spike_scale)
    table = _optimizers(args, scenario["family"], base, total)
    name = _name(args)
    print(
        f"scenario {name}: {base.encoder} on {dataset.source}, {total} steps, "
        f"lr {base.lr}, seeds {seeds}, faults at "
        f"{ {s: ('nan' if math.isnan(v) else v) for s, v in faults.items()} or 'none' }"
        + (f" in {args.inject_layer}" if args.inject_layer else "")
        + f"; optimizers: {list(table)}"
    )
    t0 = time.perf_counter()
    # One transformation object per optimizer, reused across seeds: the jitted train step
    # then compiles once per optimizer instead of once per run.
    txs = {k: make() for k, make in table.items()}
    rows, curves = _run_all(args, base, dataset, txs, seeds, total, faults, f"compare-{name}")
    text = format_table(rows)
    print(f"\n{name}, {len(seeds)} seed(s), {time.perf_counter() - t0:.0f}s\n{text}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"compare-{name}.png"
    title = f"compare.py {name}: {base.encoder} on {dataset.source}, {total} steps"
    plot_compare(curves, faults, png, f"{title}, seed {seeds[0]}")
    (out / f"compare-{name}.txt").write_text(text + "\n")
    print(f"wrote {png}; each run's metrics.jsonl in {out / f'compare-{name}'}/")
    return rows


if __name__ == "__main__":
    main()
