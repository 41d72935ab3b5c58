r"""The temporal-order problem in a plain tanh RNN (Pascanu et al. 2013, after Hochreiter
and Schmidhuber 1997).

A sequence of ``T`` symbols, one-hot over six: four distractors ``a b c d`` drawn
uniformly at every step, except at one step of :math:`[0.1T, 0.2T)` and one of
:math:`[0.5T, 0.6T)`, which hold ``X`` or ``Y``. The class is the ordered pair of those two
(``XX``, ``XY``, ``YX``, ``YY``), read by a softmax from :math:`h_T`; the loss is the
cross-entropy. Chance is :math:`\ln 4 \approx 1.39` nats; a network that keeps only the
later symbol reaches :math:`\ln 2 \approx 0.69`. A run *fails* when its late loss is above
:data:`FAIL_ABOVE` (a quarter of chance, as for the adding problem: it has not learnt to
keep both symbols). The network and its initialisation are the adding problem's
(:mod:`bench.stability.natural.rnn`): recurrent spectral radius about 1.2, so the gradient
explodes by itself as the trajectory crosses a bifurcation.

References:
  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, ICML 2013.

  Hochreiter and Schmidhuber, Long Short-Term Memory, Neural Computation 1997.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bench.stability.natural import rnn, text
from bench.stability.natural.runner import Workload

SYMBOLS = 6
"""``a b c d`` (distractors, ids 0-3), ``X`` (4) and ``Y`` (5)."""
FAIL_ABOVE = 0.25 * math.log(4.0)


def _batch(key, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[length, batch, SYMBOLS]`` (one-hot) and classes ``[batch]`` in 0..3."""
    kd, k1, k2, ks = jax.random.split(key, 4)
    ids = jax.random.randint(kd, (length, batch), 0, 4)
    t1 = jax.random.randint(k1, (batch,), length // 10, max(length // 5, length // 10 + 1))
    t2 = jax.random.randint(k2, (batch,), length // 2, max(3 * length // 5, length // 2 + 1))
    which = jax.random.bernoulli(ks, 0.5, (2, batch)).astype(jnp.int32)  # 0: X, 1: Y
    steps = jnp.arange(length)[:, None]
    ids = jnp.where(steps == t1[None], 4 + which[0][None], ids)
    ids = jnp.where(steps == t2[None], 4 + which[1][None], ids)
    return jax.nn.one_hot(ids, SYMBOLS), 2 * which[0] + which[1]


def workload(length: int, steps: int, **options) -> Workload:
    """The temporal-order problem at ``length`` (``options``: the adding problem's,
    :func:`bench.stability.natural.rnn.sequence_workload`)."""
    task = rnn.SequenceTask(
        name=f"temporal order T={length}",
        family="rnn_order",
        inputs=SYMBOLS,
        outputs=4,
        batch=lambda key, size: _batch(key, size, length),
        read=text.cross_entropy,
        fail_above=FAIL_ABOVE,
    )
    return rnn.sequence_workload(task, steps, **options)


def variants(quick: bool) -> list[Workload]:
    """The temporal-order problem at increasing lengths."""
    if quick:
        return [workload(10, 100)]
    return [workload(20, 2000), workload(40, 2000)]
