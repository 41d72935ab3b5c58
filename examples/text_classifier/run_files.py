"""What a training run writes: per-step metrics (``metrics.jsonl``, with the progress bar),
``config.json`` and ``encoder.json`` at the start, and at the end ``results.json``, the
checkpoint, ``training.png`` and ``stability.png`` (:func:`write_outputs`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from checkpoints import save_checkpoint
from plotting import plot_run

import adaptx
from adaptx.report import plot as plot_stability

#: Steps whose metrics are fetched from the device together (one host transfer).
FETCH_EVERY = 10


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal (CI logs get the
    # one-line-per-epoch summaries instead).
    return tqdm(
        total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True, leave=False
    )


class MetricsLog:
    """The run's per-step metrics and per-epoch summaries, kept in ``history`` and ``epochs``.

    The steps' metrics (device arrays) go to an ``adaptx.MetricsWriter``, which fetches
    them :data:`FETCH_EVERY` steps at a time (one host transfer) and writes
    ``metrics.jsonl`` when given a ``path``. This log is the writer's sink: it receives each
    fetched step as host floats, keeps it in ``history`` and moves the progress bar. Each
    time new steps arrive, the newest one goes through ``adaptx.check``, which raises
    ``adaptx.DivergedError`` when the optimizer's guard has declared the run diverged: no
    host sync beyond the writer's own. ``say`` prints without breaking the bar.
    """

    def __init__(self, path: Path | None, total_steps: int, progress: bool, log: Callable):
        self.history: list[dict] = []
        self.epochs: list[dict] = []
        self._writer = adaptx.MetricsWriter(path, every_steps=FETCH_EVERY, sinks=(self,))
        self._bar = _progress(total_steps, progress, "train")
        self.say = self._bar.write if not self._bar.disable else log

    def add(self, step: int, metrics: dict) -> None:
        """Buffers one step's metrics; checks the newest fetched step for a divergence."""
        seen = len(self.history)
        self._writer.write(step, metrics)
        self._check_new(seen)

    def fetch(self) -> None:
        """Fetches and writes the buffered steps now (at the end of an epoch)."""
        seen = len(self.history)
        self._writer.flush()
        self._check_new(seen)

    def _check_new(self, seen: int) -> None:
        # An optimizer without a guard (one a caller passed in) has nothing to check.
        if len(self.history) > seen and any(k.endswith("/diverged") for k in self.history[-1]):
            adaptx.check(self.history[-1])

    def write_scalars(self, step: int, scalars: dict) -> None:
        """The writer's sink protocol (``clu.metric_writers``): one fetched step, or an
        epoch's summary (kept in ``epochs`` already)."""
        if "epoch" not in scalars:
            self.history.append({"step": step, **scalars})
            self._bar.update(1)

    def flush(self) -> None:
        """The sink protocol's end of a fetch: the progress bar shows the newest step."""
        if self.history:
            last = self.history[-1]
            self._bar.set_postfix(
                loss=f"{last['loss']:.3f}",
                acc=f"{last['accuracy']:.3f}",
                gnorm=f"{last['grad_norm']:.2f}",
            )

    def epoch(self, row: dict) -> None:
        """Keeps an epoch's summary and writes it, after its steps, as one line."""
        self.epochs.append(row)
        self._writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._bar.close()


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
