"""``python -m adaptx.report RUN``: the command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from adaptx.report import _output
from adaptx.report._bad_steps import bad_steps, write_bad_steps
from adaptx.report._events import summarize
from adaptx.report._plot import plot
from adaptx.report._read import metrics_path, read_metrics, step_records
from adaptx.report._summary import MAX_EVENTS, format_summary

_DESCRIPTION = """\
Reads a training log (metrics.jsonl: one JSON object per step, with the loss, the
gradient norm and adaptx.telemetry figures), prints one line per step where a defense
intervened (a guard skipped it, a clipper clipped it, a spike was let through, a
rewind) or the loss or gradient norm was not finite, with the norm against its running
median and, when per-tensor norms were logged, the tensor that held most of it; then
the count of each kind. Draws stability.png beside the log: the loss, the gradient
norm with the thresholds and every intervention, and a per-tensor heat map."""

_EPILOG = """\
examples:
  python -m adaptx.report runs/text_classifier/rotten_tomatoes-lstm-seed0
  python -m adaptx.report run/metrics.jsonl --out run/stability-2.png --max-events 50
  python -m adaptx.report RUN --no-plot --bad-steps RUN/bad_steps.json

exit status: 0 on success, 2 if the log cannot be read or the picture or the bad steps
not written."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adaptx.report",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a metrics.jsonl file or a run directory")
    parser.add_argument(
        "--out",
        metavar="PATH",
        help=f"the picture (default: {_output.DEFAULT_NAME} beside the log); a .png path, "
        "never a file the report did not write itself",
    )
    parser.add_argument(
        "--max-events",
        type=int,
        default=MAX_EVENTS,
        metavar="N",
        help=f"event lines printed, the rest counted (default: {MAX_EVENTS})",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")
    parser.add_argument(
        "--bad-steps",
        metavar="FILE",
        help="also write the skipped, clipped and non-finite steps to FILE as JSON, a list of "
        '{"step", "kind", "reason", ...} (for a data loader to skip those batches on '
        "resume); never over a file that is not such a list",
    )
    return parser


def _run(args: argparse.Namespace) -> None:
    """Reads, summarises, draws; warnings from reading are printed, not raised."""
    source = metrics_path(args.run)
    out = None
    if not args.no_plot:
        out = args.out if args.out is not None else source.parent / _output.DEFAULT_NAME
        out = _output.check_target(out, source=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(source)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    events = summarize(step_records(records))
    print(format_summary(records, events, max_events=args.max_events, source=str(source)))
    if args.bad_steps is not None:
        steps = bad_steps(records, events)
        written = write_bad_steps(args.bad_steps, steps, source=source)
        print(f"wrote {written} ({len(steps)} bad {'step' if len(steps) == 1 else 'steps'})")
    if out is not None:
        panels = plot(records, out)
        print(f"wrote {out} ({panels} panels)")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line: summary to stdout, picture beside the log.

    Args:
      argv: the arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
      The exit status: 0 on success, 2 when the log cannot be read (the error is
      printed to stderr) or the picture cannot be written there.

    Examples:
      >>> import pathlib, tempfile
      >>> rows = "".join(f'{{"step": {s}, "loss": 0.5, "grad_norm": 1.0}}\\n' for s in range(9))
      >>> with tempfile.TemporaryDirectory() as run:
      ...     _ = pathlib.Path(run, "metrics.jsonl").write_text(rows)
      ...     main([run, "--no-plot"])
      /.../metrics.jsonl: 9 steps (0-8), 0 events
      no events: no step was skipped, clipped or rewound, none non-finite
      0
    """
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
