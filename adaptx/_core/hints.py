"""Scaled inputs, announced by a clipping transform to the transforms after it.

A clip returns ``s * g``: a scalar times its input. When a later transform reduces
over that output (StableAdamW's update RMS, ``mean((s g)^2 / v)``), XLA:CPU writes
``s * g`` out to memory as a temporary, because the reduction kernel does not absorb
the broadcast multiply that the elementwise kernels also consume: one extra
full-size buffer and two extra passes. The same number is ``s^2 mean(g^2 / v)``,
whose reduction reads ``g`` itself.

:func:`hinted_chain` is ``optax.chain`` that hands every transform a fresh
:class:`ScaleHints` as the extra argument :data:`KEY`. A clipping transform calls
:meth:`ScaleHints.record` for each leaf it returns as ``s * g``; a later transform
asks :meth:`ScaleHints.lookup` for the ``(g, s)`` behind a leaf it received. A leaf
counts only if it is the very array recorded (identity, checked at trace time), so a
transform in between that changes the updates simply hides the hint.
"""

from __future__ import annotations

import jax
import optax

from adaptx._core.identity import IdentityRecord

#: The extra-argument name under which :func:`hinted_chain` passes its :class:`ScaleHints`.
KEY = "adaptx_scale_hints"


class ScaleHints:
    """Which arrays of this step are a scalar times another array."""

    def __init__(self):
        self._scaled = IdentityRecord()  # out -> (g, s)

    def record(self, out: jax.Array, g: jax.Array, s: jax.Array) -> None:
        """Records that ``out`` is ``s * g`` (``s`` a scalar, ``out`` in ``g``'s dtype)."""
        self._scaled.put(out, g, s)

    def lookup(self, x: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """``(g, s)`` if ``x`` itself was recorded as ``s * g``, else ``None``."""
        return self._scaled.get(x)


def from_extra_args(extra_args: dict) -> ScaleHints | None:
    """The :class:`ScaleHints` of this step, or ``None`` outside a :func:`hinted_chain`."""
    hints = extra_args.get(KEY)
    return hints if isinstance(hints, ScaleHints) else None


def hinted_chain(
    *transforms: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*transforms)``, with one :class:`ScaleHints` shared by its members per step.

    Same state as ``optax.chain`` (a tuple of the members' states).
    """
    inner = optax.chain(*transforms)

    def update_fn(updates, state, params=None, **extra_args):
        if from_extra_args(extra_args) is None:
            extra_args = {**extra_args, KEY: ScaleHints()}
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
