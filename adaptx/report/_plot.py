"""The picture: loss, gradient norm with thresholds and interventions, per-tensor heat map.

Drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``),
so the backend of the calling process is left alone. matplotlib is imported only here,
when a picture is drawn: reading a log and summarising it need only NumPy.
"""

from __future__ import annotations

import math
import os

import numpy as np

from adaptx.report import _keys, _output
from adaptx.report._events import CLIP_SCALE, KINDS, Event, summarize
from adaptx.report._read import column, step_records

#: Marker and colour of each event kind on the gradient-norm panel.
STYLES = {
    "skip_nonfinite": ("X", "crimson"),
    "skip_nonfinite_loss": ("P", "darkred"),
    "skip_spike": ("v", "darkorange"),
    "skip_loss_spike": ("^", "saddlebrown"),
    "skip_max_grad_norm": ("v", "orangered"),
    "skip_max_loss": ("^", "sienna"),
    "skip": ("x", "red"),
    "rewind": ("*", "purple"),
    "nonfinite": ("X", "black"),
    "forced": ("D", "magenta"),
    "spike": ("o", "gold"),
    "clip": (".", "tab:green"),
}


def _positive(x: np.ndarray | float) -> np.ndarray:
    """``x`` with the values a log axis cannot show (<= 0, non-finite) set to NaN."""
    return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def _loss_panel(ax, steps: np.ndarray, rows: list[dict], keys: list[str]) -> None:
    key = _keys.loss_key(keys)
    if key is None:
        ax.text(0.5, 0.5, "no loss in the log", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="loss")
        return
    loss = column(rows, key)
    ax.plot(steps, np.where(np.isfinite(loss), loss, np.nan), lw=0.7, color="tab:blue")
    bad = (np.isnan(loss) & np.array([key in r for r in rows])) | np.isinf(loss)
    if bad.any():
        ax.plot(
            steps[bad],
            np.full(bad.sum(), 0.95),
            "x",
            color="crimson",
            transform=ax.get_xaxis_transform(),
            label=f"non-finite loss ({bad.sum()})",
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1), borderaxespad=0, fontsize=7)
    ax.set(ylabel=key, title="loss")


def _clip_levels(ax, rows: list[dict], keys: list[str]) -> None:
    """Horizontal lines at the max_norm of clippers that log no threshold, from clipped steps.

    For a transform logging ``grad_norm`` and ``scale`` (``clip_by_global_norm``), the
    bound is ``grad_norm * scale`` on every step it clipped.
    """
    thresholds = {_keys.split_key(k).prefix for k in _keys.threshold_keys(keys)}
    for prefix, figures in _keys.transforms(keys).items():
        if prefix in thresholds or not {"grad_norm", "scale"} <= figures:
            continue
        if prefix.rsplit("/", 1)[-1] == "dynamic_loss_scale":
            continue
        norm, scale = column(rows, f"{prefix}/grad_norm"), column(rows, f"{prefix}/scale")
        level = _positive(norm * scale)[(scale < CLIP_SCALE) & (scale > 0)]
        level = level[np.isfinite(level)]
        if level.size:
            ax.axhline(
                float(np.median(level)), ls="--", lw=0.8, color="0.3", label=f"{prefix} max_norm"
            )


def _markers(ax, events: list[Event]) -> None:
    """One scatter per event kind; a non-finite norm is marked at the top of the panel."""
    top = ax.get_xaxis_transform()
    for kind, label in KINDS.items():
        chosen = [e for e in events if e.kind == kind]
        if not chosen:
            continue
        marker, colour = STYLES[kind]
        style = dict(marker=marker, color=colour, s=28 if marker != "." else 40, zorder=3)
        shown = [e for e in chosen if e.grad_norm is not None and _positive(e.grad_norm) > 0]
        off = [e for e in chosen if e not in shown]
        if shown:
            ax.scatter([e.step for e in shown], [e.grad_norm for e in shown], **style)
        if off:
            ax.scatter(
                [e.step for e in off], [0.97] * len(off), transform=top, clip_on=False, **style
            )
        ax.scatter([], [], label=f"{label} ({len(chosen)})", **style)


