r"""Exploding gradients in plain-SGD recurrent networks (Pascanu et al. 2013).

A tanh RNN :math:`h_t = \tanh(W h_{t-1} + U x_t + b)` whose recurrent matrix starts with
spectral radius about ``radius`` > 1 (:math:`W_{ij} \sim \mathcal N(0, r^2/H)`): its
Jacobian products grow along the sequence, and the gradient norm jumps by orders of
magnitude when the trajectory crosses a bifurcation; plain SGD then takes a step that
undoes the training. Global-norm clipping is the paper's remedy.

* ``addition``: the adding problem (Hochreiter and Schmidhuber 1997) at sequence length
  ``T``: two input channels, uniform values in :math:`[0, 1]` and a marker that is 1 at one
  step of the first half and one of the second; the target is the sum of the two marked
  values, read linearly from :math:`h_T`. Predicting the mean gives MSE :math:`1/6`; a
  run *succeeds* when its late loss is below 0.04 (the paper's criterion is on the error
  rate; 0.04 is well below chance).
* ``char``: a character-level RNN language model on the reviews text, trained with SGD;
  a run *fails* when its late loss is not below the unigram model's loss on the fixed batch
  (:func:`text.unigram_loss`: it learnt nothing a context-free model could not).

References:
  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, ICML 2013.

  Hochreiter and Schmidhuber, Long Short-Term Memory, Neural Computation 1997.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bench.stability.natural import text
from bench.stability.natural.runner import Workload, sampled

ADDITION_SUCCESS = 0.04
FIXED_SEQUENCES = 200
"""Sequences in a sequence task's fixed batch (10x the training batch)."""
FIXED_WINDOWS = 64
"""Windows in the character RNN's fixed batch (4x the training batch)."""


def rnn_init(inputs: int, hidden: int, outputs: int, radius: float):
    """``key -> params`` of the tanh RNN: recurrent ``W`` of spectral radius about
    ``radius``, input ``U`` and read-out ``V`` at unit fan-in variance, zero biases."""

    def init(key):
        kw, ku, kv = jax.random.split(key, 3)
        return {
            "W": radius * jax.random.normal(kw, (hidden, hidden)) / jnp.sqrt(float(hidden)),
            "U": jax.random.normal(ku, (inputs, hidden)) / jnp.sqrt(float(inputs)),
            "b": jnp.zeros((hidden,)),
            "V": jax.random.normal(kv, (hidden, outputs)) / jnp.sqrt(float(hidden)),
            "c": jnp.zeros((outputs,)),
        }

    return init


def states(params, xs):
    """Hidden states for inputs ``xs`` of shape ``[T, batch, inputs]``."""

    def cell(h, x):
        h = jnp.tanh(h @ params["W"] + x @ params["U"] + params["b"])
        return h, h

    h0 = jnp.zeros((xs.shape[1], params["W"].shape[0]))
    return jax.lax.scan(cell, h0, xs)[1]


def _addition_batch(key, batch: int, length: int):
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (length, batch))
    half = length // 2
    i1 = jax.random.randint(k1, (batch,), 0, half)
    i2 = jax.random.randint(k2, (batch,), half, length)
    steps = jnp.arange(length)[:, None]
    marks = ((steps == i1[None]) | (steps == i2[None])).astype(jnp.float32)
    xs = jnp.stack([values, marks], axis=-1)
    return xs, jnp.sum(values * marks, axis=0)


@dataclasses.dataclass(frozen=True)
class SequenceTask:
    """A task read from the last state of the tanh RNN (the adding problem, the temporal
    order): ``batch(key, size) -> (xs [T, size, inputs], targets)`` and ``read(out,
    targets) -> loss`` of the read-out ``out = h_T V + c``."""

    name: str
    family: str
    inputs: int
    outputs: int
    batch: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
    read: Callable[[jax.Array, jax.Array], jax.Array]
    fail_above: float


def sequence_workload(
    task: SequenceTask,
    steps: int,
    *,
    hidden: int = 32,
    radius: float = 1.2,
    sgd_lr: float = 0.05,
    adam_lr: float = 1e-3,
    batch: int = 20,
) -> Workload:
    """``task`` in a tanh RNN of ``hidden`` units, minibatches of ``batch`` sequences, and a
    fixed batch of :data:`FIXED_SEQUENCES`."""

    def loss(params, xs, y):
        return task.read(states(params, xs)[-1] @ params["V"] + params["c"], y)

    losses = sampled(loss, task.batch, batch, FIXED_SEQUENCES)
    return Workload(
        name=task.name,
        family=task.family,
        init=rnn_init(task.inputs, hidden, task.outputs, radius),
        loss=losses.loss,
        steps=steps,
        learning_rate=adam_lr,
        sgd_learning_rate=sgd_lr,
        fail_above=task.fail_above,
        eval_loss=losses.eval_loss,
    )


def addition(length: int, steps: int, **options) -> Workload:
    """The adding problem at ``length`` (``options``: :func:`sequence_workload`'s)."""
    task = SequenceTask(
        name=f"addition T={length}",
        family="rnn_addition",
        inputs=2,
        outputs=1,
        batch=lambda key, size: _addition_batch(key, size, length),
        read=lambda out, y: jnp.mean((out[:, 0] - y) ** 2),
        fail_above=ADDITION_SUCCESS,
    )
    return sequence_workload(task, steps, **options)


def char(
    steps: int,
    *,
    hidden: int = 64,
    length: int = 32,
    batch: int = 16,
    radius: float = 1.5,
    sgd_lr: float = 1.0,
    adam_lr: float = 3e-3,
) -> Workload:
    """A character-level SGD RNN language model on the reviews text."""
    data = jnp.asarray(text.stream())
    vocab = len(text.VOCAB)

    def lm_loss(params, x, y):
        hs = states(params, jax.nn.one_hot(x.T, vocab))
        return text.cross_entropy(hs @ params["V"] + params["c"], y.T)

    draw = lambda key, size: text.batch(key, data, size, length)  # noqa: E731
    losses = sampled(lm_loss, draw, batch, FIXED_WINDOWS)
    return Workload(
        name=f"char RNN h{hidden} T={length}",
        family="rnn_char",
        init=rnn_init(vocab, hidden, vocab, radius),
        loss=losses.loss,
        steps=steps,
        learning_rate=adam_lr,
        sgd_learning_rate=sgd_lr,
        fail_above=text.unigram_loss(losses.fixed[1]),
        eval_loss=losses.eval_loss,
    )


def variants(quick: bool) -> list[Workload]:
    """The adding problem at increasing lengths, and the character RNN."""
    if quick:
        return [addition(10, 100)]
    return [addition(10, 2000), addition(20, 2000), addition(40, 2000), char(800)]
