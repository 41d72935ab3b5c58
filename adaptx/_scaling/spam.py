r"""SPAM's moment rule: spike-aware clipping and momentum reset (Huang et al. 2025).

Plugged into the Adam engine (``adaptx._scaling.adam_engine``) by
:func:`adaptx.scale_by_adam` when ``spike_threshold`` or ``reset_interval`` is set;
the math is in that function's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adaptx._core import backend, packing
from adaptx._core import tree as tu


def scalars(
    spike_threshold: jax.typing.ArrayLike | None,
    reset_interval: int | None,
    warmup: int,
    spike_start: int,
):
    """``count -> dict``: SPAM's per-step scalars for the engine.

    ``keep`` (1, or 0 at a reset step), ``spike_on`` (the clip is active), ``theta``, and
    ``step_scale``, the warm-up factor after a reset, when resets are on.
    """

    def fn(count: jax.Array) -> dict:
        keep, on, warm = schedule(count, reset_interval, warmup, spike_start)
        k = {"keep": keep, "spike_on": on}
        if spike_threshold is not None:
            k["theta"] = tu.as_scalar(spike_threshold, jnp.float32)
        if reset_interval is not None:
            k["step_scale"] = warm
        return k

    return fn


def moments(spike: bool, reset: bool):
    """The per-element moment rule: reset (``reset``), then clip spikes (``spike``)."""

    def fn(k: dict, g: jax.Array, m: jax.Array, v: jax.Array):
        acc = g.dtype
        b1, b2 = k["b1"].astype(acc), k["b2"].astype(acc)
        if reset:  # moments restart from zero at a reset step
            m = m * k["keep"].astype(acc)
            v = v * k["keep"].astype(acc)
        g_sq = g * g
        if not spike:
            return g, (1 - b1) * g + b1 * m, (1 - b2) * g_sq + b2 * v, jnp.zeros([], jnp.int32)
        theta = k["theta"].astype(acc)
        # An element with no second-moment history (v = 0: never seen a nonzero gradient,
        # e.g. an embedding row) has no reference and is not clipped. The mask is written
        # out once (one byte per element): the count and both moments read it, so no
        # kernel needs v_{t-1} after v is updated in place, and XLA does not copy v.
        is_spike = jax.lax.optimization_barrier(k["spike_on"] & (v > 0) & (g_sq > theta * v))
        n_spikes = count_true(is_spike)
        # A clipped element enters v as its bound theta v_{t-1}, so then
        # v_t = (b2 + (1 - b2) theta) v_{t-1}, and the bound the first moment needs,
        # sqrt(theta v_{t-1}), is sqrt(theta v_t / (b2 + (1 - b2) theta)).
        v = (1 - b2) * jnp.where(is_spike, theta * v, g_sq) + b2 * v
        grow = b2 + (1 - b2) * theta
        bound = jnp.sqrt(theta * (v / grow))
        g = jnp.where(is_spike, jnp.sign(g) * bound, g)
        return g, (1 - b1) * g + b1 * m, v, n_spikes

    return fn


def count_true(mask: jax.Array, row: int = 64) -> jax.Array:
    """Number of true entries of a boolean array, as int32.

    On XLA:CPU, summed first in rows of ``row`` elements in int8 (no row sum can
    overflow), then the row sums in int32: XLA:CPU writes a widened copy of the mask
    before reducing it, and this way the copy has one byte per element rather than
    four. Other backends reduce the mask directly.
    """
    if not backend.on_cpu() or mask.size % row or packing.is_sharded(mask):
        return jnp.sum(mask, dtype=jnp.int32)
    return jnp.sum(jnp.sum(mask.reshape(-1, row), axis=1, dtype=jnp.int8), dtype=jnp.int32)


def schedule(
    count: jax.Array, reset_interval: int | None, warmup: int, spike_start: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPAM's per-step scalars: (keep the moments?, spike rule on?, warm-up factor).

    ``count`` is this step's 1-based index. Resets happen at steps ``k * reset_interval``;
    the warm-up factor at ``j`` steps after a reset is ``1 - 0.99 (1 + cos(pi j / (W+1))) / 2``
    for ``j < W`` and 1 otherwise, as in the paper's reference code.
    """
    f32 = jnp.float32
    on = count >= spike_start
    if reset_interval is None:
        return jnp.ones([], f32), on, jnp.ones([], f32)
    phase = count % reset_interval  # steps since the last reset (0 at a reset step)
    reset_now = phase == 0
    keep = jnp.where(reset_now, 0.0, 1.0).astype(f32)
    on = jnp.logical_and(on, phase >= spike_start)
    after_first = count >= reset_interval
    j = phase.astype(f32)
    cosine = 1.0 - 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * j / (warmup + 1)))
    warm = jnp.where(jnp.logical_and(after_first, phase < warmup), cosine, 1.0).astype(f32)
    return keep, on, warm
