"""Donated buffers: state leaves that cannot be donated, and the notice about the rest.

>>> z = jnp.zeros([])
>>> shared_buffers({"a": z, "b": z, "c": jnp.ones([])})
1
>>> own_buffers({"a": z, "b": z})["a"] is z
False
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp

_DONATION_MSG = "Some donated buffers were not usable"


@contextlib.contextmanager
def quiet():
    """Silences the expected donation notice (scalar state leaves cannot alias on CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DONATION_MSG)
        yield


def shared_buffers(tree) -> int:
    """How many leaves of ``tree`` share their device buffer with an earlier leaf."""
    seen: set = set()
    n = 0
    for x in jax.tree.leaves(tree):
        try:
            key = x.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - not a single-device array
            continue
        n += key in seen
        seen.add(key)
    return n


def own_buffers(tree):
    """``tree`` with every leaf copied into its own buffer (so that it can be donated)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
