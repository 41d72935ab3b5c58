r"""Early instability without warm-up: a deep Post-LN transformer language model.

A character-level decoder on the reviews text in which every sub-layer is followed by
its layer norm (the original Transformer's Post-LN):

.. math::

  x \leftarrow \mathrm{LN}(x + \mathrm{Attn}(x)), \qquad
  x \leftarrow \mathrm{LN}(x + \mathrm{MLP}(x)).

The gradient of the last layers is large at initialisation and the residual branch is
amplified through the stack (Xiong et al. 2020; Liu et al. 2020); trained with Adam at a
constant learning rate from the first step (no warm-up), the run can blow up or stall at
the unigram level. A run *fails* when its late loss is not below the unigram model's loss on
the fixed batch (:func:`text.unigram_loss`).

References:
  Xiong et al., `On Layer Normalization in the Transformer Architecture
  <https://arxiv.org/abs/2002.04745>`_, ICML 2020.

  Liu et al., `Understanding the Difficulty of Training Transformers
  <https://arxiv.org/abs/2004.08249>`_, EMNLP 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.stability.natural import text
from bench.stability.natural.runner import Workload, sampled

FIXED_WINDOWS = 32
"""Windows in the fixed batch (4x the training batch)."""


def _dense(key, m, n):
    return {"w": jax.random.normal(key, (m, n)) / jnp.sqrt(float(m)), "b": jnp.zeros((n,))}


def _init(layers: int, d: int, length: int):
    vocab = len(text.VOCAB)

    def init(key):
        keys = jax.random.split(key, 4 * layers + 3)
        blocks = []
        for i in range(layers):
            k = keys[4 * i : 4 * i + 4]
            blocks.append(
                {
                    "qkv": _dense(k[0], d, 3 * d),
                    "out": _dense(k[1], d, d),
                    "up": _dense(k[2], d, 4 * d),
                    "down": _dense(k[3], 4 * d, d),
                    "ln1": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))},
                    "ln2": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))},
                }
            )
        return {
            "embed": jax.random.normal(keys[-3], (vocab, d)),
            "pos": 0.1 * jax.random.normal(keys[-2], (length, d)),
            "blocks": blocks,
            "head": _dense(keys[-1], d, vocab),
        }

    return init


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _attention(p, x, heads):
    b, t, d = x.shape
    q, k, v = jnp.split(x @ p["qkv"]["w"] + p["qkv"]["b"], 3, axis=-1)
    split = lambda a: a.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(float(d // heads))
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    y = (jax.nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return y @ p["out"]["w"] + p["out"]["b"]


def forward(params, x, heads: int):
    """Logits ``[batch, length, vocab]`` of the Post-LN decoder."""
    h = params["embed"][x] + params["pos"][None, : x.shape[1]]
    for blk in params["blocks"]:
        h = _ln(blk["ln1"], h + _attention(blk, h, heads))
        mlp = jax.nn.gelu(h @ blk["up"]["w"] + blk["up"]["b"]) @ blk["down"]["w"] + blk["down"]["b"]
        h = _ln(blk["ln2"], h + mlp)
    return h @ params["head"]["w"] + params["head"]["b"]


def workload(
    layers: int,
    lr: float,
    steps: int,
    *,
    d: int = 64,
    heads: int = 4,
    length: int = 32,
    batch: int = 8,
) -> Workload:
    """A ``layers``-deep Post-LN character LM trained with Adam at ``lr`` from step 0."""
    data = jnp.asarray(text.stream())

    def lm_loss(params, x, y):
        return text.cross_entropy(forward(params, x, heads), y)

    draw = lambda key, size: text.batch(key, data, size, length)  # noqa: E731
    losses = sampled(lm_loss, draw, batch, FIXED_WINDOWS)
    return Workload(
        name=f"Post-LN L{layers} d{d} lr{lr:g}",
        family="post_ln",
        init=_init(layers, d, length),
        loss=losses.loss,
        steps=steps,
        learning_rate=lr,
        fail_above=text.unigram_loss(losses.fixed[1]),
        eval_loss=losses.eval_loss,
    )


def variants(quick: bool) -> list[Workload]:
    """Deep Post-LN stacks at a usual and a large constant rate."""
    if quick:
        return [workload(2, 1e-3, 30, d=16, length=8)]
    return [workload(6, 3e-3, 300, d=32), workload(6, 1e-2, 300, d=32)]
