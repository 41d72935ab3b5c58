r"""The update every Adam-family transform shares, with each method's own math plugged in.

An Adam-family method keeps two moments per parameter and turns them into a step. What
differs between methods is small and per element (how the moments take a gradient, how
the step is read off them) plus, for some, one reduction per tensor. What they share is
most of the code: storage and compute dtypes, the bias corrections, the skip protocol
(``adaptx._core.skip``), small-leaf packing (``adaptx._core.packing``), a clip's scale
folded into the pass (:func:`adaptx.chain`), the per-tensor reductions over packed
buffers, and the counters that :func:`adaptx.telemetry` reads. This module owns the
shared part: its types here, the fused pass in ``adaptx._scaling.adam_pass``, the optax
transform in ``adaptx._scaling.adam_family``. A method is a
:class:`Method`, a few small functions of its own:

- ``scalars(count)``: the method's own per-step scalars (a ``NamedTuple`` of float32
  scalars, or ``None``), computed once per step for the whole tree;
- ``moments(k, g, m, v) -> (g, m, v, n)``: the new moments from the gradient, per
  element, in the compute dtype (``n``: elements the rule changed, int32, or 0);
- ``direction(k, m_hat, v_hat) -> u``: the step from the bias-corrected moments;
- ``reduction``: an optional :class:`Reduction`, a per-tensor statistic that scales
  each tensor's step (StableAdamW's update RMS);
- ``step_scale(count)``: an optional scalar multiplying the whole step (SPAM's warm-up
  after a reset).

``k`` is the step's :class:`Scalars`: the engine's (``b1``, ``b2``, ``bc2`` the second
moment's bias correction :math:`1-\beta_2^t`, ...) and the method's own as ``k.own``.
Every function is traced inside one fused per-element computation, so a method costs no
pass over memory beyond the reads and writes of its moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adaptx._core import packing
from adaptx._core import tree as tu


class Scalars(NamedTuple):
    r"""The per-step scalars of one engine step, float32, computed once for the whole tree.

    Attributes:
      b1: :math:`\beta_1`.
      b2: :math:`\beta_2`.
      bc2: :math:`1 - \beta_2^t`.
      inv_bc2: :math:`1 / (1 - \beta_2^t)`.
      k_mu: :math:`\hat m = k_\mu m` (:math:`1 / (1-\beta_1^t)`, or NAdam's
        :math:`\beta_1 / (1-\beta_1^{t+1})`).
      k_g: with NAdam, the gradient's weight :math:`(1-\beta_1)/(1-\beta_1^t)` in
        :math:`\hat m`; ``None`` otherwise.
      step_scale: a factor on the whole step (``Method.step_scale``), or ``None``.
      own: the method's own scalars (``Method.scalars``), or ``None``.
    """

    b1: jax.Array
    b2: jax.Array
    bc2: jax.Array
    inv_bc2: jax.Array
    k_mu: jax.Array
    k_g: jax.Array | None
    step_scale: jax.Array | None
    own: Any


class Reduction(NamedTuple):
    r"""A per-tensor statistic that scales each tensor's step.

    The statistic is :math:`\sqrt{w\,\mathrm{mean}(\mathrm{terms}(g, v))}` over the
    tensor's elements, :math:`w` = ``weight(k)``; the tensor's step is multiplied by
    ``factor(k, stat)``.

    Attributes:
      terms: ``(k, g, v) -> array``, per element, with ``v`` the updated second moment.
      weight: ``k -> scalar`` multiplying the mean.
      factor: ``(k, stat) -> scalar`` (or a vector of per-tensor scalars).
      degree: ``terms(k, s g, v) = s**degree * terms(k, g, v)`` for a scalar ``s``; with a
        clip's scale folded in (:func:`adaptx.chain`) the engine then reduces over the
        unscaled gradient, which XLA reads in place, instead of a scaled copy. ``None`` if
        ``terms`` is not homogeneous.
      exceeded: ``(k, stat) -> bool`` per tensor: the tensor was scaled down (counted).
    """

    terms: Callable[[Scalars, jax.Array, jax.Array], jax.Array]
    weight: Callable[[Scalars], jax.Array]
    factor: Callable[[Scalars, jax.Array], jax.Array]
    degree: int | None
    exceeded: Callable[[Scalars, jax.Array], jax.Array]


MomentRule = Callable[
    [Scalars, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]
]


class Method(NamedTuple):
    r"""One Adam-family method: what it states about itself (see the module docstring).

    Attributes:
      name: the public transform's name, for error messages.
      scalars: ``count -> NamedTuple | None``, the method's own per-step scalars.
      moments: the per-element moment update.
      direction: the per-element step from the bias-corrected moments.
      reduction: a per-tensor :class:`Reduction`, or ``None``.
      changes_grad: whether ``moments`` may return a gradient other than its input
        (SPAM's clip): the step and the reduction then read the changed one.
      nesterov: NAdam's first moment, :math:`\beta_1 m_t / (1-\beta_1^{t+1}) + (1-\beta_1)
        g_t / (1-\beta_1^t)`, in place of :math:`m_t / (1-\beta_1^t)`.
      step_scale: ``count -> scalar`` multiplying the whole step, or ``None``.
      no_complex: why the method has no complex form (a complex leaf then raises
        ``TypeError`` with this reason); ``None`` when it handles complex leaves.
    """

    name: str
    scalars: Callable[[jax.Array], Any]
    moments: MomentRule
    direction: Callable[[Scalars, jax.Array, jax.Array], jax.Array]
    reduction: Reduction | None = None
    changes_grad: bool = False
    nesterov: bool = False
    step_scale: Callable[[jax.Array], jax.Array] | None = None
    no_complex: str | None = None


def ema_moments(
    k: Scalars, g: jax.Array, m: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Adam's moments.

    :math:`m = \beta_1 m + (1-\beta_1) g` and :math:`v = \beta_2 v + (1-\beta_2) |g|^2`.

    For a complex :math:`g`, :math:`m` is complex and :math:`|g|^2` real (``tu.abs_sq``),
    as in ``optax.scale_by_adam``; :math:`v` keeps the dtype it came in (complex when
    stored like the parameter, with a zero imaginary part).
    """
    g2 = tu.abs_sq(g)
    b1, b2 = k.b1.astype(g.dtype), k.b2.astype(g2.dtype)
    m = (1 - b1) * g + b1 * m
    v = ((1 - b2) * g2).astype(v.dtype) + b2.astype(v.dtype) * v
    return g, m, v, jnp.zeros([], jnp.int32)


def no_scalars(count: jax.Array) -> None:
    del count
    return None


class Moments(NamedTuple):
    """The moments an engine step stores (packed or one array per leaf)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: Any
    nu: Any


class Step(NamedTuple):
    """What one engine step returns: the update, the new moments and the counters.

    Attributes:
      updates: shaped like the gradients, in their dtypes.
      moments: the new :class:`Moments`.
      changed: elements the method's moment rule changed (int32; SPAM's spikes).
      exceeded: tensors the reduction scaled down (int32; 0 without a reduction).
      max_stat: largest per-tensor statistic of the reduction (float32; 0 without).
      stats: the reduction's statistic of every leaf, in tree order (float32 vector;
        ``None`` without a reduction).
    """

    updates: Any
    moments: Moments
    changed: jax.Array
    exceeded: jax.Array
    max_stat: jax.Array
    stats: jax.Array | None = None


def init(params: Any, mu_dtype: Any, nu_dtype: Any, pack_small_leaves: int | None) -> Moments:
    """Zero moments shaped like ``params`` (or packed: see ``adaptx._core.packing``)."""
    count = jnp.zeros([], jnp.int32)
    if pack_small_leaves is None:
        mu = tu.zeros_like(params, dtype=mu_dtype)
        nu = tu.zeros_like(params, dtype=nu_dtype)
        return Moments(count, mu, nu)
    layout = packing.plan(params, pack_small_leaves)
    return Moments(
        count, packing.zeros(layout, params, mu_dtype), packing.zeros(layout, params, nu_dtype)
    )


def step_scalars(method: Method, b1: Any, b2: Any, count: jax.Array) -> Scalars:
    """The per-step scalars for the whole tree: the engine's and the method's."""
    f32 = jnp.float32
    c1, c2 = tu.as_scalar(b1, f32), tu.as_scalar(b2, f32)
    bc2 = tu.bias_correction(c2, count)
    if method.nesterov:
        k_mu = c1 / tu.bias_correction(c1, tu.safe_increment(count))
        k_g: jax.Array | None = (1.0 - c1) / tu.bias_correction(c1, count)
    else:
        k_mu, k_g = 1.0 / tu.bias_correction(c1, count), None
    step_scale = None if method.step_scale is None else method.step_scale(count)
    return Scalars(c1, c2, bc2, 1.0 / bc2, k_mu, k_g, step_scale, method.scalars(count))
