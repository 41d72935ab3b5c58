"""The optimizer: an adaptx recipe, a warm-up + cosine schedule, weight decay on matrices.

``make_optimizer(config, total_steps)`` builds what ``--optimizer`` names; ``--per-tensor``
builds it with per-tensor figures (see :func:`with_per_tensor`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax

import adaptx


def learning_rate(config, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to 10% over the planned number of steps.

    ``config`` is a ``config.Config`` (its ``lr`` and ``warmup_steps``).
    """
    warmup = min(config.warmup_steps, total_steps // 2)
    if warmup == 0:
        return optax.cosine_decay_schedule(config.lr, max(total_steps, 1), alpha=0.1)
    # Warm-up starts at lr / warmup, not 0, so that no step is a zero update.
    return optax.warmup_cosine_decay_schedule(
        config.lr / warmup, config.lr, warmup, max(total_steps, 2), end_value=0.1 * config.lr
    )


def decay_mask(params, embeddings: bool = False):
    """Weight decay on matrices only (not biases or layer norms; embeddings optionally)."""
    return jax.tree.map_with_path(
        lambda path, p: p.ndim >= 2 and (embeddings or "embed" not in jax.tree_util.keystr(path)),
        params,
    )


def with_per_tensor(make: Callable[..., optax.GradientTransformation], clipped: bool = True):
    """``make(per_tensor=True)``: the transformation, keeping per-tensor figures.

    An unclipped ``adaptx.adamw`` or ``adaptx.sgd`` (``max_norm=None``) computes no
    per-leaf norms of its own; it is wrapped in ``adaptx.guard(..., per_tensor=True)``,
    which with its defaults skips non-finite steps only, leaves every finite step as it
    is, and keeps each tensor's gradient norm (``guard/tensor_grad_norm/<param path>``).

    >>> tx = with_per_tensor(functools.partial(adaptx.adamw, 1e-3))
    >>> figures = adaptx.telemetry(tx.init({"w": jax.numpy.ones(2)}), per_tensor=True)
    >>> [k for k in figures if k.endswith("/tensor_grad_norm/w")]
    ['clip_by_global_norm/tensor_grad_norm/w']
    """
    if clipped:
        return make(per_tensor=True)
    return adaptx.guard(make(), per_tensor=True)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """The adaptx recipe ``config.optimizer`` names, on :func:`learning_rate`'s schedule."""
    lr = learning_rate(config, total_steps)
    mask = functools.partial(decay_mask, embeddings=config.decay_embeddings)
    wd, clip = config.weight_decay, config.max_norm
    if config.optimizer == "adamw":
        make = functools.partial(adaptx.adamw, lr, weight_decay=wd, max_norm=clip, mask=mask)
    elif config.optimizer == "robust_adamw":
        make = functools.partial(adaptx.robust_adamw, lr, weight_decay=wd, mask=mask)
    elif config.optimizer == "sgd":
        make = functools.partial(adaptx.sgd, lr, momentum=0.9, max_norm=clip)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    if not config.per_tensor:
        return make()
    return with_per_tensor(make, clipped=config.optimizer == "robust_adamw" or clip is not None)
