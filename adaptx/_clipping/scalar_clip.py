r"""Clips that multiply the whole tree by one scalar, and their fusion with an Adam-family step.

A global clip (``clip_by_global_norm``, ``clip_spikes``) returns :math:`s\,g`, with the
scalar :math:`s` a pure function of the gradient and the clip's state. Written as that
function (:class:`ScalarClip`), the clip is an optax transform on its own
(:func:`scalar_clip`) and can also be folded into the pass of the Adam-family step after
it: the moments take :math:`s\,g` computed element by element in their
own kernel, and a per-tensor reduction (StableAdamW's update RMS) reads :math:`g` with
:math:`s^2` outside the mean (:func:`adaptx.chain` does this for every such pair). On
XLA:CPU the unfused pair writes :math:`s\,g` out as a full-size temporary before a
reduction or a packed concatenation reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu


class ScalarClip(NamedTuple):
    """A clip that multiplies every leaf by one scalar computed from the gradients.

    Attributes:
      init: ``params -> state``, the clip's state.
      scale: ``(updates, state) -> (s, new_state)``: the scalar ``s`` (float32) that the
        updates are multiplied by, and the clip's new state. Pure: no side effects.
    """

    init: Callable[[optax.Params], Any]
    scale: Callable[[optax.Updates, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ClipUpdate:
    """The ``update`` of a :func:`scalar_clip` transform: its :class:`ScalarClip`, callable.

    Its field names the clip it runs, so :func:`adaptx.chain` builds the fused program from it.
    """

    clip: ScalarClip

    def __call__(
        self, updates: optax.Updates, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[optax.Updates, Any]:
        del params
        skip = skip_lib.decision(extra_args)
        s, new_state = self.clip.scale(updates, state)
        out = skip_lib.zeros_if(skip, tu.scale(updates, s))
        return out, skip_lib.select_state(skip, state, new_state)


def scalar_clip(
    init: Callable[[optax.Params], Any],
    scale: Callable[[optax.Updates, Any], tuple[jax.Array, Any]],
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform :math:`g \mapsto s(g, \text{state})\, g` from the clip's scale function.

    Every leaf is multiplied by the scalar in float32 (or wider) and rounded back to its
    own dtype. The transform honours :func:`adaptx.guard`'s skip decision, and
    :func:`adaptx.chain` folds it into the Adam-family step that follows it. adaptx's own
    global clips are built this way.

    Args:
      init: ``params -> state``.
      scale: ``(updates, state) -> (s, new_state)``, pure, with ``s`` a scalar.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      A clip to unit norm, written as its scale:

      >>> import jax.numpy as jnp, optax, adaptx
      >>> def unit(updates, state):
      ...     return 1.0 / jnp.maximum(1.0, optax.tree.norm(updates)), state
      >>> tx = adaptx.scalar_clip(lambda params: optax.EmptyState(), unit)
      >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
      >>> [round(float(x), 3) for x in u["w"]]
      [0.6, 0.8]
    """
    for name, fn in (("init", init), ("scale", scale)):
        if not callable(fn):
            raise TypeError(
                f"scalar_clip: `{name}` must be a function, got {name}={fn!r}. Pass e.g. "
                "init=lambda params: optax.EmptyState() and scale=lambda updates, state: "
                "(s, state)."
            )
    clip = ScalarClip(init, scale)
    return skip_lib.Honouring(init, ClipUpdate(clip))


def clip_of(tx: Any) -> ScalarClip | None:
    """The :class:`ScalarClip` of a :func:`scalar_clip` transform, or ``None`` for any other."""
    update = getattr(tx, "update", None)
    return update.clip if isinstance(update, ClipUpdate) else None
