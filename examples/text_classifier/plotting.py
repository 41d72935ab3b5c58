"""The example's pictures: ``training.png`` of a run, and ``compare-<scenario>.png``.

(``stability.png`` is drawn by ``adaptx.report.plot``, from the same records.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list[dict], epochs_log: list[dict], path: Path, config) -> None:
    """Loss (training batches, validation per epoch) and pre-clip gradient norm over steps.

    ``config`` is the run's ``config.Config`` (its ``ema``, ``optimizer`` and ``max_norm``).
    """
    plt = _pyplot()
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["loss"] for r in history], lw=0.6, alpha=0.5, label="train (batch)")
    val_label = "validation (averaged weights)" if config.ema > 0 else "validation"
    ax1.plot(
        [e["step"] for e in epochs_log], [e["val_loss"] for e in epochs_log], "o-", label=val_label
    )
    for e in epochs_log:
        ax1.annotate(
            f"{e['val_accuracy']:.3f}",
            (e["step"], e["val_loss"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax1.set(xlabel="step", ylabel="cross-entropy", title="loss (labels: validation accuracy)")
    ax1.legend()
    ax2.semilogy(
        steps,
        [float(r["grad_norm"]) for r in history],
        lw=0.6,
        label="gradient norm (before clipping)",
    )
    if config.optimizer != "robust_adamw":
        ax2.axhline(config.max_norm, color="k", ls="--", lw=0.8, label="max_norm")
    ax2.set(xlabel="step", title="global gradient norm")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(curves: dict[str, list[dict]], faults: dict[int, float], path: Path, title: str):
    """``compare.py``'s picture: smoothed loss and gradient norm per optimizer, faults marked."""
    plt = _pyplot()
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
