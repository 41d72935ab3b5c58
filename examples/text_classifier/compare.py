"""Same model, same seed, several optimizers: who survives gradient explosions?

    python examples/text_classifier/compare.py                      # clean run, no faults
    python examples/text_classifier/compare.py --inject-spikes      # 1e4 x gradient spikes
    python examples/text_classifier/compare.py --inject-nan         # one NaN gradient
    python examples/text_classifier/compare.py --model rnn          # exploding plain RNN
    python examples/text_classifier/compare.py --inject-nan --seeds 0,1,2

Prints one table (one row per optimizer, averaged over seeds where more than one) and saves
``runs/text_classifier/compare-<scenario>.png`` with loss and gradient-norm curves of the
first seed side by side. Faults are scripted: the gradient the optimizer receives is
multiplied by ``--spike-scale`` (spikes) or by NaN at fixed steps, identically for every
optimizer.

Columns: ``test acc`` final test accuracy (no early stopping; mean ± std over seeds);
``non-finite at`` first step whose loss or parameters were NaN/inf, per seed; ``max |g|``
largest finite gradient norm the optimizer received (median over seeds); ``clipped`` steps
whose gradient the optimizer scaled down and ``spikes`` steps it flagged as spikes (both from
``adaptx.telemetry``; ``-`` where the optimizer reports no such figure); ``upd-clip`` steps on
which update-RMS clipping scaled down at least one tensor's step; ``skipped`` steps with
an exactly zero update; ``outcome`` ``ok``, ``diverged`` (ended with non-finite parameters) or
``not learning`` (finite, but test accuracy below 0.6).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lr_sweep  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import train as train_lib  # noqa: E402

import adaptx  # noqa: E402

# --------------------------------------------------------------------------------------
# Scenarios: the model and training setup under test, as train.Config overrides. Both train
# from scratch (no IMDB pretraining): the point here is the optimizer, not the last point
# of accuracy.

SCENARIOS: dict[str, dict] = {
    # The main job's BiLSTM with the Adam family; faults are injected on top of it.
    "lstm": dict(config=dict(epochs=3, pretrain_epochs=0, ema=0.0), family="adam"),
    # The small transformer encoder from scratch, light dropout and no bigram table (which
    # would make the step mostly an update of 6.4 M embedding rows): learns in 3 epochs.
    "transformer": dict(
        config=dict(
            encoder="transformer",
            epochs=3,
            pretrain_epochs=0,
            ema=0.0,
            bigrams=0,
            dropout=0.1,
            embed_dropout=0.1,
        ),
        family="adam",
    ),
    # A plain tanh RNN over 200-token IMDB reviews whose recurrent matrix is orthogonal x 1.5,
    # SGD with momentum: the gradient explodes by itself (norm ~3e3 at the first step), no
    # injection needed.
    "rnn": dict(
        config=dict(
            encoder="rnn",
            recurrent_scale=1.5,
            dataset="imdb",
            max_len=200,
            hidden_dim=128,
            bigrams=0,
            lr=0.05,
            warmup_steps=0,
            buckets=1,
            embed_dropout=0.0,
            dropout=0.0,
            epochs=1,
            pretrain_epochs=0,
            ema=0.0,
        ),
        family="sgd",
        steps=300,
    ),
}


# --------------------------------------------------------------------------------------
# The optimizers under comparison, defined once: name -> factory(lr, config). Every Adam
# variant has the same learning rate schedule and weight decay (matrices only), every SGD
# variant the same momentum.


def _adam_family(
    lr, config: train_lib.Config
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    wd, c, mask = config.weight_decay, config.max_norm, train_lib.decay_mask

    def adamw():
        return optax.adamw(lr, weight_decay=wd, mask=mask)

    return {
        "optax adamw (no clipping)": adamw,
        "optax apply_if_finite(clip+adamw)": lambda: optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(c), adamw()), max_consecutive_errors=20
        ),
        "adaptx.adamw (= clip+adamw)": lambda: adaptx.adamw(
            lr, weight_decay=wd, max_norm=c, mask=mask
        ),
        "adaptx autoclip+adamw": lambda: optax.chain(adaptx.autoclip(), adamw()),
        "adaptx guard(adamw)": lambda: adaptx.guard(
            adaptx.adamw(lr, weight_decay=wd, max_norm=c, mask=mask)
        ),
        "adaptx.robust_adamw": lambda: adaptx.robust_adamw(lr, weight_decay=wd, mask=mask),
    }


def _sgd_family(
    lr, config: train_lib.Config
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    c = config.max_norm

    def sgd():
        return optax.sgd(lr, momentum=0.9)

    return {
        "optax sgd (no clipping)": sgd,
        "adaptx.sgd (= clip+sgd)": lambda: adaptx.sgd(lr, momentum=0.9, max_norm=c),
        "adaptx zclip+sgd": lambda: optax.chain(adaptx.zclip(max_norm=c), sgd()),
        "adaptx autoclip+sgd": lambda: optax.chain(adaptx.autoclip(), sgd()),
        "adaptx guard(clip+sgd)": lambda: adaptx.guard(adaptx.sgd(lr, momentum=0.9, max_norm=c)),
    }


FAMILIES = {"adam": _adam_family, "sgd": _sgd_family}


# --------------------------------------------------------------------------------------


def fault_schedule(total_steps: int, spikes: bool, nan: bool, spike_scale: float):
    """Steps and multipliers of the scripted faults (identical for every optimizer)."""
    faults: dict[int, float] = {}
    if spikes:
        for frac in (0.3, 0.5, 0.7):
            faults[int(frac * total_steps)] = spike_scale
    if nan:
        faults[int(0.4 * total_steps)] = math.nan
    return faults


def summarize(result: dict) -> dict:
    hist = result["history"]
    nonfinite = next(
        (r["step"] for r in hist if not r["params_finite"] or not math.isfinite(r["loss"])), None
    )
    skipped_steps = [r["update_norm"] == 0.0 for r in hist]
    # A skipped step leaves the inner state (and its last clip scale) untouched: not counted.
    clipped = sum(
        any(v < 1.0 for k, v in r.items() if k.endswith("/scale")) and not skip
        for r, skip in zip(hist, skipped_steps, strict=True)
    )
    spikes = sum(
        any(v > 0 for k, v in r.items() if k.endswith("/spike")) and not skip
        for r, skip in zip(hist, skipped_steps, strict=True)
    )
    update_clipped = sum(
        any(v > 0 for k, v in r.items() if k.endswith("/update_clipped")) and not skip
        for r, skip in zip(hist, skipped_steps, strict=True)
    )
    clips_updates = any(k.endswith("/update_clipped") for k in hist[0]) if hist else False
    detects = any(k.endswith("/spike") for k in hist[0]) if hist else False
    reports_scale = any(k.endswith("/scale") for k in hist[0]) if hist else False
    skipped = sum(skipped_steps)
    finite = result["params_finite"]
    acc = result["test_accuracy"]
    outcome = "diverged" if not finite else ("not learning" if acc < 0.6 else "ok")
    norms = [r["grad_norm"] for r in hist if math.isfinite(r["grad_norm"])]
    return {
        "test_acc": acc,
        "nonfinite_step": nonfinite,
        "max_grad_norm": max(norms, default=0.0),
        "clipped": clipped if reports_scale else None,
        "spikes": spikes if detects else None,
        "update_clipped": update_clipped if clips_updates else None,
        "skipped": skipped,
        "outcome": outcome,
    }


def _mean_of(runs: list[dict], key: str) -> str:
    return "-" if runs[0][key] is None else f"{np.mean([r[key] for r in runs]):.0f}"


def format_table(rows: dict[str, list[dict]]) -> str:
    head = (
        f"{'optimizer':<34} {'test acc':>15} {'non-finite at':>13} {'max |g|':>8} "
        f"{'clipped':>8} {'spikes':>7} {'upd-clip':>8} {'skipped':>8}  outcome"
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
            f"{_mean_of(runs, 'spikes'):>7} {_mean_of(runs, 'update_clipped'):>8} "
            f"{_mean_of(runs, 'skipped'):>8}  {outcome}"
        )
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], faults: dict[int, float], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, hist in curves.items():
        steps = np.array([r["step"] for r in hist])
        loss = np.array([r["loss"] for r in hist], dtype=float)
        # Trailing mean over 10 steps; a run stops being drawn once its loss is NaN.
        smooth = np.array([loss[max(0, i - 9) : i + 1].mean() for i in range(len(loss))])
        (line,) = ax1.plot(steps, smooth, lw=1.2, label=name)
        gn = np.array([r["grad_norm"] for r in hist], dtype=float)
        ax2.semilogy(
            steps, np.where(np.isfinite(gn), gn, np.nan), lw=0.7, color=line.get_color(), alpha=0.8
        )
    for step, scale in faults.items():
        for ax in (ax1, ax2):
            ax.axvline(step, color="r" if math.isnan(scale) else "gray", ls=":", lw=1)
    kinds = " (dotted: injected faults, grey spike, red NaN)" if faults else ""
    ax1.set(xlabel="step", ylabel="training loss (10-step mean)", title="loss" + kinds)
    ax1.set_ylim(0, 1.5)
    ax2.set(xlabel="step", ylabel="global norm", title="gradient norm the optimizer received")
    ax1.legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=sorted(SCENARIOS) + ["lm"],
        default="lstm",
        help="the scenario; 'lm' (the causal character LM of lm.py) only with --lr-sweep",
    )
    p.add_argument(
        "--lr-sweep",
        action="store_true",
        help="train every optimizer of lr_sweep.OPTIMIZERS at every --lrs peak learning rate "
        "and report the final held-out loss and the learning-rate sensitivity",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="comma-separated peak learning rates for --lr-sweep (default: six spanning 100x "
        "around the workload's best, lr_sweep.DEFAULT_LRS)",
    )
    p.add_argument(
        "--inject-spikes",
        action="store_true",
        help="multiply the gradient by --spike-scale at 30%%, 50%% and 70%% of training",
    )
    p.add_argument(
        "--inject-nan", action="store_true", help="make the gradient NaN at 40%% of training"
    )
    p.add_argument("--spike-scale", type=float, default=1e4)
    p.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--only", default=None, help="comma-separated substrings: run only matching optimizers"
    )
    p.add_argument("--out", default="runs/text_classifier")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override train.Config fields, e.g. --set recurrent_scale=1.2",
    )
    args = p.parse_args(argv)
    if args.lr_sweep:
        return _lr_sweep(args)
    if args.model == "lm":
        p.error("--model lm needs --lr-sweep")

    scenario = SCENARIOS[args.model]
    fields = {f.name: f for f in dataclasses.fields(train_lib.Config)}
    overrides = dict(scenario["config"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            p.error(f"--set: unknown Config field {key!r}")
        kind = type(getattr(train_lib.Config(), key))
        overrides[key] = (
            value
            if kind is type(None)
            else (value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        )
    if args.lr is not None:
        overrides["lr"] = args.lr
    base = train_lib.Config(**overrides, progress=False, out=args.out)
    seeds = [int(s) for s in args.seeds.split(",")]

    dataset = train_lib.load_data(base)
    steps_per_epoch = len(dataset.train) // base.batch_size
    total = args.steps or scenario.get("steps") or steps_per_epoch * base.epochs
    if total > steps_per_epoch * base.epochs:  # run as many epochs as the steps need
        base = dataclasses.replace(base, epochs=math.ceil(total / steps_per_epoch))
    faults = fault_schedule(total, args.inject_spikes, args.inject_nan, args.spike_scale)
    lr = train_lib.learning_rate(base, total)
    table = FAMILIES[scenario["family"]](lr, base)
    if args.only:
        keys = args.only.split(",")
        table = {k: v for k, v in table.items() if any(s in k for s in keys)}

    scenario_name = args.model + "".join(
        s for s, on in (("-spikes", args.inject_spikes), ("-nan", args.inject_nan)) if on
    )
    print(
        f"scenario {scenario_name}: {base.encoder} on {dataset.source}, {total} steps, "
        f"lr {base.lr}, seeds {seeds}, faults at "
        f"{ {s: ('nan' if math.isnan(v) else v) for s, v in faults.items()} or 'none' }; "
        f"optimizers: {list(table)}"
    )
    rows: dict[str, list[dict]] = {name: [] for name in table}
    curves: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    # One transformation object per optimizer, reused across seeds: the jitted train step
    # then compiles once per optimizer instead of once per run.
    txs = {name: make() for name, make in table.items()}
    for seed in seeds:
        config = dataclasses.replace(base, seed=seed)
        for name, tx in txs.items():
            result = train_lib.train(
                config,
                dataset=dataset,
                tx=tx,
                max_steps=total,
                grad_scale=lambda s: faults.get(s, 1.0),
                early_stopping=False,
                log=lambda *_: None,
                write_files=False,
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
    text = format_table(rows)
    print(f"\n{scenario_name}, {len(seeds)} seed(s), {time.perf_counter() - t0:.0f}s\n{text}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"compare-{scenario_name}.png"
    plot(
        curves,
        faults,
        png,
        f"compare.py {scenario_name}: {base.encoder} on {dataset.source}, {total} steps, "
        f"seed {seeds[0]}",
    )
    (out / f"compare-{scenario_name}.txt").write_text(text + "\n")
    print(f"wrote {png}")
    return rows


def _lr_sweep(args) -> dict:
    """``--lr-sweep``: the learning-rate stress test of ``lr_sweep.py``."""
    seeds = [int(x) for x in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else lr_sweep.DEFAULT_LRS[args.model]
    # --only: names given in full select exactly that optimizer, others match as substrings.
    keys = args.only.split(",") if args.only else []
    names = [
        n
        for n in lr_sweep.OPTIMIZERS
        if not keys or n in keys or any(k in n for k in keys if k not in lr_sweep.OPTIMIZERS)
    ]
    if args.model == "lm":
        import lm as lm_lib

        base = lm_lib.LMConfig(**({"steps": args.steps} if args.steps else {}))
        data = lm_lib.load_text(base)
    else:
        # One padded length (one compilation per optimizer and learning rate).
        base = train_lib.Config(
            **{**SCENARIOS[args.model]["config"], "buckets": 1}, progress=False, out=args.out
        )
        data = train_lib.load_data(base)
    t0 = time.perf_counter()
    print(f"lr sweep {args.model}: lrs {lrs}, seeds {seeds}, optimizers {names}", flush=True)
    result = lr_sweep.sweep(args.model, lrs, seeds, names, base, data)
    stem = lr_sweep.write(result, Path(args.out))
    print(
        f"\n{lr_sweep.table(result)}\n({time.perf_counter() - t0:.0f}s) wrote {stem}.json/.md/.png"
    )
    return result


if __name__ == "__main__":
    main()
