"""Reading a ``metrics.jsonl`` training log into a list of per-step dicts."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: The file a run directory holds its log in.
METRICS = "metrics.jsonl"

# Strict JSON has no NaN/Infinity: loggers (the text classifier example) write them as strings.
_NONFINITE = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
}
# Keys that number the records rather than measure anything.
_INDEX_KEYS = ("step", "epoch")


def metrics_path(run: str | os.PathLike) -> Path:
    """The log file of ``run``: ``run`` itself, or ``run/metrics.jsonl`` for a directory.

    Args:
      run: a ``metrics.jsonl`` file or a run directory holding one.

    Returns:
      The file's ``Path``.

    Raises:
      FileNotFoundError: if there is no such file.

    Examples:
      >>> metrics_path("no/such/run")
      Traceback (most recent call last):
      ...
      FileNotFoundError: no/such/run: no such file or directory
    """
    path = Path(run)
    if path.is_dir():
        if not (path / METRICS).is_file():
            raise FileNotFoundError(f"{path}: a directory without a {METRICS} file")
        return path / METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


def as_float(value: Any) -> float | None:
    """``value`` as a float: numbers, booleans and ``"nan"``/``"inf"``/``"-inf"``; else ``None``.

    Args:
      value: one value of a record.

    Returns:
      A ``float`` (possibly NaN or infinite), or ``None`` for a missing or non-numeric value.

    Examples:
      >>> as_float(3), as_float(True), as_float("-inf"), as_float("adam"), as_float(None)
      (3.0, 1.0, -inf, None, None)
    """
    if isinstance(value, bool | int | float | np.number | np.bool_):
        return float(value)
    if isinstance(value, str):
        return _NONFINITE.get(value.strip().lower())
    return None


def _convert(value: Any) -> Any:
    """A record's value with the strings for non-finite numbers turned into floats."""
    if isinstance(value, str) and value.strip().lower() in _NONFINITE:
        return _NONFINITE[value.strip().lower()]
    return value


def _parse_lines(path: Path, lines: list[str]) -> list[dict]:
    """One dict per non-blank line; a cut-short last line is dropped with a warning."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records: list[dict] = []
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(numbered) - 1 and records:
                warnings.warn(
                    f"{path}: skipped line {n}, which is not complete JSON ({e.msg}); "
                    "the run was probably stopped while writing it",
                    UserWarning,
                    stacklevel=3,
                )
                break
            raise ValueError(
                f"{path}: line {n} is not JSON ({e.msg}); a metrics log has one JSON object "
                "per line, one line per training step"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: line {n} is a JSON {type(record).__name__}, not an object; a metrics "
                "log has one JSON object per line, one line per training step"
            )
        records.append({k: _convert(v) for k, v in record.items()})
    return records


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """Parses a training log: one JSON object per line, one line per training step.

    Values written as the strings ``"nan"``, ``"inf"`` or ``"-inf"`` (strict JSON has no
    non-finite numbers), or as the ``NaN``/``Infinity`` literals Python's :mod:`json`
    writes, become floats. A last line that is not complete JSON (a run stopped while
    writing it) is skipped with a ``UserWarning``. Lines without a measurement, like the
    per-epoch summaries the text classifier example writes, are kept: :func:`summarize`
    and :func:`plot` leave them out themselves.

    Args:
      run: a ``metrics.jsonl`` file, or a run directory holding one.

    Returns:
      ``list[dict]``, one dict per line, in the file's order.

    Raises:
      FileNotFoundError: if there is no such file.
      ValueError: if the file is empty, is not JSON lines, or holds no numeric field
        besides ``step``/``epoch``; the message names the file and the problem.

    Examples:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as run:
      ...     log = pathlib.Path(run, "metrics.jsonl")
      ...     _ = log.write_text('{"step": 0, "loss": 0.7}\\n{"step": 1, "loss": "nan"}\\n')
      ...     read_metrics(run)
      [{'step': 0, 'loss': 0.7}, {'step': 1, 'loss': nan}]
    """
    path = metrics_path(run)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file, so not a metrics log (JSON lines)") from None
    records = _parse_lines(path, text.splitlines())
    if not records:
        raise ValueError(f"{path}: the file is empty; a metrics log has one JSON line per step")
    if not any(measured(r) for r in records):
        raise ValueError(
            f"{path}: no line holds a numeric per-step field (such as 'loss', 'grad_norm' or "
            "an adaptx telemetry key like 'guard/skipped'), so there is nothing to report"
        )
    return records


def measured(record: dict) -> list[str]:
    """The keys of ``record`` holding a number, other than ``step`` and ``epoch``."""
    return [k for k, v in record.items() if k not in _INDEX_KEYS and as_float(v) is not None]


def step_records(records: list[dict]) -> list[dict]:
    """The per-step records, each with an integer ``step``.

    A record is left out when it measures nothing, or when it is a per-epoch summary:
    it has an ``epoch`` key and no ``loss`` key (the text classifier example writes
    ``epoch``, ``train_loss`` and ``val_loss`` after every epoch). A record without a
    numeric ``step`` is numbered one after the record before it.

    Args:
      records: dicts as :func:`read_metrics` returns them.

    Returns:
      New dicts, in order, whose ``step`` is an ``int``.

    Examples:
      >>> step_records([{"loss": 1.0}, {"loss": 0.9}, {"epoch": 1, "val_loss": 0.8}])
      [{'loss': 1.0, 'step': 0}, {'loss': 0.9, 'step': 1}]
    """
    out: list[dict] = []
    for r in records:
        if ("epoch" in r and "loss" not in r) or not measured(r):
            continue
        step = as_float(r.get("step"))
        if step is None or not math.isfinite(step):
            step = out[-1]["step"] + 1 if out else 0
        out.append({**r, "step": int(step)})
    return out


def column(records: list[dict], key: str) -> np.ndarray:
    """``key``'s values over ``records`` as float64, NaN where missing or not numeric.

    Examples:
      >>> column([{"a": 1}, {}, {"a": "inf"}], "a")
      array([ 1., nan, inf])
    """
    values = [as_float(r.get(key)) for r in records]
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
