"""The printed summary: one line per event, then counts by kind and the leading tensors."""

from __future__ import annotations

import collections

from adaptx.report._events import KINDS, Event, summarize
from adaptx.report._read import step_records

#: Event lines printed before "... and N more".
MAX_EVENTS = 20
#: Tensors listed by how often they led an event.
TOP_TENSORS = 5


def _header(rows: list[dict], events: list[Event], source: str | None) -> str:
    steps = [r["step"] for r in rows]
    span = f"{len(steps)} steps ({min(steps)}-{max(steps)})" if steps else "no steps"
    noun = "event" if len(events) == 1 else "events"
    return f"{source + ': ' if source else ''}{span}, {len(events)} {noun}"


def _counts(events: list[Event]) -> str:
    counts = collections.Counter(e.kind for e in events)
    return "interventions: " + ", ".join(
        f"{counts[kind]} {label}" for kind, label in KINDS.items() if counts[kind]
    )


def _leaders(events: list[Event]) -> str | None:
    counts = collections.Counter(e.tensor for e in events if e.tensor is not None)
    if not counts:
        return None
    top = counts.most_common(TOP_TENSORS)
    return "tensors that led the most events: " + ", ".join(f"{t} ({n})" for t, n in top)


def format_summary(
    records: list[dict],
    events: list[Event] | None = None,
    *,
    max_events: int = MAX_EVENTS,
    source: str | None = None,
) -> str:
    """The text report: a header, one line per event, counts by kind, the leading tensors.

    Args:
      records: dicts as :func:`read_metrics` returns them.
      events: the events of ``records``; computed with :func:`summarize` when ``None``.
      max_events: event lines printed; the rest are counted in a last
        ``"... and N more"`` line.
      source: a name for the log (its path) to start the header with.

    Returns:
      The report as one string, lines separated by ``"\\n"``, without a final newline.

    Examples:
      >>> rows = [{"step": s, "grad_norm": 2.0, "clip_by_global_norm/scale": 0.5} for s in range(3)]
      >>> rows[1].update({"grad_norm": 8.0, "clip_by_global_norm/scale": 0.125})
      >>> print(format_summary(rows))
      3 steps (0-2), 3 events
      step 0: grad norm 2; clipped by clip_by_global_norm (scale 0.5)
      step 1: grad norm 8 (4x its running median); clipped by clip_by_global_norm (scale 0.125)
      step 2: grad norm 2 (0.4x its running median); clipped by clip_by_global_norm (scale 0.5)
      interventions: 3 clipped
    """
    rows = step_records(records)
    events = summarize(rows) if events is None else events
    lines = [_header(rows, events, source)]
    if not events:
        lines.append("no events: no step was skipped, clipped or rewound, none non-finite")
        return "\n".join(lines)
    lines += [e.describe() for e in events[:max_events]]
    if len(events) > max_events:
        lines.append(f"... and {len(events) - max_events} more")
    lines.append(_counts(events))
    leaders = _leaders(events)
    if leaders:
        lines.append(leaders)
    return "\n".join(lines)
