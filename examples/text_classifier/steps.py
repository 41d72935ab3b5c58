"""The jitted steps: one optimizer step on a batch (:func:`make_train_step`), the same with
the gradients scaled (:func:`faulty_step`: injected faults), evaluation, and the state they
take (:class:`TrainState`).

They take the static graph definitions first (``nnx.split``), so compilations are reused by
every run whose model and optimizer have the same structure (``compare.py``, the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import data as data_lib
import jax
import jax.numpy as jnp
import optax
from distributed import replicate, shard_batch, to_host
from flax import nnx

import adaptx


@dataclasses.dataclass
class TrainState:
    """What the jitted steps take: the static graph definitions and the (donated) arrays,
    replicated over the devices (batches are sharded)."""

    model_def: Any
    opt_def: Any
    model: Any  # nnx.State of the model
    opt: Any  # nnx.State of the nnx.Optimizer
    ema: Any  # moving average of the parameters, or None

    @classmethod
    def create(cls, model: nnx.Module, tx, ema: float, replicated) -> TrainState:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        model_def, model_state = nnx.split(model)
        opt_def, opt_state = nnx.split(optimizer)
        average = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)) if ema > 0 else None
        # (copies: a buffer must not appear twice among the donated arguments)
        arrays = jax.tree.map(jnp.copy, replicate((model_state, opt_state, average), replicated))
        return cls(model_def, opt_def, *arrays)

    def to_model(self) -> nnx.Module:
        """The model on the host, with the averaged weights where there are some."""
        model = nnx.merge(self.model_def, to_host(self.model))
        if self.ema is not None:
            nnx.update(model, to_host(self.ema))
        return model


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _loss(model, tokens, labels, weights, deterministic):
    logits = model(tokens, deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    denom = jnp.maximum(weights.sum(), 1.0)
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    return (losses * weights).sum() / denom, (correct * weights).sum() / denom


def _guarded(optimizer) -> bool:
    """Whether the optimizer holds an ``adaptx.guard`` (read off its telemetry's names)."""
    return any(k.split("/")[-2:] == ["guard", "last_reason"] for k in adaptx.telemetry(optimizer))


@functools.cache
def make_train_step(grad_fn: Callable | None = None, per_tensor: bool = False) -> Callable:
    """The jitted train step; the same arguments give the same function (and compilations).

    ``step(model_def, opt_def, model_state, opt_state, ema, tokens, labels, weights,
    ema_decay, *extra)`` makes one optimizer step on a batch and donates (reuses the memory
    of) the incoming state. ``ema`` (parameters only, or None) moves towards the new
    parameters by ``1 - ema_decay``. ``grad_fn(grads, *extra)``, if given, returns the
    gradients the optimizer receives (``compare.py`` injects faults with it); ``extra``
    are the step's own inputs, from ``train(step_inputs=...)``. ``per_tensor``: the
    metrics include the optimizer's per-tensor figures.
    """

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
    def step(
        model_def, opt_def, model_state, opt_state, ema, tokens, labels, weights, decay, *extra
    ):
        model = nnx.merge(model_def, model_state)
        optimizer = nnx.merge(opt_def, opt_state)
        # A step the guard skips leaves the model's other variables (the dropout RNG
        # counts) as they were, too: adaptx.restore_on_skip puts them back.
        restoring = adaptx.restore_on_skip if _guarded(optimizer) else _nothing
        with restoring(model, optimizer):
            (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(
                model, tokens, labels, weights, False
            )
            if grad_fn is not None:
                grads = grad_fn(grads, *extra)
            # The loss goes to the optimizer too (optax's extra-args convention), so that a
            # guard can skip a step whose loss is non-finite or an outlier.
            updates = optimizer.update(model, grads, value=loss)
        params = nnx.state(model, nnx.Param)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), ema, params)
        metrics = {
            "loss": loss,
            "accuracy": acc,
            "grad_norm": optax.tree.norm(grads),  # what the optimizer received, before clipping
            "update_norm": optax.tree.norm(updates),
            "params_finite": all_finite(params),
            **adaptx.telemetry(optimizer, per_tensor=per_tensor),
        }
        return nnx.state(model), nnx.state(optimizer), ema, metrics

    return step


train_step = make_train_step()


def _nothing(model, optimizer):
    del model, optimizer
    return contextlib.nullcontext()


def param_path(path: tuple) -> str:
    """A tree path as ``adaptx.telemetry`` names a parameter: ``"encoder/w_rec"``."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue  # an nnx Variable's array: the path names the variable
        names.append(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))))
    return "/".join(names)


def inject(grads, scale: jax.Array, layer: str | None = None):
    """The gradients times ``scale``: all of them, or only the parameter at path ``layer``."""

    def one(path, g):
        if layer is None or param_path(path) == layer:
            return g * scale.astype(g.dtype)
        return g

    return jax.tree.map_with_path(one, grads)


@functools.cache
def faulty_step(layer: str | None = None, per_tensor: bool = False):
    """The train step with :func:`inject` in it; its extra input is the step's fault scale
    (1 on healthy steps, NaN for a NaN gradient)."""
    return make_train_step(functools.partial(inject, layer=layer), per_tensor=per_tensor)


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model_def, model_state, ema, tokens, labels, weights):
    model = nnx.merge(model_def, model_state)
    if ema is not None:
        nnx.update(model, ema)
    loss, acc = _loss(model, tokens, labels, weights, True)
    n = weights.sum()
    return {"loss_sum": loss * n, "correct": acc * n, "count": n}


def evaluate(model_def, model_state, ema, split: data_lib.Split, batch_size: int, shard) -> dict:
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data_lib.batches(split, batch_size):
        out = eval_step(model_def, model_state, ema, *shard_batch(batch, shard))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n}
