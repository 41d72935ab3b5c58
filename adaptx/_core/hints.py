"""Scaled outputs, announced by a clipping transform to the transforms after it.

A clip returns ``s * g``: a scalar times its input. When a later transform reduces
over that output (StableAdamW's update RMS, ``mean((s g)^2 / v)``) or concatenates it
(a packed Adam), XLA:CPU writes ``s * g`` out to memory as a temporary, because the
reduction or concatenation does not absorb the broadcast multiply that the elementwise
kernels also consume: one extra full-size buffer and two extra passes. The same
numbers are ``s^2 mean(g^2 / v)`` and ``s * concatenate(g)``, which read ``g`` itself.

A clipping transform calls :func:`record` for each leaf it returns as ``s * g``; a later
transform asks :func:`lookup` for the ``(g, s)`` behind a leaf it received. A leaf
counts only if it is the very array recorded (identity, checked at trace time), so a
transform in between that changes the updates simply hides the hint, and the record
is the same whichever ``optax.chain`` (a recipe's or a user's) holds the transforms:
they compile to the same program. Entries hold their array weakly and vanish with it,
so nothing outlives the trace that made it.

``bench/hints.py`` measures what the hints buy (the step time, passes and temporary
memory with them and without, :func:`disabled`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import jax


class _WeakIdentityRecord:
    """Maps a live array (by identity) to a tuple of facts; an entry dies with its array."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, tuple]] = {}

    def put(self, key: Any, *facts: Any) -> None:
        k = id(key)

        def drop(ref: weakref.ref, k: int = k) -> None:
            entry = self._entries.get(k)
            if entry is not None and entry[0] is ref:
                del self._entries[k]

        self._entries[k] = (weakref.ref(key, drop), facts)

    def get(self, key: Any) -> tuple | None:
        entry = self._entries.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def __len__(self) -> int:
        return len(self._entries)


_SCALED = _WeakIdentityRecord()  # out -> (g, s)
_enabled = True


def record(out: jax.Array, g: jax.Array, s: jax.Array) -> None:
    """Records that ``out`` is ``s * g`` (``s`` a scalar, ``out`` in ``g``'s dtype)."""
    if _enabled:
        _SCALED.put(out, g, s)


def lookup(x: Any) -> tuple[jax.Array, jax.Array] | None:
    """``(g, s)`` if ``x`` itself was recorded as ``s * g``, else ``None``."""
    return _SCALED.get(x) if _enabled else None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block nothing is recorded or found: programs traced here do without."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
