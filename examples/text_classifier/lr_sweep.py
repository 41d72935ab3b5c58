"""Natural instability: final loss against peak learning rate, per optimizer.

    python examples/text_classifier/compare.py --lr-sweep --model transformer --seeds 0,1,2
    python examples/text_classifier/compare.py --lr-sweep --model lm --seeds 0,1,2

Each optimizer of :data:`OPTIMIZERS` trains the workload from the same seeds at every
learning rate of the grid (same warm-up and cosine schedule, scaled to its peak). The
figure of merit is the held-out loss at the end (the classifier's test loss, the LM's
validation loss); a run that diverged counts as its initial loss. The learning-rate
sensitivity of Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer
training instabilities") is

    LR sensitivity = mean over the grid of min(L(lr), L_init) - min over the grid of L(lr),

with L(lr) the mean over seeds. Lower is more robust; 0 means every learning rate of the
grid was as good as the best one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptx


def relative_step_cap(max_ratio: float, min_rms: float = 1e-3) -> optax.GradientTransformation:
    """Caps each tensor's final step at ``max_ratio`` times its parameter's RMS.

    ``u <- u * min(1, max_ratio * max(rms(p), min_rms) / rms(u))``, placed after the learning
    rate (and the weight decay), so the cap bounds what is applied: a per-tensor trust
    region in the spirit of LARS/LAMB's trust ratio (You et al. 2017, 2019) and Adafactor's
    relative step size (Shazeer and Stern 2018), but acting only above the bound. A
    measured experiment of the learning-rate sweep, not a library transform: it lowers the
    sensitivity only by also costing loss at the best learning rate (example README).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        def cap(u, p):
            rms_u = jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32))))
            rms_p = jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))))
            bound = max_ratio * jnp.maximum(rms_p, min_rms)
            return (u * jnp.minimum(1.0, bound / jnp.maximum(rms_u, 1e-30))).astype(u.dtype)

        return jax.tree.map(cap, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def _capped(ratio: float) -> Callable:
    return lambda lr, wd, mask: optax.chain(
        adaptx.robust_adamw(lr, weight_decay=wd, mask=mask), relative_step_cap(ratio)
    )


# name -> (learning-rate schedule, weight decay, decay mask) -> optimizer.
OPTIMIZERS: dict[str, Callable] = {
    "optax adamw": lambda lr, wd, mask: optax.adamw(lr, weight_decay=wd, mask=mask),
    "optax clip+adamw": lambda lr, wd, mask: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=wd, mask=mask)
    ),
    "adaptx.robust_adamw": lambda lr, wd, mask: adaptx.robust_adamw(lr, weight_decay=wd, mask=mask),
    "adaptx.robust_adamw(loss_z=6)": lambda lr, wd, mask: adaptx.robust_adamw(
        lr, weight_decay=wd, mask=mask, loss_z=6.0
    ),
    "adaptx.robust_adamw(loss_z=6, max_consecutive_skips=5)": lambda lr, wd, mask: (
        adaptx.robust_adamw(lr, weight_decay=wd, mask=mask, loss_z=6.0, max_consecutive_skips=5)
    ),
    # Back to the last snapshot (every 50 steps), learning rate halved, on a diverging loss.
    "adaptx.rewind(robust_adamw)": lambda lr, wd, mask: adaptx.rewind(
        adaptx.robust_adamw(lr, weight_decay=wd, mask=mask)
    ),
    # StableAdamW's own threshold, and no update clipping at all.
    "adaptx.robust_adamw(update_rms_clip=1)": lambda lr, wd, mask: adaptx.robust_adamw(
        lr, weight_decay=wd, mask=mask, update_rms_clip=1.0
    ),
    "adaptx.robust_adamw(update_rms_clip=None)": lambda lr, wd, mask: adaptx.robust_adamw(
        lr, weight_decay=wd, mask=mask, update_rms_clip=None
    ),
    # Each tensor's applied step at most 2 or 3 % of its parameter's RMS.
    "adaptx.robust_adamw + relative step cap 0.02": _capped(0.02),
    "adaptx.robust_adamw + relative step cap 0.03": _capped(0.03),
}

