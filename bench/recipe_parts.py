"""Each adaptx recipe written as a user would write it: ``optax.chain`` of its documented parts.

A recipe is an :func:`adaptx.chain` of these same parts (inside :func:`adaptx.guard` for
``robust_adamw``). ``optax.chain`` gives the same state and the same numbers; what differs
is the program (no fused clip, the guard selects the whole chain's state). The tests
check the numbers (``tests/test_chain.py``), ``python -m bench.paired chain`` the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

import adaptx


def _decay_and_lr(lr: Any, wd: Any) -> list[optax.GradientTransformation]:
    return [optax.add_decayed_weights(wd), adaptx.scale_by_learning_rate(lr)]


def adamw(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    pack = kw.get("pack_small_leaves")
    return optax.chain(
        adaptx.clip_by_global_norm(1.0),
        adaptx.scale_by_adam(0.9, 0.999, 1e-8, pack_small_leaves=pack),
        *_decay_and_lr(lr, 1e-4),
    )


def adam_atan2(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    pack = kw.get("pack_small_leaves")
    return optax.chain(
        optax.identity(),
        adaptx.scale_by_adam_atan2(0.9, 0.99, 1.27, 1.0, pack_small_leaves=pack),
        *_decay_and_lr(lr, 1e-4),
    )


def stable_adamw(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    return optax.chain(
        adaptx.scale_by_adam(0.9, 0.99, 1e-8, update_rms_clip=1.0, **kw),
        *_decay_and_lr(lr, 0.2),
    )


def spam(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    return optax.chain(
        adaptx.scale_by_adam(0.9, 0.999, 1e-6, spike_threshold=5000.0, reset_interval=500, **kw),
        *_decay_and_lr(lr, 0.0),
    )


def robust_adamw(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    return adaptx.guard(
        optax.chain(
            adaptx.clip_spikes(6.0, 4.0, 0.95, max_ratio=10.0, initial_max_norm=1.0),
            adaptx.scale_by_adam(0.9, 0.999, 1e-8, update_rms_clip=5.0, **kw),
            *_decay_and_lr(lr, 1e-4),
        )
    )


def sgd(lr: Any = 1e-3, **kw: Any) -> optax.GradientTransformation:
    del kw
    return optax.chain(
        adaptx.clip_by_global_norm(1.0), adaptx.momentum(0.9), adaptx.scale_by_learning_rate(lr)
    )


#: recipe name -> ``(lr, **options) -> optax.chain`` of its parts.
PARTS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw,
    "adam_atan2": adam_atan2,
    "stable_adamw": stable_adamw,
    "spam": spam,
    "robust_adamw": robust_adamw,
    "sgd": sgd,
}
