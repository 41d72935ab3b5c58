"""Runs one optimizer on one workload for several seeds in a single compiled program.

A workload gives ``init(key) -> params`` and ``loss(params, key) -> scalar`` (the key
draws the step's minibatch; a full-batch workload ignores it). The steps run under
``jax.lax.scan`` and the seeds under ``jax.vmap``, so one (workload, optimizer) pair
compiles once. The loss recorded at step ``t`` is the loss of the parameters *before*
step ``t``'s update, the loss the gradient was taken of. Every optimizer is given the
loss as ``value=loss`` (adaptx's guard reads it; optax's transforms ignore it).

A stochastic workload also gives ``eval_loss(params) -> scalar``: the loss on one fixed
batch, the same at every step and every seed, recorded at the same parameters. A
minibatch's loss moves by itself from batch to batch, the more so relative to its mean
as the mean gets small, so a spike rule read on it counts sampling noise; read on the
fixed batch, a jump is the parameters' own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptx


@dataclasses.dataclass(frozen=True)
class Workload:
    """One training problem: its parameters, its loss and what counts as a failure.

    Attributes:
      name: the row label, e.g. ``"mlp w64 d2 fast lr3e-3"``.
      family: the table it belongs to, e.g. ``"adam_spikes"``.
      init: ``key -> params``.
      loss: ``(params, key) -> scalar loss`` (float32 or float16).
      steps: training steps.
      learning_rate: the rate of the Adam-family optimizers.
      sgd_learning_rate: the rate of the SGD-family optimizers (``None``: not run).
      fail_above: a run fails when its late loss is above this (``None``: never).
      eval_loss: ``params -> scalar``, the loss on a fixed batch, or ``None`` for a
        full-batch workload (its training loss has no sampling noise).
    """

    name: str
    family: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, jax.Array], jax.Array]
    steps: int
    learning_rate: float
    sgd_learning_rate: float | None = None
    fail_above: float | None = None
    eval_loss: Callable[[Any], jax.Array] | None = None


FIXED_BATCH_KEY = 2_147_483_647
"""The seed of every workload's fixed batch; a run's minibatch keys derive from
``PRNGKey(seed)`` with ``seed`` in ``0..seeds-1``, never from this one."""


def fixed_key() -> jax.Array:
    """The key a workload draws its fixed batch from."""
    return jax.random.PRNGKey(FIXED_BATCH_KEY)


class Sampled(NamedTuple):
    """What a workload that draws minibatches gives :class:`Workload`: its ``loss`` and
    ``eval_loss``, and the ``fixed`` batch the latter reads."""

    loss: Callable[[Any, jax.Array], jax.Array]
    eval_loss: Callable[[Any], jax.Array]
    fixed: tuple


def sampled(loss_on: Callable, draw: Callable, batch: int, fixed_size: int) -> Sampled:
    """The losses of a workload whose examples are ``draw(key, size) -> batch tuple`` and
    whose loss is ``loss_on(params, *batch)``: a minibatch of ``batch`` drawn with the step's
    key, and one fixed batch of ``fixed_size`` drawn with :func:`fixed_key`."""
    fixed = draw(fixed_key(), fixed_size)
    return Sampled(
        loss=lambda params, key: loss_on(params, *draw(key, batch)),
        eval_loss=lambda params: loss_on(params, *fixed),
        fixed=fixed,
    )


class Curves(NamedTuple):
    """Per-step losses of one (workload, optimizer) pair, each ``[seeds, steps]`` float32.

    ``train``: the minibatch loss the gradient was taken of. ``fixed``: the fixed batch's
    loss at the same parameters, or ``None`` where the workload has none.
    """

    train: np.ndarray
    fixed: np.ndarray | None

    @property
    def watched(self) -> np.ndarray:
        """The curve the figures read: the fixed batch's where there is one."""
        return self.train if self.fixed is None else self.fixed


def _grad(loss_fn, params, key, scale):
    def scaled(p):
        value = loss_fn(p, key)
        return (value * scale.astype(value.dtype)).astype(value.dtype), value

    (_, value), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    return value, grads


def train(
    workload: Workload, tx: optax.GradientTransformation, seeds: int, *, loss_scaled: bool = False
) -> Curves:
    """The loss curves of ``seeds`` runs; ``loss_scaled`` multiplies the loss by
    :func:`adaptx.loss_scale` of the state before differentiating."""
    tx = optax.with_extra_args_support(tx)
    fixed = workload.eval_loss

    def one(seed):
        k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
        params = workload.init(k_init)
        state = tx.init(params)

        def body(carry, t):
            params, state = carry
            scale = adaptx.loss_scale(state) if loss_scaled else jnp.ones([], jnp.float32)
            value, grads = _grad(workload.loss, params, jax.random.fold_in(k_data, t), scale)
            updates, state = tx.update(grads, state, params, value=value)
            seen = value if fixed is None else fixed(params)
            params = optax.apply_updates(params, updates)
            return (params, state), (value.astype(jnp.float32), seen.astype(jnp.float32))

        _, losses = jax.lax.scan(body, (params, state), jnp.arange(workload.steps))
        return losses

    train_loss, fixed_loss = jax.jit(jax.vmap(one))(jnp.arange(seeds))
    return Curves(np.asarray(train_loss), None if fixed is None else np.asarray(fixed_loss))
