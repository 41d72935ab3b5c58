"""The skipped and clipped steps of a run as JSON, for a data loader to skip on resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from adaptx.report._events import Event, summarize
from adaptx.report._reasons import REASONS

#: The event kinds written, and the kind of bad step each is (``"kind"`` in the JSON).
BAD_KINDS = {
    **{kind: "skipped" for kind, _ in REASONS.values()},
    "skip": "skipped",
    "nonfinite": "non-finite",
    "spike": "clipped",
    "clip": "clipped",
}
_WORDS = {
    **{kind: words for kind, words in REASONS.values()},
    "nonfinite": "non-finite loss or gradient norm, not skipped",
    "spike": "gradient-norm spike",
}


def _number(x: float | None) -> float | str | None:
    """A figure for strict JSON: NaN and infinities as ``"nan"``, ``"inf"``, ``"-inf"``."""
    return x if x is None or math.isfinite(x) else str(x)


def _entry(event: Event) -> dict:
    reason = _WORDS.get(event.kind) or (event.actions[0] if event.actions else event.kind)
    return {
        "step": event.step,
        "kind": BAD_KINDS[event.kind],
        "reason": reason,
        "actions": list(event.actions),
        "grad_norm": _number(event.grad_norm),
        "loss": _number(event.loss),
        "tensor": event.tensor,
    }


def bad_steps(records: list[dict], events: list[Event] | None = None) -> list[dict]:
    """The steps a guard skipped, a clipper clipped, or that went non-finite unskipped.

    Args:
      records: dicts as :func:`read_metrics` returns them.
      events: the events of ``records``; computed with :func:`summarize` when ``None``.

    Returns:
      One dict per bad step, in step order: ``step`` (int); ``kind``, ``"skipped"``,
      ``"clipped"`` or ``"non-finite"`` (not skipped); ``reason``, in words (a guard's
      reason, ``"non-finite gradients"``, or what the clipper did); ``actions``, every
      intervention at that step; ``grad_norm`` and ``loss`` (``None`` when not logged,
      ``"nan"``/``"inf"`` when not finite); ``tensor``, the parameter holding most of the
      gradient norm, with per-tensor norms in the log. Rewinds and spikes let through
      are left out.

    Examples:
      >>> rows = [{"step": s, "guard/grad_norm": 1.0, "guard/last_reason": 0} for s in range(5)]
      >>> rows[3].update({"guard/grad_norm": float("nan"), "guard/last_reason": 1})
      >>> bad_steps(rows)
      [{'step': 3, 'kind': 'skipped', 'reason': 'non-finite gradients',
        'actions': ['skipped by guard (non-finite gradients)'], 'grad_norm': 'nan',
        'loss': None, 'tensor': None}]
    """
    events = summarize(records) if events is None else events
    return [_entry(e) for e in events if e.kind in BAD_KINDS]


def is_bad_steps_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds what :func:`write_bad_steps` writes: a JSON list of steps."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, list) and all(
        isinstance(d, dict) and "step" in d and "kind" in d for d in data
    )


def write_bad_steps(
    path: str | os.PathLike, steps: list[dict], source: str | os.PathLike | None = None
) -> Path:
    """Writes ``steps`` as a JSON list, never over a file other than an earlier such list.

    Args:
      path: the JSON file.
      steps: what :func:`bad_steps` returns.
      source: the log the steps come from, never to be overwritten.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      FileExistsError: if ``path`` is ``source``, a directory, or an existing file that
        is not a list of bad steps.
    """
    out = Path(path)
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise FileExistsError(f"{out}: refusing to overwrite the metrics log with the bad steps")
    if out.is_dir():
        raise FileExistsError(f"{out}: is a directory; give the JSON file's name")
    if out.exists() and not is_bad_steps_file(out):
        raise FileExistsError(
            f"{out}: refusing to overwrite a file that is not a list of bad steps; "
            "remove it or choose another --bad-steps"
        )
    out.write_text(json.dumps(steps, indent=1) + "\n", encoding="utf-8")
    return out
