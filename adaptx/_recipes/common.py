"""Pieces shared by the recipes."""

from __future__ import annotations

from typing import Any

import optax

from adaptx._clipping.global_norm import clip_by_global_norm
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._scaling.learning_rate import scale_by_learning_rate


def check_learning_rate(fn: str, learning_rate: Any) -> None:
    if not callable(learning_rate):
        validate.check_nonnegative(fn, "learning_rate", learning_rate, example="1e-3")


def optional_clip(
    max_norm: Any, per_tensor: bool = False, fn: str = "adamw"
) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_norm)``, or the identity when ``max_norm is None``.

    ``per_tensor`` keeps the clip's per-leaf norms; without a clip nothing computes
    them, so ``per_tensor`` then asks for one.
    """
    if max_norm is None:
        if per_tensor:
            raise ValueError(
                f"{fn}: per_tensor=True keeps the global-norm clip's per-leaf norms, but "
                "max_norm=None turns the clip off. Pass a max_norm (e.g. max_norm=1.0), or "
                "wrap the optimizer in adaptx.guard(tx, per_tensor=True)."
            )
        return optax.identity()
    return clip_by_global_norm(max_norm, per_tensor=per_tensor)


def add_decayed_weights(fn: str, weight_decay: Any, mask: Any) -> optax.GradientTransformation:
    """``optax.add_decayed_weights``, with an error naming the mismatch when the params differ.

    Same numbers and the same state as optax's; ``update`` first checks that the
    ``params`` tree has the structure and shapes of the updates, so a wrong tree is
    reported as ``fn`` and the offending leaf rather than as a bare tree-map error.
    """
    inner = optax.with_extra_args_support(optax.add_decayed_weights(weight_decay, mask))

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        if params is not None:
            tu.check_same_structure(fn, updates, params, "updates", "params", shapes=True)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def decay_and_step(
    fn: str, learning_rate: optax.ScalarOrSchedule, weight_decay: Any, mask: Any
) -> list[optax.GradientTransformation]:
    """The last two members of every AdamW-style recipe: decoupled weight decay, then the
    learning rate (both checked, and named by ``fn`` in the errors). The learning rate is
    :func:`adaptx.scale_by_learning_rate`: optax's numbers, and the rate it applied kept
    for :func:`adaptx.telemetry`."""
    check_learning_rate(fn, learning_rate)
    validate.check_nonnegative(fn, "weight_decay", weight_decay, example="1e-4")
    return [
        add_decayed_weights(fn, weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    ]
