"""How :func:`adaptx.guard` tells the transforms inside it that a step is skipped.

A guard that skips a step must hand back the inner state unchanged. Selecting
``where(skip, old, new)`` around a finished inner update is always correct, but on
a full-size state (Adam's moments) it defeats XLA's in-place update: the update is
computed from the *unselected* new moments, so XLA recomputes them from the old
ones inside the parameter kernel after the state kernel has overwritten those in
place, and has to copy both moments first (two extra full-size buffers).

Instead, ``guard`` passes a :class:`SkipSignal` to its inner transform as the
extra argument :data:`KEY`. An adaptx transform that receives one selects inside
its own fused per-element update (the moments are ``where(skip, old, new)`` and
the update is computed from the selected moments) and calls :meth:`SkipSignal.keep`
for each state array it returns so selected. ``guard`` then leaves exactly those
arrays alone and selects every other leaf itself, so transforms that know nothing
of the signal (optax's, a user's) stay correct.

A leaf counts as handled only when it is the very array the transform returned
*and* the array it was selected against is the very array ``guard`` holds at that
place in the old state; a wrapper that changes either is selected by ``guard`` as
usual. Identity is checked at trace time and costs nothing in the compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adaptx._core.identity import IdentityRecord

#: The extra-argument name under which ``guard`` passes its :class:`SkipSignal`.
KEY = "adaptx_skip_signal"


class SkipSignal:
    """A guard's skip decision, handed down to the transforms it wraps.

    Attributes:
      flag: scalar bool, true when this step is skipped.
    """

    def __init__(self, flag: jax.Array):
        self.flag = flag
        self._kept = IdentityRecord()  # new -> (old,)

    def keep(self, old: Any, new: Any) -> None:
        """Records that ``new`` already equals ``old`` whenever the step is skipped."""
        self._kept.put(new, old)

    def handled(self, old: Any, new: Any) -> bool:
        """Whether ``new`` was recorded by :meth:`keep` against this very ``old``."""
        facts = self._kept.get(new)
        return facts is not None and facts[0] is old

    def select(self, old: Any, new: Any) -> Any:
        """``where(flag, old, new)``, unless ``new`` is already selected against ``old``."""
        if self.handled(old, new):
            return new
        return jnp.where(self.flag, old, new)


def from_extra_args(extra_args: dict) -> SkipSignal | None:
    """The :class:`SkipSignal` a guard passed down, or ``None`` outside a guard."""
    signal = extra_args.get(KEY)
    return signal if isinstance(signal, SkipSignal) else None


# Helpers for a transform's fused per-leaf function; each is the identity outside a guard.


def hold(signal: SkipSignal | None, old: jax.Array, new: jax.Array) -> jax.Array:
    """``new``, or ``old`` (cast to ``new``'s dtype) when the step is skipped."""
    if signal is None:
        return new
    return jnp.where(signal.flag, old.astype(new.dtype), new)


def silence(signal: SkipSignal | None, update: jax.Array) -> jax.Array:
    """``update``, or zero when the step is skipped."""
    if signal is None:
        return update
    return jnp.where(signal.flag, jnp.zeros([], update.dtype), update)


def kept(signal: SkipSignal | None, old: jax.Array, stored: jax.Array) -> jax.Array:
    """Returns ``stored``, recording that it was selected against ``old`` with :func:`hold`."""
    if signal is not None:
        signal.keep(old, stored)
    return stored
