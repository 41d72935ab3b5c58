"""A convolutional text classifier with BatchNorm and dropout: a healthy run of a kind that
no default of ``bench/stability`` was chosen on.

The shape of Flax's NNX MNIST tutorial (convolution, BatchNorm, ReLU, twice, then dropout
and a linear head), over word embeddings of the reviews text instead of pixels:

.. math::

  h = \\mathrm{relu}(\\mathrm{BN}(\\mathrm{conv}_5(\\mathrm{relu}(\\mathrm{BN}(
      \\mathrm{conv}_3(E x)))))),\\qquad
  \\mathrm{logits} = W\\,\\mathrm{dropout}(\\max_t h_t)

(the max over the sequence's real tokens). BatchNorm normalises over the batch and the
tokens in training and uses its running statistics at test time, so the forward pass
writes state besides the parameters: the case ``adaptx.restore_on_skip`` exists for. The
run itself is unprotected (``optax.adamw``, no clipping), like every recorded trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class ConvClassifier(nnx.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        dim: int = 128,
        dropout: float = 0.5,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.conv1 = nnx.Conv(dim, dim, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(dim, rngs=rngs)
        self.conv2 = nnx.Conv(dim, dim, kernel_size=(5,), padding="SAME", rngs=rngs)
        self.bn2 = nnx.BatchNorm(dim, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, T] word ids (0 = padding) -> logits [B, num_classes]."""
        mask = (tokens > 0)[..., None]
        x = self.embed(tokens) * mask
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        pooled = jnp.where(mask, x, -jnp.inf).max(axis=1)
        pooled = jnp.where(jnp.isfinite(pooled), pooled, 0.0)  # an empty review
        return self.out(self.drop(pooled))


def _loss(model, tokens, labels, weights):
    logits = model(tokens)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@nnx.jit
def _train_step(model, optimizer, tokens, labels, weights):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens, labels, weights)
    optimizer.update(model, grads)
    return loss, optax.tree.norm(grads)


@nnx.jit
def _spiked_step(model, optimizer, tokens, labels, weights, factor):
    """:func:`_train_step` on the gradient times ``factor`` (an injected fault). A step of
    its own: the recorded traces' step stays the program it was."""
    loss, grads = nnx.value_and_grad(_loss)(model, tokens, labels, weights)
    grads = jax.tree.map(lambda g: g * factor, grads)
    optimizer.update(model, grads)
    return loss, optax.tree.norm(grads)


@nnx.jit
def _correct(model, tokens, labels, weights):
    return ((model(tokens).argmax(-1) == labels) * weights).sum()


def train(
    dataset,
    tx: optax.GradientTransformation,
    steps: int,
    seed: int,
    batch_size: int,
    batches,
    spikes: dict[int, float] | None = None,
):
    """``steps`` steps on ``dataset.train`` (reshuffled each epoch), batched by ``batches``
    (the example's ``data.batches``), the gradient of step ``t`` multiplied by
    ``spikes[t]`` where given; the per-step history (training loss, global norm of the
    gradient the optimizer received), the test accuracy and the trained model."""
    if len(dataset.train) < batch_size:  # no full batch: the loop below would never end
        raise ValueError(
            f"batch_size={batch_size} is more than the {len(dataset.train)} training examples"
        )
    model = ConvClassifier(len(dataset.encoder.vocab), dataset.num_classes, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    model.train()
    while len(history) < steps:
        for tokens, labels, weights in batches(dataset.train, batch_size, rng, drop_last=True):
            t = len(history)
            if spikes and t in spikes:
                factor = jnp.float32(spikes[t])
                loss, norm = _spiked_step(model, optimizer, tokens, labels, weights, factor)
            else:
                loss, norm = _train_step(model, optimizer, tokens, labels, weights)
            history.append({"loss": float(loss), "grad_norm": float(norm)})
            if len(history) == steps:
                break
    model.eval()
    correct = total = 0.0
    for tokens, labels, weights in batches(dataset.test, 256):
        correct += float(_correct(model, tokens, labels, weights))
        total += float(weights.sum())
    return {"history": history, "test_accuracy": correct / total, "model": model}
