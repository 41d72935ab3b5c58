"""Train a Flax NNX text classifier on movie reviews with an adaptx optimizer.

    python examples/text_classifier/train.py                   # Rotten Tomatoes sentences
    python examples/text_classifier/train.py --dataset imdb    # 25,000 IMDB reviews
    python examples/text_classifier/train.py --data my.csv     # your CSV/JSONL (text, label)
    python examples/text_classifier/train.py --help

Writes to ``runs/text_classifier/<name>/``: ``metrics.jsonl`` (one line per step with loss,
accuracy, gradient norm and the optimizer's ``adaptx.telemetry`` figures, plus one line per
epoch with validation results), ``checkpoint/`` (orbax, best-validation parameters),
``encoder.json`` (vocabularies), ``config.json``, ``results.json``, ``training.png`` and
``stability.png`` (``python -m adaptx.report``: norms, thresholds and every intervention).

This file is the training loop (:func:`train`); the settings are in ``config.py``, the
data in ``data.py``, the model in ``model.py``, the optimizer in ``optimizers.py``, the
jitted steps in ``steps.py``, the outputs in ``run_files.py`` (see the README's table).
``--distributed`` runs one copy of this script per process (host), data parallel over the
devices of all of them; see "Several hosts" in the README.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import data as data_lib
import jax
import numpy as np
import optax
from config import Config, parse_args
from distributed import data_parallel, init_distributed, restore, shard_batch, snapshot
from flax import nnx
from model import build_model
from optimizers import decay_mask, learning_rate, make_optimizer
from pretrain import pretrain
from run_files import MetricsLog, start_run_dir, write_outputs
from steps import TrainState, all_finite, evaluate, faulty_step, make_train_step

import adaptx

# What other scripts use as train.X (bench/stability reads learning_rate and decay_mask).
__all__ = ["Config", "parse_args", "learning_rate", "decay_mask", "make_optimizer"]
__all__ += ["load_data", "make_train_step", "train", "main"]

# --------------------------------------------------------------------------------------
# Data


def load_data(config: Config) -> data_lib.TextData:
    """The dataset ``config`` names, split and encoded as its fields say."""
    return data_lib.load(
        config.dataset,
        config.data,
        max_len=config.max_len,
        vocab_size=config.vocab_size,
        min_count=config.min_count,
        split_seed=config.split_seed,
        limit=config.limit,
        bigrams=config.bigrams,
    )


def bucket_lengths(max_len: int, n: int) -> list[int]:
    """``n`` sequence lengths up to ``max_len``, multiples of 8 where possible.

    >>> bucket_lengths(48, 3)
    [16, 32, 48]
    """
    if n <= 1:
        return [max_len]
    cuts = {min(max_len, 8 * math.ceil(max_len * (i + 1) / n / 8)) for i in range(n - 1)}
    return sorted(cuts | {max_len})


@functools.lru_cache(maxsize=64)
def _accepting_value(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx``, taking ``value=loss`` even if it does not use it (one wrapper per ``tx``, so
    that repeated runs with the same ``tx`` reuse the compiled train step)."""
    return optax.with_extra_args_support(tx)


# --------------------------------------------------------------------------------------
# Training loop


class Plan(NamedTuple):
    steps_per_epoch: int
    total_steps: int
    epochs: int
    buckets: list[int]  # the padded sequence lengths (one compilation each)


def make_plan(config: Config, dataset: data_lib.TextData, max_steps: int | None) -> Plan:
    steps_per_epoch = max(len(dataset.train) // config.batch_size, 1)
    total_steps = steps_per_epoch * config.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    return Plan(
        steps_per_epoch, total_steps, epochs, bucket_lengths(config.max_len, config.buckets)
    )


@dataclasses.dataclass
class Run:
    """One run's fixed parts, shared by the loop's functions."""

    config: Config
    dataset: data_lib.TextData
    plan: Plan
    sharded: Any  # the batches' sharding
    log: MetricsLog
    step_fn: Callable  # a make_train_step(...) step
    step_inputs: Callable[[int], tuple] | None  # step -> the step_fn's extra inputs

    def evaluate(self, state: TrainState, split: data_lib.Split) -> dict:
        bs = self.config.batch_size
        return evaluate(state.model_def, state.model, state.ema, split, bs, self.sharded)


def train_epoch(run: Run, state: TrainState, batches, step: int) -> int:
    """Trains on ``batches`` (until the planned number of steps); returns the next step."""
    for tokens, labels, weights in batches:
        if step >= run.plan.total_steps:
            break
        extra = run.step_inputs(step) if run.step_inputs is not None else ()
        tokens, labels, weights = shard_batch((tokens, labels, weights), run.sharded)
        # Warm-up of the average: 1/2, 2/3, ... until it reaches config.ema.
        decay = np.float32(min(run.config.ema, (1 + step) / (2 + step)))
        args = (state.model, state.opt, state.ema, tokens, labels, weights, decay, *extra)
        state.model, state.opt, state.ema, metrics = run.step_fn(
            state.model_def, state.opt_def, *args
        )
        run.log.add(step, metrics)
        step += 1
    run.log.fetch()
    return step


def fit(run: Run, state: TrainState, validate: bool, early_stopping: bool) -> tuple[int, dict]:
    """The epochs: training, validation, the best epoch's weights kept, early stopping.

    Returns the number of steps and ``best`` (``accuracy``, ``epoch``, ``state``).
    """
    config, plan = run.config, run.plan
    best = {"accuracy": -1.0, "epoch": 0, "state": None}
    rng = np.random.default_rng(config.seed)
    step = 0
    for epoch in range(1, plan.epochs + 1):
        t_epoch = time.perf_counter()
        batches = data_lib.batches(
            run.dataset.train, config.batch_size, rng, drop_last=True, buckets=plan.buckets
        )
        step = train_epoch(run, state, batches, step)
        if not validate:
            continue
        val = run.evaluate(state, run.dataset.val)
        recent = run.log.history[-plan.steps_per_epoch :]
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean([r["loss"] for r in recent])),
            "train_accuracy": float(np.mean([r["accuracy"] for r in recent])),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "seconds": time.perf_counter() - t_epoch,
        }
        run.log.epoch(row)
        improved = val["accuracy"] > best["accuracy"]
        run.log.say(
            f"epoch {epoch}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.3f} | val loss {val['loss']:.4f} acc "
            f"{val['accuracy']:.3f}{' (best)' if improved else ''} [{row['seconds']:.0f}s]"
        )
        if improved:
            best.update(
                accuracy=val["accuracy"], epoch=epoch, state=snapshot((state.model, state.ema))
            )
        elif early_stopping and epoch - best["epoch"] >= config.patience:
            run.log.say(f"early stopping: no validation improvement for {config.patience} epochs")
            break
    return step, best


