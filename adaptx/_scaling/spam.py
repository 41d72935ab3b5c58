r"""SPAM's moment rule: spike-aware clipping and momentum reset (Huang et al. 2025).

Plugged into the Adam engine (``adaptx._scaling.adam_engine``) by
:func:`adaptx.scale_by_adam` when ``spike_threshold`` or ``reset_interval`` is set;
the math is in that function's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaptx._core import backend, packing
from adaptx._core import tree as tu
from adaptx._scaling.adam_engine import MomentRule, Scalars


class SpamScalars(NamedTuple):
    """SPAM's own per-step scalars (``Scalars.own``).

    Attributes:
      keep: 1, or 0 at a reset step (the moments restart from zero).
      spike_on: whether the spike clip is active at this step.
      theta: the spike threshold, or ``None`` without the clip.
    """

    keep: jax.Array
    spike_on: jax.Array
    theta: jax.Array | None


def scalars(
    spike_threshold: jax.typing.ArrayLike | None,
    reset_interval: int | None,
    warmup: int,
    spike_start: int,
) -> Callable[[jax.Array], SpamScalars]:
    """``count -> SpamScalars``: SPAM's per-step scalars for the engine."""

    def fn(count: jax.Array) -> SpamScalars:
        keep, on, _ = schedule(count, reset_interval, warmup, spike_start)
        theta = None if spike_threshold is None else tu.as_scalar(spike_threshold, jnp.float32)
        return SpamScalars(keep, on, theta)

    return fn


def step_scale(
    reset_interval: int, warmup: int, spike_start: int
) -> Callable[[jax.Array], jax.Array]:
    """``count -> scalar``: the warm-up factor on the step after each reset."""

    def fn(count: jax.Array) -> jax.Array:
        return schedule(count, reset_interval, warmup, spike_start)[2]

    return fn


def moments(spike: bool, reset: bool) -> MomentRule:
    """The per-element moment rule: reset (``reset``), then clip spikes (``spike``)."""

    def fn(
        k: Scalars, g: jax.Array, m: jax.Array, v: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        acc = g.dtype
        own: SpamScalars = k.own
        b1, b2 = k.b1.astype(acc), k.b2.astype(acc)
        if reset:  # moments restart from zero at a reset step
            m = m * own.keep.astype(acc)
            v = v * own.keep.astype(acc)
        g_sq = g * g
        if not spike:
            return g, (1 - b1) * g + b1 * m, (1 - b2) * g_sq + b2 * v, jnp.zeros([], jnp.int32)
        assert own.theta is not None
        theta = own.theta.astype(acc)
        # An element with no second-moment history (v = 0: never seen a nonzero gradient,
        # e.g. an embedding row) has no reference and is not clipped.
        is_spike = backend.spike_mask(own.spike_on & (v > 0) & (g_sq > theta * v))
        n_spikes = backend.count_true(is_spike, splittable=not packing.is_sharded(is_spike))
        # A clipped element enters v as its bound theta v_{t-1}, so then
        # v_t = (b2 + (1 - b2) theta) v_{t-1}, and the bound the first moment needs,
        # sqrt(theta v_{t-1}), is sqrt(theta v_t / (b2 + (1 - b2) theta)).
        v = (1 - b2) * jnp.where(is_spike, theta * v, g_sq) + b2 * v
        grow = b2 + (1 - b2) * theta
        bound = jnp.sqrt(theta * (v / grow))
        g = jnp.where(is_spike, jnp.sign(g) * bound, g)
        return g, (1 - b1) * g + b1 * m, v, n_spikes

    return fn


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
