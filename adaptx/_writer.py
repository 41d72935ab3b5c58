"""Writing per-step figures to a ``metrics.jsonl``, fetched from the device in batches."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaptx import _gather
from adaptx._core import validate
from adaptx.report._keys import split_key
from adaptx.report._read import METRICS

_FN = "MetricsWriter"
_REAL = (jnp.bool_, jnp.integer, jnp.floating)


def _check_sinks(sinks: Any) -> tuple[Any, ...]:
    if callable(getattr(sinks, "write_scalars", None)):
        raise TypeError(
            f"{_FN}: `sinks` must be a sequence of writers, got one writer, sinks={sinks!r}. "
            "Pass e.g. sinks=(writer,)."
        )
    if not isinstance(sinks, Iterable) or isinstance(sinks, str | bytes | Mapping):
        raise TypeError(
            f"{_FN}: `sinks` must be a sequence of objects with a write_scalars(step, scalars) "
            f"method, got sinks={sinks!r}. Pass e.g. sinks=() or sinks=(writer,)."
        )
    sinks = tuple(sinks)
    for i, sink in enumerate(sinks):
        if not callable(getattr(sink, "write_scalars", None)):
            raise TypeError(
                f"{_FN}: sinks[{i}]={sink!r} has no write_scalars(step, scalars) method (the "
                "protocol of clu.metric_writers). Wrap it in a class that has one, e.g. one "
                "that calls tensorboardX's SummaryWriter.add_scalar(name, value, step)."
            )
    return sinks


def _check_figure(key: Any, value: Any) -> None:
    """A figure must be a real scalar: checked on its dtype and shape, never its value."""
    if not isinstance(key, str):
        raise TypeError(f"{_FN}.write: figure names must be strings, got {key!r}.")
    if key == "step":
        raise ValueError(
            f"{_FN}.write: `figures` has a 'step' key; pass the step as the first argument, "
            "write(step, figures)."
        )
    if isinstance(value, str | bool | int | float | np.number | np.bool_):
        return
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    real = dtype is not None and _real(dtype)
    if not real or shape is None:
        raise TypeError(
            f"{_FN}.write: figures[{key!r}] must be a real number or a 0-d array, got {value!r}."
        )
    if tuple(shape) != ():
        raise ValueError(
            f"{_FN}.write: figures[{key!r}] has shape {tuple(shape)}; a figure is a scalar. "
            "Log a reduction of it (e.g. jnp.mean), as adaptx.telemetry does."
        )


@functools.cache
def _real(dtype: Any) -> bool:
    """Whether ``dtype`` is a bool, integer or float type (cached: write() runs every step)."""
    return any(jnp.issubdtype(dtype, t) for t in _REAL)


def _host(value: Any) -> Any:
    """A fetched figure as a Python ``bool``, ``int``, ``float`` or ``str``."""
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return bool(arr)
    if jnp.issubdtype(arr.dtype, jnp.integer):
        return int(arr)
    return float(arr)  # also bfloat16 and the other ml_dtypes floats


def _json(value: Any) -> Any:
    """Non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``, as the report reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _rank(value: Any) -> float:
    """Sort key of a per-tensor figure: NaN first, then the largest."""
    x = float(value)
    return math.inf if math.isnan(x) else x


def condense(row: dict[str, Any], top_k: int) -> dict[str, Any]:
    """``row`` with each per-tensor figure cut down to its ``top_k`` largest tensors.

    A per-tensor figure is a group of keys ``"<transform>/tensor_<figure>/<param path>"``
    with one transform and figure; NaN and infinite values count as the largest. The
    other keys, and the order of the kept ones, are left as they are.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for key, value in row.items():
        k = split_key(key)
        if k.tensor is not None and not isinstance(value, str):
            groups.setdefault((k.prefix, k.figure), []).append(key)
    dropped = set()
    for keys in groups.values():
        ranked = sorted(keys, key=lambda key: _rank(row[key]), reverse=True)
        dropped.update(ranked[top_k:])
    return {k: v for k, v in row.items() if k not in dropped}


def _run_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/metrics.jsonl`` for a directory (or a name without suffix)."""
    out = Path(path)
    if out.is_dir() or not out.suffix:
        out = out / METRICS
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


