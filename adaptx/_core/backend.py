"""Every rewrite that helps one XLA backend only, applied only there.

Some programs compile to fewer passes over memory, or compile faster, on XLA:CPU when
written a little differently. On GPU and TPU those rewrites buy nothing measured and
can block a fusion, so each is chosen by the platform that the computation is *lowered*
for (``jax.lax.platform_dependent``), not by ``jax.default_backend()``: a step traced on
a CPU host and lowered for a GPU gets the GPU's program. Each function names the
measurement that justifies its CPU form; the other backends get the plain program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spike_mask(mask: jax.Array) -> jax.Array:
    """SPAM's boolean spike mask, written out once on XLA:CPU.

    The element count and both moments read the mask. On XLA:CPU, without a barrier each
    of their kernels recomputes it from ``v_{t-1}``, so XLA copies ``v`` before updating
    it in place (one extra full-size buffer, ``python -m bench.stability.probes passes``);
    with it the mask is one byte per element written once. Elsewhere the mask is left to
    the compiler.
    """
    return jax.lax.platform_dependent(
        mask, cpu=lambda m: jax.lax.optimization_barrier(m), default=lambda m: m
    )


def count_true(mask: jax.Array, *, splittable: bool, row: int = 64) -> jax.Array:
    """Number of true entries of a boolean array, as int32.

    On XLA:CPU, summed first in rows of ``row`` elements in int8 (no row sum can
    overflow), then the row sums in int32: XLA:CPU writes a widened copy of the mask
    before reducing it, and this way the copy has one byte per element rather than four
    (``python -m bench.xla_cpu_effects``). ``splittable``: whether the mask may be
    reshaped into rows (its size a multiple of ``row`` and not sharded). Other backends
    reduce the mask directly.
    """

    def plain(m: jax.Array) -> jax.Array:
        return jnp.sum(m, dtype=jnp.int32)

    if not splittable or mask.size % row:
        return plain(mask)

    def by_rows(m: jax.Array) -> jax.Array:
        rows = jnp.sum(m.reshape(-1, row), axis=1, dtype=jnp.int8)
        return jnp.sum(rows, dtype=jnp.int32)

    return jax.lax.platform_dependent(mask, cpu=by_rows, default=plain)