def _describe(config: Config, dataset: data_lib.TextData, model: nnx.Module) -> str:
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return (
        f"{dataset.source}: {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test, vocabulary {len(dataset.encoder.vocab)} (train split only); "
        f"{config.encoder} model, {n_params:,} parameters; "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", batch {config.batch_size}"
    )


def _nan_from(config: Config) -> Callable[[int], tuple]:
    """``--nan-from-step``: the scale of each step's gradients, NaN from that step on."""
    return lambda step: (np.float32(np.nan if step >= config.nan_from_step else 1.0),)


def train(
    config: Config,
    *,
    dataset: data_lib.TextData | None = None,
    tx: optax.GradientTransformation | None = None,
    max_steps: int | None = None,
    step_fn: Callable | None = None,
    step_inputs: Callable[[int], tuple] | None = None,
    early_stopping: bool = True,
    log: Callable[[str], None] = print,
    write_files: bool = True,
    validate: bool = True,
) -> dict:
    """Trains one model; returns a results dict (test accuracy, per-step history, ...).

    ``tx`` replaces the configured adaptx recipe, ``max_steps`` stops after that many
    steps, ``step_fn`` (a :func:`steps.make_train_step` step) replaces the train step and
    ``step_inputs(step)`` gives it its extra inputs (``compare.py`` injects faults so),
    ``validate=False`` skips the per-epoch validation (and so early stopping).
    """
    t_start = time.perf_counter()
    init_distributed(config)  # before anything below touches a device
    # Every process runs all of this on the same data, split, vocabulary and shuffles (all
    # seeded), and feeds its own devices their rows of each global batch; only process 0
    # prints and writes files (the checkpoint is written by all, as orbax requires).
    main_process = jax.process_index() == 0
    if not main_process:
        log = lambda *_: None  # noqa: E731
    if dataset is None:
        dataset = load_data(config)
    replicated, sharded = data_parallel(config.batch_size)  # checks batch_size % n_dev
    plan = make_plan(config, dataset, max_steps)
    model = build_model(config, dataset.encoder, dataset.num_classes)
    pretrain_info = {}
    if config.pretrain_epochs > 0 and dataset.source == "rotten_tomatoes":
        pretrain_info = pretrain(model, dataset, config, log)
    tx = _accepting_value(tx if tx is not None else make_optimizer(config, plan.total_steps))
    state = TrainState.create(model, tx, config.ema, replicated)
    log(_describe(config, dataset, model))
    path = start_run_dir(config.run_dir, config, dataset) if write_files and main_process else None
    metrics = MetricsLog(path, plan.total_steps, config.progress and main_process, log)
    if config.nan_from_step is not None and step_fn is None:
        step_fn, step_inputs = faulty_step(per_tensor=config.per_tensor), _nan_from(config)
    step_fn = step_fn or make_train_step(per_tensor=config.per_tensor)
    run = Run(config, dataset, plan, sharded, metrics, step_fn, step_inputs)
    try:
        steps, best = fit(run, state, validate, early_stopping)
    finally:
        metrics.close()

    params_finite = bool(all_finite(nnx.state(nnx.merge(state.model_def, state.model), nnx.Param)))
    if early_stopping and best["state"] is not None:
        state.model, state.ema = restore(best["state"], replicated)
    test, val = run.evaluate(state, dataset.test), run.evaluate(state, dataset.val)
    model = state.to_model()
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val["accuracy"],
        "best_epoch": best["epoch"],
        "steps": steps,
        "seconds": time.perf_counter() - t_start,
        "devices": jax.device_count(),
        "params_finite": params_finite,  # at the end of training (not the best epoch)
        **pretrain_info,
    }
    log(
        f"test accuracy {test['accuracy']:.4f} (best validation epoch {best['epoch']}, "
        f"{steps} steps, {results['seconds']:.0f}s)"
    )
    if write_files:
        write_outputs(config, results, model, metrics, main_process, log)
    results.update(history=metrics.history, epochs=metrics.epochs, model=model)
    return results


def main(argv=None) -> dict:
    config = parse_args(argv)
    try:
        return train(config)
    except (data_lib.DataFormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except adaptx.DivergedError as e:
        # The metrics up to the last fetch are in metrics.jsonl; nothing else is written.
        sys.exit(f"stopped: {e}\nsee: python -m adaptx.report {config.run_dir}")


if __name__ == "__main__":
    main()
