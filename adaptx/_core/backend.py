"""Tricks that help one XLA backend only, applied only there.

Some programs compile to fewer passes over memory on XLA:CPU when written a little
differently (a reduction split in two, an array reshaped). On GPU and TPU those
rewrites buy nothing and can block a fusion, so they are applied on CPU alone; the
other backends get the plain program.
"""

from __future__ import annotations

import jax


def on_cpu() -> bool:
    """Whether this trace compiles for XLA:CPU (the default backend)."""
    return jax.default_backend() == "cpu"