class MetricsWriter:
    """Writes per-step figures to a ``metrics.jsonl``, with one host transfer every few steps.

    ``write(step, figures)`` keeps the figures on the device (nothing waits for them:
    a step's device scalars are stacked into one vector per dtype by an asynchronous jitted
    call) and every ``every_steps`` calls fetches the whole buffer with one
    ``jax.device_get`` of one vector per dtype, so a flush is a few device-to-host copies
    however many figures and steps it holds (one copy per scalar costs more than a GPU's
    optimizer step: ``bench/writer_cost.py``). Then it appends one JSON line per step:
    ``{"step": step, **figures}``,
    NaN and infinities written as the strings ``"nan"``, ``"inf"``, ``"-inf"``. That is the
    log the text classifier example writes and ``python -m adaptx.report RUN`` reads.
    ``flush()``, ``close()`` and leaving a ``with`` block (also on an exception) write what
    is buffered, so nothing is lost. Lines are appended: a resumed run continues its log.

    Give it the figures of :func:`adaptx.telemetry` and whatever else you log per step
    (the loss, the gradient norm as ``"grad_norm"``), each a scalar.

    **Per-tensor figures.** With ``top_k``, each per-tensor figure of a step
    (``"<transform>/tensor_<figure>/<param path>"``, from
    ``adaptx.telemetry(state, per_tensor=True)``) keeps only its ``top_k`` largest
    tensors, NaN and infinities first; the report reads such a log as it is. A
    ``"<transform>/top_tensor"`` figure still counts among all the tensors.

    **Sinks.** Any object with a ``write_scalars(step, scalars)`` method (the protocol of
    ``clu.metric_writers``) receives, at each flush and for each step, the same figures as
    Python floats (NaN and infinities as floats); its ``flush()``, if it has one, is called
    after. The writer never closes a sink. A TensorBoard sink on ``tensorboardX``
    (``pip install tensorboardX``; it writes event files locally)::

      class TensorBoard:
          def __init__(self, logdir):
              self.writer = tensorboardX.SummaryWriter(logdir)

          def write_scalars(self, step, scalars):
              for name, value in scalars.items():
                  self.writer.add_scalar(name, value, step)

          def flush(self):
              self.writer.flush()

    Args:
      path: a run directory (the log is ``path/metrics.jsonl``; a path without a suffix
        counts as one, and is created) or the log file itself; ``None`` writes no file,
        only to ``sinks`` (which must then not be empty).
      every_steps: steps buffered between two fetches from the device (>= 1).
      top_k: keep this many tensors of each per-tensor figure per step (>= 1); ``None``
        keeps them all.
      sinks: writers that also receive every step's figures.

    Examples:
      >>> import tempfile, jax.numpy as jnp, optax, adaptx
      >>> from adaptx import report
      >>> tx = adaptx.guard(optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> with tempfile.TemporaryDirectory() as run:
      ...     with adaptx.MetricsWriter(run, every_steps=2) as writer:
      ...         for step in range(3):
      ...             grads = {"w": jnp.full(2, jnp.nan if step == 1 else 1.0)}
      ...             _, state = tx.update(grads, state, params)
      ...             writer.write(step, {"loss": jnp.float32(0.5), **adaptx.telemetry(state)})
      ...     rows = report.read_metrics(run)
      >>> [(r["step"], r["guard/last_reason"], round(r["guard/grad_norm"], 3)) for r in rows]
      [(0, 0, 1.414), (1, 1, nan), (2, 0, 1.414)]
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        every_steps: int = 100,
        top_k: int | None = None,
        sinks: Iterable[Any] = (),
    ):
        validate.check_int(_FN, "every_steps", every_steps, low=1, example="100")
        validate.check_int(_FN, "top_k", top_k, low=1, allow_none=True, example="8")
        self.every_steps = int(every_steps)
        self.top_k = top_k
        self.sinks = _check_sinks(sinks)
        if path is None and not self.sinks:
            raise ValueError(
                f"{_FN}: path=None writes no file, so it needs at least one sink; got "
                "sinks=(). Pass a run directory, or e.g. sinks=(writer,)."
            )
        self.path = None if path is None else _run_file(path)
        self._file = None if self.path is None else open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._closed = False
        self._pending: list[tuple[tuple[str, ...], _gather.Row]] = []

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def write(self, step: int | jax.Array, figures: Mapping[str, Any]) -> None:
        """Buffers one step's figures; every ``every_steps`` calls, fetches and writes them all.

        Args:
          step: the training step (an ``int``, or a 0-d integer array fetched with the rest).
          figures: ``{name: scalar}``; values are Python numbers or 0-d arrays (on device or
            not), checked by their dtype and shape only, so nothing waits for the device.

        Raises:
          ValueError: if the writer is closed, a figure is not a scalar, or ``figures`` has
            a ``"step"`` key.
          TypeError: if a figure is not a real number.
        """
        if self.closed:
            raise ValueError(f"{_FN}.write: the writer is closed; open a new MetricsWriter.")
        if not isinstance(figures, Mapping):
            raise TypeError(
                f"{_FN}.write: `figures` must be a dict of scalars, got figures={figures!r}."
            )
        for key, value in figures.items():
            _check_figure(key, value)
        self._pending.append((tuple(figures), _gather.pack([step, *figures.values()])))
        if len(self._pending) >= self.every_steps:
            self.flush()

    def flush(self) -> None:
        """Fetches the buffered steps (one ``jax.device_get``, an array per dtype); writes them."""
        if self.closed:
            raise ValueError(f"{_FN}.flush: the writer is closed.")
        if not self._pending:
            return
        fetched = _gather.fetch([row for _, row in self._pending])
        rows = []
        for (names, _), (step, *values) in zip(self._pending, fetched, strict=True):
            row = {k: _host(v) for k, v in zip(names, values, strict=True)}
            if self.top_k is not None:
                row = condense(row, self.top_k)
            rows.append((int(_host(step)), row))
        if self._file is not None:
            self._file.write("".join(json.dumps(_line(s, r)) + "\n" for s, r in rows))
            self._file.flush()
        self._pending.clear()
        for sink in self.sinks:
            for step, row in rows:
                sink.write_scalars(step, {k: float(v) for k, v in row.items() if _number(v)})
            if callable(getattr(sink, "flush", None)):
                sink.flush()

    def close(self) -> None:
        """Writes what is buffered and closes the log; closing twice does nothing."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._file is not None:
                self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _line(step: int, row: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, **{k: _json(v) for k, v in row.items()}}


def _number(value: Any) -> bool:
    return not isinstance(value, str)
