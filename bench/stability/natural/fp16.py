r"""float16 training without loss scaling (Micikevicius et al. 2018).

A character-level MLP language model on the reviews text (the previous ``context``
characters, embedded, concatenated, one tanh hidden layer) whose parameters, activations,
loss and gradients are all float16, and whose optimizer state is kept in the parameters'
dtype (optax's default). Nothing is injected: gradients below float16's smallest subnormal
(:math:`6 \times 10^{-8}`) flush to zero, Adam's :math:`\epsilon = 10^{-8}` is itself zero in
float16, and :math:`g^2` underflows; what each optimizer makes of this is measured. A run
*fails* when its late loss is not finite or not below the unigram model's loss on its fixed
batch (:func:`text.unigram_loss`).
``adaptx.dynamic_loss_scale`` multiplies the loss by a scale it adapts before
differentiating and unscales the gradients.

References:
  Micikevicius et al., `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_,
  ICLR 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.stability.natural import text
from bench.stability.natural.runner import Workload, sampled

FIXED_BATCHES = 4
"""The fixed batch holds this many training batches' worth of contexts."""


def _init(context: int, embed: int, hidden: int):
    vocab = len(text.VOCAB)

    def init(key):
        ke, k1, k2 = jax.random.split(key, 3)
        params = {
            "embed": jax.random.normal(ke, (vocab, embed)),
            "w1": jax.random.normal(k1, (context * embed, hidden))
            / jnp.sqrt(float(context * embed)),
            "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, vocab)) / jnp.sqrt(float(hidden)),
            "b2": jnp.zeros((vocab,)),
        }
        return jax.tree.map(lambda a: a.astype(jnp.float16), params)

    return init


def workload(
    lr: float, steps: int, *, context: int = 8, embed: int = 16, hidden: int = 128, batch: int = 64
) -> Workload:
    """The float16 MLP LM at Adam rate ``lr``."""
    data = jnp.asarray(text.stream())

    def lm_loss(params, x, y):
        h = params["embed"][x].reshape(x.shape[0], -1)
        h = jnp.tanh(h @ params["w1"] + params["b1"])
        return text.cross_entropy(h @ params["w2"] + params["b2"], y[:, -1])

    draw = lambda key, size: text.batch(key, data, size, context)  # noqa: E731
    losses = sampled(lm_loss, draw, batch, FIXED_BATCHES * batch)
    return Workload(
        name=f"fp16 MLP LM h{hidden} lr{lr:g}",
        family="fp16",
        init=_init(context, embed, hidden),
        loss=losses.loss,
        steps=steps,
        learning_rate=lr,
        fail_above=text.unigram_loss(losses.fixed[1][:, -1]),
        eval_loss=losses.eval_loss,
    )


def variants(quick: bool) -> list[Workload]:
    if quick:
        return [workload(1e-3, 30, hidden=16, batch=8)]
    return [workload(1e-3, 1500), workload(1e-4, 1500)]
