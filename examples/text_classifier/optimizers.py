"""The optimizer: an adaptx recipe, a warm-up + cosine schedule, weight decay on matrices.

``make_optimizer(config, total_steps)`` builds what ``--optimizer`` names, in a guard that
stops a run stuck on non-finite steps; ``--per-tensor`` builds it with per-tensor figures.
"""

from __future__ import annotations

import functools

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


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """The adaptx recipe ``config.optimizer`` names, on :func:`learning_rate`'s schedule, in
    an ``adaptx.guard`` that skips non-finite steps and, after ``config.max_nonfinite_steps``
    of them in a row, declares the run diverged (``train.py`` then stops it).

    ``robust_adamw`` has a guard of its own. ``adamw`` and ``sgd`` are wrapped in one: on a
    finite step it passes the update through unchanged. ``--per-tensor`` builds the
    transformation with per-tensor figures; an unclipped ``adamw`` or ``sgd``
    (``max_norm=None``) computes no per-leaf norms of its own, so its guard keeps each
    tensor's gradient norm (``guard/tensor_grad_norm/<param path>``).

    >>> import config as config_lib
    >>> cfg = config_lib.Config(max_norm=None, per_tensor=True)
    >>> state = make_optimizer(cfg, 100).init({"w": jax.numpy.ones(2)})
    >>> [k for k in adaptx.telemetry(state, per_tensor=True) if k.startswith("guard/tensor_")]
    ['guard/tensor_grad_norm/w']
    """
    lr = learning_rate(config, total_steps)
    mask = functools.partial(decay_mask, embeddings=config.decay_embeddings)
    wd, clip, per_tensor = config.weight_decay, config.max_norm, config.per_tensor
    stop = config.max_nonfinite_steps
    if config.optimizer == "robust_adamw":
        return adaptx.robust_adamw(
            lr, weight_decay=wd, mask=mask, max_consecutive_nonfinite=stop, per_tensor=per_tensor
        )
    if config.optimizer == "adamw":
        make = functools.partial(adaptx.adamw, lr, weight_decay=wd, max_norm=clip, mask=mask)
    elif config.optimizer == "sgd":
        make = functools.partial(adaptx.sgd, lr, momentum=0.9, max_norm=clip)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    clipped = clip is not None
    tx = make(per_tensor=True) if per_tensor and clipped else make()
    return adaptx.guard(tx, max_consecutive_nonfinite=stop, per_tensor=per_tensor and not clipped)