#: Six peak learning rates spanning 100x, per workload, each around its best one: the
#: classifier's best is near 2e-3; the LM's near 1e-2, and it turns unstable only near 1.
DEFAULT_LRS = {
    "transformer": tuple(float(f"{x:.2g}") for x in np.logspace(-3.5, -1.5, 6)),
    "lm": tuple(float(f"{x:.2g}") for x in np.logspace(-2.0, 0.0, 6)),
}


def _finite_or(x: float, fallback: float) -> float:
    return x if math.isfinite(x) else fallback


def classifier_tx(lr: float, make: Callable, base, dataset) -> optax.GradientTransformation:
    import train as train_lib

    config = dataclasses.replace(base, lr=lr)
    total = len(dataset.train) // config.batch_size * config.epochs
    return make(train_lib.learning_rate(config, total), config.weight_decay, train_lib.decay_mask)


def run_classifier(lr: float, seed: int, tx, base, dataset) -> dict:
    import train as train_lib

    r = train_lib.train(
        dataclasses.replace(base, lr=lr, seed=seed),
        dataset=dataset,
        tx=tx,
        early_stopping=False,
        log=lambda *_: None,
        write_files=False,
        validate=False,
    )
    return {
        "loss": r["test_loss"],
        "accuracy": r["test_accuracy"],
        "init_loss": r["history"][0]["loss"],
        "finite": r["params_finite"],
    }


def lm_tx(lr: float, make: Callable, base, data) -> optax.GradientTransformation:
    import lm as lm_lib

    config = dataclasses.replace(base, peak_lr=lr)
    return make(lm_lib.learning_rate(config), config.weight_decay, None)


def run_lm(lr: float, seed: int, tx, base, data) -> dict:
    import lm as lm_lib

    r = lm_lib.train_lm(dataclasses.replace(base, peak_lr=lr, seed=seed), tx, data=data)
    return {
        "loss": r["val_loss"],
        "accuracy": None,
        "init_loss": r["init_loss"],
        "finite": r["params_finite"],
    }


def sensitivity(losses: dict[float, list[float]], init_loss: float) -> dict:
    """Wortsman et al.'s LR sensitivity from per-seed final losses at each learning rate."""
    capped = {
        lr: float(np.mean([min(_finite_or(x, init_loss), init_loss) for x in v]))
        for lr, v in losses.items()
    }
    best_lr = min(capped, key=capped.get)
    return {
        "sensitivity": float(np.mean(list(capped.values())) - capped[best_lr]),
        "best_lr": best_lr,
        "best_loss": capped[best_lr],
        "mean_loss": capped,
    }


def sweep(workload: str, lrs, seeds, names, base, data, log=print) -> dict:
    """Trains every (optimizer, learning rate, seed); returns the runs and the sensitivities."""
    build, runner = (lm_tx, run_lm) if workload == "lm" else (classifier_tx, run_classifier)
    runs: dict[str, dict[float, list[dict]]] = {}
    for name in names:
        runs[name] = {}
        for lr in lrs:
            tx = build(lr, OPTIMIZERS[name], base, data)  # one per lr: the seeds share its compile
            runs[name][lr] = [runner(lr, s, tx, base, data) for s in seeds]
            r = runs[name][lr]
            log(f"  {name:<32} lr {lr:<8g} loss " + " ".join(f"{x['loss']:.4f}" for x in r))
    init = float(np.mean([x["init_loss"] for v in runs[names[0]].values() for x in v]))
    result = {
        "workload": workload,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "init_loss": init,
        "runs": {n: {str(lr): v for lr, v in r.items()} for n, r in runs.items()},
    }
    result["summary"] = {
        n: sensitivity({lr: [x["loss"] for x in v] for lr, v in r.items()}, init)
        for n, r in runs.items()
    }
    return result