def _norm_panel(ax, steps: np.ndarray, rows: list[dict], keys: list[str], events) -> None:
    key = _keys.norm_key(keys)
    norm = _positive(column(rows, key)) if key else np.full(len(rows), np.nan)
    ax.set(title="global gradient norm (before clipping) and interventions")
    if np.isnan(norm).all():
        ax.text(0.5, 0.5, "no gradient norm in the log", ha="center", transform=ax.transAxes)
        return
    ax.set_yscale("log")
    ax.plot(steps, norm, lw=0.7, color="tab:blue", label=key)
    for i, k in enumerate(_keys.threshold_keys(keys)):
        threshold = _positive(column(rows, k))
        if not np.isnan(threshold).all():
            ax.plot(steps, threshold, ls="--", lw=0.9, color=f"C{i + 1}", label=k)
    _clip_levels(ax, rows, keys)
    _markers(ax, events)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1), borderaxespad=0, fontsize=7)


def _relative(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each row over its median finite positive value.

    A logged non-finite norm becomes +inf (drawn in the colour map's "over" colour); a
    missing one, or a row without a positive finite norm, stays NaN (not drawn).
    """
    out = np.full_like(values, np.nan)
    for i, row in enumerate(values):
        good = row[np.isfinite(row) & (row > 0)]
        if good.size:
            out[i] = np.abs(row) / np.median(good)
    out[present & ~np.isfinite(values)] = np.inf
    return out


def _heat_panel(fig, ax, steps: np.ndarray, rows: list[dict], tensors: dict[str, str]) -> None:
    """Tensors down, steps across: each tensor's gradient norm over its median, log colours."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    names = list(tensors)
    values = np.stack([column(rows, tensors[n]) for n in names])
    present = np.array([[tensors[n] in r for r in rows] for n in names])
    rel = _relative(values, present)
    finite = rel[np.isfinite(rel) & (rel > 0)]
    span = max(10.0, float(finite.max()) if finite.size else 10.0)
    span = max(span, 1 / float(finite.min())) if finite.size else span
    cmap = colormaps["viridis"].with_extremes(over="red", under="navy")
    half = 0.5 if len(steps) < 2 else max(0.5, (steps[-1] - steps[0]) / (len(steps) - 1) / 2)
    image = ax.imshow(
        np.ma.masked_invalid(np.where(np.isinf(rel), span * 10, rel)),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=LogNorm(vmin=1 / span, vmax=span),
        extent=(steps[0] - half, steps[-1] + half, len(names) - 0.5, -0.5),
    )
    every = max(1, math.ceil(len(names) / 40))
    ax.set_yticks(range(0, len(names), every), names[::every], fontsize=6)
    ax.set(xlabel="step", title="per-tensor gradient norm / its median (red: non-finite)")
    fig.colorbar(image, ax=ax, extend="max", label="x its median", pad=0.01)


def plot(records: list[dict], path: str | os.PathLike) -> int:
    """Draws the stability picture of a run into a PNG file.

    Panel 1 is the loss over steps; panel 2 the global gradient norm (log scale) with
    the defenses' thresholds (``*/threshold``, ``*/max_norm``, and the bound of a
    clipper that logs none, read off its clipped steps) and a marker per event kind;
    panel 3, only when the log has per-tensor norms (``*/tensor_grad_norm/<param>``),
    a heat map of each tensor's norm over its own median. The file is marked as the
    report's own: an existing file is replaced only if the report wrote it.

    Args:
      records: dicts as :func:`read_metrics` returns them.
      path: where to write the picture; must end in ``.png``.

    Returns:
      The number of panels drawn, 2 or 3.

    Raises:
      FileExistsError: if ``path`` exists and is not a picture the report wrote.
      ValueError: if ``path`` does not end in ``.png``, or no record measures anything.

    Examples:
      >>> import pathlib, tempfile
      >>> rows = [{"step": s, "loss": 1 / (s + 1), "grad_norm": 1.0} for s in range(20)]
      >>> with tempfile.TemporaryDirectory() as run:
      ...     plot(rows, pathlib.Path(run, "stability.png"))
      2
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = _output.check_target(path)
    rows = step_records(records)
    if not rows:
        raise ValueError("no record measures anything (no numeric field besides step/epoch)")
    keys = _keys.all_keys(rows)
    tensors = _keys.tensor_keys(keys)
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    heights = [2.6, 3.2] + ([float(np.clip(0.15 * len(tensors) + 1, 2.5, 8))] if tensors else [])
    fig = Figure(figsize=(11, sum(heights) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    _loss_panel(axes[0], steps, rows, keys)
    _norm_panel(axes[1], steps, rows, keys, summarize(rows))
    if tensors:
        _heat_panel(fig, axes[2], steps, rows, tensors)
    axes[-1].set_xlabel("step")
    fig.savefig(path, format="png", dpi=100, metadata={"Software": _output.MARKER})
    return len(heights)
