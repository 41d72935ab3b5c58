"""What a training run writes: per-step metrics (``metrics.jsonl``, with the progress bar),
``config.json`` and ``encoder.json`` at the start, and at the end ``results.json``, the
checkpoint, ``training.png`` and ``stability.png`` (:func:`write_outputs`)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from checkpoints import save_checkpoint
from plotting import plot_run

from adaptx.report import plot as plot_stability

#: Steps whose metrics are fetched from the device together (one host transfer).
FETCH_EVERY = 10


def json_line(d: dict) -> str:
    """One JSON line; strict JSON has no NaN/Infinity, so those are the strings "nan",
    "inf", "-inf".

    >>> json_line({"loss": float("nan"), "step": 3})
    '{"loss": "nan", "step": 3}'
    """
    return json.dumps(
        {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in d.items()}
    )


def _scalars(d: dict) -> dict:
    return {k: np.asarray(v).item() for k, v in d.items()}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal (CI logs get the
    # one-line-per-epoch summaries instead).
    return tqdm(
        total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True, leave=False
    )


class MetricsLog:
    """Collects the steps' metrics (device arrays, fetched :data:`FETCH_EVERY` at a time) and
    the epochs' summaries into ``history`` and ``epochs``, and, given a ``path``, writes
    each as one line of ``metrics.jsonl``. ``say`` prints without breaking the bar."""

    def __init__(self, path: Path | None, total_steps: int, progress: bool, log: Callable):
        self.history: list[dict] = []
        self.epochs: list[dict] = []
        self._pending: list[tuple[int, dict]] = []
        self._file = open(path, "w") if path is not None else None  # noqa: SIM115
        self._bar = _progress(total_steps, progress, "train")
        self.say = self._bar.write if not self._bar.disable else log

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        if len(self._pending) >= FETCH_EVERY:
            self.flush()

    def flush(self) -> None:
        rows = jax.device_get([m for _, m in self._pending])
        for (s, _), row in zip(self._pending, rows, strict=True):
            row = {"step": s, **_scalars(row)}
            self.history.append(row)
            if self._file:
                self._file.write(json_line(row) + "\n")
        if self._pending:
            self._bar.update(len(self._pending))
            last = self.history[-1]
            self._bar.set_postfix(
                loss=f"{last['loss']:.3f}",
                acc=f"{last['accuracy']:.3f}",
                gnorm=f"{last['grad_norm']:.2f}",
            )
        self._pending.clear()

    def epoch(self, row: dict) -> None:
        self.epochs.append(row)
        if self._file:
            self._file.write(json_line(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._bar.close()
        if self._file:
            self._file.close()


def start_run_dir(run_dir: Path, config, dataset) -> Path:
    """Creates the run folder with ``config.json`` and ``encoder.json``; returns the path of
    its ``metrics.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    (run_dir / "encoder.json").write_text(
        json.dumps({**dataset.encoder.to_json(), "class_names": dataset.class_names})
    )
    return run_dir / "metrics.jsonl"


def write_outputs(config, results: dict, model, log: MetricsLog, main_process: bool, say) -> None:
    """``results.json``, ``checkpoint/``, ``training.png`` and ``stability.png`` (as ``config``
    asks), in ``config.run_dir``; ``say`` reports what was written."""
    run_dir = config.run_dir
    if main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    if config.checkpoint:
        # Every process calls this, as orbax requires with several; the parameters are
        # host (NumPy) arrays, the same in every process, which orbax has process 0 write:
        # the same checkpoint as from one process, loadable on any device layout.
        save_checkpoint(run_dir / "checkpoint", model)
    if config.plot and main_process:
        plot_run(log.history, log.epochs, run_dir / "training.png", config)
        plot_stability(log.history, run_dir / "stability.png")
    written = ["metrics.jsonl"] + ["checkpoint/"] * config.checkpoint
    written += ["training.png", "stability.png"] * config.plot + ["results.json"]
    say(f"wrote {run_dir}/: {', '.join(written)}")