def table(result: dict) -> str:
    lrs = result["lrs"]
    head = "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs)
    head += " | LR sensitivity | best lr | loss at best |"
    lines = [head, "|" + " --- |" * (len(lrs) + 4)]
    for name, s in result["summary"].items():
        cells = []
        for lr in lrs:
            v = [x["loss"] for x in result["runs"][name][str(lr)]]
            n_bad = sum(not math.isfinite(x) for x in v)
            mean = s["mean_loss"].get(lr, s["mean_loss"].get(str(lr)))  # (keys are str in JSON)
            cell = f"{mean:.3f}" + (f" ({n_bad} diverged)" if n_bad else "")
            cells.append(cell)
        lines.append(
            f"| `{name}` | "
            + " | ".join(cells)
            + f" | {s['sensitivity']:.4f} | {s['best_lr']:g} | {s['best_loss']:.4f} |"
        )
    return "\n".join(lines)


def accuracy_table(result: dict) -> str:
    """Mean test accuracy per optimizer and learning rate (the classifier only)."""
    lrs = result["lrs"]
    lines = [
        "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
        "|" + " --- |" * (len(lrs) + 2),
    ]
    for name, r in result["runs"].items():
        acc = [float(np.mean([x["accuracy"] for x in r[str(lr)]])) for lr in lrs]
        lines.append(
            f"| `{name}` | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {max(acc):.3f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    init = result["init_loss"]
    for name, r in result["runs"].items():
        lrs = result["lrs"]
        per = np.array([[min(_finite_or(x["loss"], init), init) for x in r[str(lr)]] for lr in lrs])
        s = result["summary"][name]["sensitivity"]
        ax.errorbar(
            lrs,
            per.mean(1),
            yerr=[per.mean(1) - per.min(1), per.max(1) - per.mean(1)],
            marker="o",
            capsize=3,
            label=f"{name} (sensitivity {s:.3f})",
        )
    ax.set_xscale("log")
    ax.axhline(init, color="gray", ls=":", lw=1, label="initial loss (diverged runs count as it)")
    ax.set(
        xlabel="peak learning rate",
        ylabel="final held-out loss (mean, min-max over seeds)",
        title=f"learning-rate sweep: {result['workload']}, seeds {result['seeds']}",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lr-sweep-{result['workload']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    text = table(result)
    if result["workload"] != "lm":
        text += "\n\nTest accuracy (mean over seeds):\n\n" + accuracy_table(result)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(result, stem.with_suffix(".png"))
    return stem


def run(args) -> dict:
    """``compare.py --lr-sweep``: the sweep its arguments ask for, printed and written."""
    seeds = [int(x) for x in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else DEFAULT_LRS[args.model]
    # --only: names given in full select exactly that optimizer, others match as substrings.
    keys = args.only.split(",") if args.only else []
    names = [
        n
        for n in OPTIMIZERS
        if not keys or n in keys or any(k in n for k in keys if k not in OPTIMIZERS)
    ]
    if args.model == "lm":
        import lm as lm_lib

        base = lm_lib.LMConfig(**({"steps": args.steps} if args.steps else {}))
        data = lm_lib.load_text(base)
    else:
        import train as train_lib
        from scenarios import SCENARIOS

        # One padded length (one compilation per optimizer and learning rate).
        base = train_lib.Config(
            **{**SCENARIOS[args.model]["config"], "buckets": 1}, progress=False, out=args.out
        )
        data = train_lib.load_data(base)
    t0 = time.perf_counter()
    print(f"lr sweep {args.model}: lrs {lrs}, seeds {seeds}, optimizers {names}", flush=True)
    result = sweep(args.model, lrs, seeds, names, base, data)
    stem = write(result, Path(args.out))
    print(f"\n{table(result)}\n({time.perf_counter() - t0:.0f}s) wrote {stem}.json/.md/.png")
    return result
