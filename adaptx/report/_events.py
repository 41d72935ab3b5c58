"""Finding the steps where a defense intervened or a figure went non-finite.

The rules are listed in the docstring of :mod:`adaptx.report`.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from adaptx.report import _keys
from adaptx.report._read import as_float, step_records
from adaptx.report._reasons import REASONS

#: Event kinds, most severe first; a step with several interventions takes the first.
KINDS = {
    "skip_nonfinite": "skipped (non-finite gradients)",
    "skip_nonfinite_loss": "skipped (non-finite loss)",
    "skip_spike": "skipped (gradient-norm spike)",
    "skip_loss_spike": "skipped (loss spike)",
    "skip_max_grad_norm": "skipped (gradient norm above max_grad_norm)",
    "skip_max_loss": "skipped (loss above max_loss)",
    "skip": "skipped",
    "rewind": "rewound",
    "nonfinite": "non-finite, not skipped",
    "forced": "spike let through",
    "spike": "spike clipped",
    "clip": "clipped",
}
#: The counters of adaptx's telemetry that mark a step, read by figure name whatever the
#: transform (their meanings are defined once, in ``adaptx._core.telemetry.COUNTERS``).
#: A cumulative counter marks the steps at which it went up: ``{figure: (kind, phrase)}``,
#: the phrase naming the transform's prefix as ``{}``.
CUMULATIVE = {
    "skipped": ("skip", "skipped by {}"),
    "nonfinite_skipped": ("skip_nonfinite", "skipped by {} (non-finite gradients)"),
    "num_skipped": ("skip_spike", "zeroed by {} (gradient-norm spike)"),
    "rewinds": ("rewind", "rewound by {}"),
    "forced": ("forced", "spike let through by {} (max_consecutive_skips reached)"),
    "num_clipped": ("clip", "clipped by {}"),
}
#: A count of the last step marks the steps at which it is positive:
#: ``{figure: (kind, what one is, what several are)}``.
PER_STEP = {"tensors_clipped": ("clip", "tensor clipped", "tensors clipped")}
#: A flag marks the steps at which it is 1: ``{figure: (kind, phrase)}``.
FLAGS = {"spike": ("spike", "spike clipped by {}")}
#: A ``*/scale`` below this is a clip.
CLIP_SCALE = 0.99
#: The running median of the norm is taken over this many preceding healthy steps.
WINDOW = 50


def number(x: float | None) -> str:
    """A short rendering of a figure: ``3.1e4``, ``0.25``, ``nan``.

    Examples:
      >>> number(31234.5), number(7081.2), number(0.25), number(12.0), number(2e-5)
      ('3.1e4', '7081', '0.25', '12', '2e-5')
    """
    if x is None or math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e3:
        return f"{x:.3g}"
    if 1e3 <= abs(x) < 1e4:
        return f"{x:.0f}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


@dataclasses.dataclass(frozen=True)
class Event:
    """A step where a defense intervened, or the loss or gradient norm was not finite.

    Attributes:
      step: the training step.
      kind: the most severe intervention at that step, a key of :data:`KINDS`
        (``"skip_spike"``, ``"clip"``, ...).
      grad_norm: the global gradient norm at that step (``None`` if not logged).
      ratio: ``grad_norm`` over its running median, the median of the norms of up to
        50 preceding healthy steps (``None`` without such steps or a finite norm).
      tensor: the parameter holding the largest share of the squared gradient norm at
        that step (``None`` without per-tensor norms in the log).
      share: that tensor's share of the squared norm, in [0, 1]; ``None`` when a
        per-tensor norm is non-finite (``tensor`` is then the first non-finite one).
      actions: what happened, one phrase per intervention
        (``"skipped by guard (non-finite loss)"``).
      loss: the loss at that step (``None`` if not logged).
    """

    step: int
    kind: str
    grad_norm: float | None
    ratio: float | None
    tensor: str | None = None
    share: float | None = None
    actions: tuple[str, ...] = ()
    loss: float | None = None

    def describe(self) -> str:
        """One line: step, norm and ratio, leading tensor and share, what happened.

        Returns:
          e.g. ``"step 1234: grad norm 3.1e4 (2.1e4x its running median); 97 % of it in
          encoder/qkv/kernel; skipped by guard (gradient-norm spike)"``.

        Examples:
          >>> Event(7, "clip", 5.0, 4.2, "w", 0.9, ("clipped by clip_by_global_norm",)).describe()
          'step 7: grad norm 5 (4.2x its running median); 90 % of it in w; clipped by ...'
        """
        parts = []
        if self.grad_norm is not None:
            ratio = "" if self.ratio is None else f" ({number(self.ratio)}x its running median)"
            parts.append(f"grad norm {number(self.grad_norm)}{ratio}")
        elif self.loss is not None:
            parts.append(f"loss {number(self.loss)}")
        if self.tensor is not None and self.share is not None:
            parts.append(f"{100 * self.share:.0f} % of it in {self.tensor}")
        elif self.tensor is not None:
            parts.append(f"non-finite in {self.tensor}")
        return f"step {self.step}: " + "; ".join(parts + list(self.actions))

    def __str__(self) -> str:
        return self.describe()


class _Context:
    """What the rules need to know about a log: its transforms and special keys."""

    def __init__(self, rows: list[dict]):
        keys = _keys.all_keys(rows)
        self.transforms = _keys.transforms(keys)
        self.norm = _keys.norm_key(keys)
        self.loss = _keys.loss_key(keys)
        self.tensors = _keys.tensor_keys(keys)


def _increased(row: dict, prev: dict | None, key: str) -> bool:
    """Whether the counter ``key`` went up since ``prev`` (from 0 at step 0)."""
    now = as_float(row.get(key))
    if prev is not None:
        before = as_float(prev.get(key))
    else:
        before = 0.0 if row["step"] == 0 else None
    return now is not None and before is not None and now > before


def _marked(figure: str, prefix: str, detail: str = "") -> tuple[str, str]:
    """``(kind, phrase)`` of a step marked by the counter ``figure`` of the transform ``prefix``."""
    kind, phrase = {**CUMULATIVE, **FLAGS}[figure]
    return kind, phrase.format(prefix) + detail


def _skips(prefix: str, figures: set[str], row: dict, prev: dict | None) -> list:
    """``(kind, phrase)`` for each way the transform at ``prefix`` skipped this step.

    A reason code (``last_reason``) says why, and stands for ``skipped``.
    """
    out = []
    reason = next((f for f in ("last_reason", "reason") if f in figures), None)
    if reason is not None:
        code = as_float(row.get(f"{prefix}/{reason}"))
        if code is not None and math.isfinite(code) and code != 0:
            kind, why = REASONS.get(int(code), ("skip", f"reason {number(code)}"))
            out.append((kind, f"skipped by {prefix} ({why})"))
    for figure in ("skipped", "nonfinite_skipped", "num_skipped"):
        if figure == "skipped" and reason is not None:
            continue
        if figure in figures and _increased(row, prev, f"{prefix}/{figure}"):
            out.append(_marked(figure, prefix))
    return out


def _others(prefix: str, figures: set[str], row: dict, prev: dict | None) -> list:
    """``(kind, phrase)`` for each rewind, forced spike and clip by the transform at ``prefix``.

    A transform's ``scale`` says whether it clipped (below :data:`CLIP_SCALE`) and by how
    much, and stands for its cumulative ``num_clipped``.
    """
    name = prefix.rsplit("/", 1)[-1]

    def value(figure: str) -> float | None:
        return as_float(row.get(f"{prefix}/{figure}")) if figure in figures else None

    def went_up(figure: str) -> bool:
        return figure in figures and _increased(row, prev, f"{prefix}/{figure}")

    out = []
    if went_up("rewinds"):
        lr = value("lr_scale")
        scaled = f" (lr scale now {number(lr)})" if lr is not None else ""
        out.append(_marked("rewinds", prefix, scaled))
    if went_up("forced"):
        out.append(_marked("forced", prefix))
    scale = value("scale") if name != "dynamic_loss_scale" else None
    scaled = f" (scale {number(scale)})" if scale is not None else ""
    spike = value("spike")
    if spike is not None and spike >= 0.5:
        out.append(_marked("spike", prefix, scaled))
    elif scale is not None and scale < CLIP_SCALE:
        out.append(("clip", f"clipped by {prefix}{scaled}"))
    elif "scale" not in figures and went_up("num_clipped"):
        out.append(_marked("num_clipped", prefix))
    for figure, (kind, one, several) in PER_STEP.items():
        count = value(figure)
        if count is not None and math.isfinite(count) and count > 0:
            out.append((kind, f"{number(count)} {one if count == 1 else several} by {prefix}"))
    return out


def _interventions(ctx: _Context, row: dict, prev: dict | None) -> list[tuple[str, str]]:
    """Every ``(kind, phrase)`` at one step; a skip hides the clips of that step.

    On a skipped step the transforms inside a guard keep the previous step's state, so
    their scale and spike figures are last step's, and nothing was applied anyway.
    """
    skips, others = [], []
    for prefix, figures in ctx.transforms.items():
        skips += _skips(prefix, figures, row, prev)
        others += _others(prefix, figures, row, prev)
    if skips:
        return skips + [o for o in others if o[0] in ("rewind", "forced")]
    for key, what in ((ctx.loss, "loss"), (ctx.norm, "gradient norm")):
        value = as_float(row.get(key)) if key else None
        if value is not None and not math.isfinite(value):
            others.insert(0, ("nonfinite", f"non-finite {what}, not skipped"))
    return others


def leading_tensor(row: dict, tensors: dict[str, str]) -> tuple[str | None, float | None]:
    """The tensor with the largest share of the squared gradient norm in ``row``, and its share.

    Args:
      row: one record.
      tensors: ``{param path: key}`` of its per-tensor gradient norms.

    Returns:
      ``(path, share)``; ``(first non-finite path, None)`` when a norm is not finite;
      ``(None, None)`` without per-tensor norms (or when they are all zero).

    Examples:
      >>> leading_tensor({"t/a": 3.0, "t/b": 4.0}, {"a": "t/a", "b": "t/b"})
      ('b', 0.64)
    """
    names, values = [], []
    for name, key in tensors.items():
        v = as_float(row.get(key))
        if v is not None:
            names.append(name)
            values.append(v)
    if not values:
        return None, None
    norms = np.abs(np.array(values, dtype=np.float64))
    bad = ~np.isfinite(norms)
    if bad.any():
        return names[int(np.argmax(bad))], None
    squares = norms**2
    if squares.sum() <= 0:
        return None, None
    i = int(np.argmax(squares))
    return names[i], float(squares[i] / squares.sum())


def summarize(records: list[dict]) -> list[Event]:
    """The steps where a defense intervened, or the loss or gradient norm was not finite.

    See :mod:`adaptx.report` for the exact rules. Each event carries the global gradient
    norm, its ratio to the running median of the preceding healthy steps (finite,
    nonzero norms of steps neither skipped, rewound, spiking nor non-finite), and, when
    the log has per-tensor norms (``*/tensor_grad_norm/<param path>``), the tensor
    holding the largest share of the squared norm.

    Args:
      records: dicts as :func:`read_metrics` returns them (per-epoch summary lines and
        lines measuring nothing are left out).

    Returns:
      ``list[Event]``, one per step with an event, in step order.

    Examples:
      >>> rows = [{"step": s, "guard/grad_norm": 2.0, "guard/last_reason": 0} for s in range(5)]
      >>> rows.append({"step": 5, "guard/grad_norm": 900.0, "guard/last_reason": 2})
      >>> [str(e) for e in summarize(rows)]
      ['step 5: grad norm 900 (450x its running median); skipped by guard (gradient-norm spike)']
    """
    rows = step_records(records)
    ctx = _Context(rows)
    order = list(KINDS)
    healthy: collections.deque[float] = collections.deque(maxlen=WINDOW)
    events: list[Event] = []
    prev = None
    for row in rows:
        found = _interventions(ctx, row, prev)
        prev = row
        norm = as_float(row.get(ctx.norm)) if ctx.norm else None
        finite = norm is not None and math.isfinite(norm)
        ratio = None
        if norm is not None and finite and healthy and float(np.median(healthy)) > 0:
            ratio = norm / float(np.median(healthy))
        kind = min((k for k, _ in found), key=order.index, default=None)
        if kind in (None, "clip"):
            if norm is not None and finite and norm > 0:
                healthy.append(norm)
        if kind is None:
            continue
        tensor, share = leading_tensor(row, ctx.tensors)
        loss = as_float(row.get(ctx.loss)) if ctx.loss else None
        actions = tuple(phrase for _, phrase in found)
        events.append(Event(row["step"], kind, norm, ratio, tensor, share, actions, loss))
    return events
