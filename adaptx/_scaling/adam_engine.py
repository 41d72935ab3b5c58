r"""The update every Adam-family transform shares, with each method's own math plugged in.

An Adam-family method keeps two moments per parameter and turns them into a step. What
differs between methods is small and per element (how the moments take a gradient, how
the step is read off them) plus, for some, one reduction per tensor. What they share is
most of the code: storage and compute dtypes, the bias corrections, the skip protocol
of :func:`adaptx.guard` (``adaptx._core.skip``), small-leaf packing
(``adaptx._core.packing``), the per-tensor reductions over packed buffers, and the
counters that :func:`adaptx.telemetry` reads. This module owns the shared part; a
method is a :class:`Method`, four small functions of its own:

- ``scalars(count) -> dict``: the method's per-step scalars (float32), computed once
  per step for the whole tree;
- ``moments(k, g, m, v) -> (g, m, v, n)``: the new moments from the gradient, per
  element, in the compute dtype (``n``: elements the rule changed, int32, or 0);
- ``direction(k, m_hat, v_hat) -> u``: the step from the bias-corrected moments;
- ``reduction``: an optional :class:`Reduction`, a per-tensor statistic that scales
  each tensor's step (StableAdamW's update RMS).

``k`` is a dict holding the engine's scalars (``b1``, ``b2``, ``bc2`` the second
moment's bias correction :math:`1-\beta_2^t`) and the method's own. Every function is
traced inside one fused per-element computation, so a method costs no pass over memory
beyond the reads and writes of its moments.

With ``k["step_scale"]`` set by a method, the step is multiplied by that scalar after
everything else (SPAM's warm-up after a reset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptx._core import hints as hints_lib
from adaptx._core import packing, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu


class Reduction(NamedTuple):
    r"""A per-tensor statistic that scales each tensor's step.

    The statistic is :math:`\sqrt{w\,\mathrm{mean}(\mathrm{terms}(g, v))}` over the
    tensor's elements, :math:`w` = ``weight(k)``; the tensor's step is multiplied by
    ``factor(k, stat)``.

    Attributes:
      terms: ``(k, g, v) -> array``, per element, with ``v`` the updated second moment.
      weight: ``k -> scalar`` multiplying the mean.
      factor: ``(k, stat) -> scalar`` (or a vector of per-tensor scalars).
      degree: ``terms(k, s g, v) = s**degree * terms(k, g, v)`` for a scalar ``s``; the
        engine then reduces over the gradient behind a clip's ``s * g`` (``adaptx._core.
        hints``) instead of the scaled copy. ``None`` if ``terms`` is not homogeneous.
      exceeded: ``(k, stat) -> bool`` per tensor: the tensor was scaled down (counted).
    """

    terms: Callable
    weight: Callable
    factor: Callable
    degree: int | None
    exceeded: Callable


class Method(NamedTuple):
    """One Adam-family method: what it states about itself (see the module docstring).

    Attributes:
      name: the public transform's name, for error messages.
      scalars: ``count -> dict`` of the method's per-step scalars.
      moments: the per-element moment update.
      direction: the per-element step from the bias-corrected moments.
      reduction: a per-tensor :class:`Reduction`, or ``None``.
      changes_grad: whether ``moments`` may return a gradient other than its input
        (SPAM's clip): the step and the reduction then read the changed one.
      nesterov: NAdam's first moment, :math:`\\beta_1 m_t / (1-\\beta_1^{t+1}) + (1-\\beta_1)
        g_t / (1-\\beta_1^t)`, in place of :math:`m_t / (1-\\beta_1^t)`.
    """

    name: str
    scalars: Callable[[jax.Array], dict]
    moments: Callable
    direction: Callable
    reduction: Reduction | None = None
    changes_grad: bool = False
    nesterov: bool = False


def ema_moments(k: dict, g: jax.Array, m: jax.Array, v: jax.Array):
    r"""Adam's moments.

    :math:`m = \beta_1 m + (1-\beta_1) g` and :math:`v = \beta_2 v + (1-\beta_2) |g|^2`.

    For a complex :math:`g`, :math:`m` is complex and :math:`|g|^2` real (``tu.abs_sq``),
    as in ``optax.scale_by_adam``; :math:`v` keeps the dtype it came in (complex when
    stored like the parameter, with a zero imaginary part).
    """
    g2 = tu.abs_sq(g)
    b1, b2 = k["b1"].astype(g.dtype), k["b2"].astype(g2.dtype)
    m = (1 - b1) * g + b1 * m
    v = ((1 - b2) * g2).astype(v.dtype) + b2.astype(v.dtype) * v
    return g, m, v, jnp.zeros([], jnp.int32)


def no_scalars(count: jax.Array) -> dict:
    del count
    return {}


class Moments(NamedTuple):
    """The moments an engine step stores, and where packed leaves sit in them."""

    count: jax.Array
    mu: Any
    nu: Any
    offsets: tuple


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
        return Moments(count, mu, nu, ())
    layout = packing.plan(params, pack_small_leaves)
    mu = packing.zeros(layout, params, mu_dtype)
    nu = packing.zeros(layout, params, nu_dtype)
    return Moments(count, mu, nu, packing.offsets(layout))


def step_scalars(method: Method, b1: Any, b2: Any, count: jax.Array) -> dict:
    """The per-step scalars for the whole tree: the engine's and the method's."""
    f32 = jnp.float32
    c1, c2 = tu.as_scalar(b1, f32), tu.as_scalar(b2, f32)
    k = {"b1": c1, "b2": c2, "bc2": tu.bias_correction(c2, count)}
    k["inv_bc2"] = 1.0 / k["bc2"]
    if method.nesterov:
        k["k_mu"] = c1 / tu.bias_correction(c1, tu.safe_increment(count))
        k["k_g"] = (1.0 - c1) / tu.bias_correction(c1, count)
    else:
        k["k_mu"] = 1.0 / tu.bias_correction(c1, count)
    k.update(method.scalars(count))
    return k


def update(
    method: Method, b1: Any, b2: Any, updates: Any, state: Moments, extra_args: dict
) -> Step:
    """One step of ``method`` on ``state``: checks, the fused per-leaf update, counters."""
    fn = method.name
    tu.check_float_leaves(fn, updates)
    packed = isinstance(state.mu, packing.PackedTree)
    if packed:
        packing.check(fn, updates, state.mu.layout)
    else:
        tu.check_same_structure(fn, updates, state.mu, "updates", "state.mu", shapes=True)
    count = tu.safe_increment(state.count)
    signal = skip_lib.from_extra_args(extra_args)
    ctx = _Context(method, step_scalars(method, b1, b2, count), signal)
    if packed:
        u, mu, nu, outs, stats = _packed(ctx, updates, state)
        order = _packed_order(state.mu.layout)
    else:
        out = jax.tree.map(lambda g, m, v: _leaf(ctx, g, m, v), updates, state.mu, state.nu)
        is_out = lambda x: isinstance(x, _LeafOut)  # noqa: E731
        u = jax.tree.map(lambda o: o.update, out, is_leaf=is_out)
        mu = jax.tree.map(lambda o: o.m, out, is_leaf=is_out)
        nu = jax.tree.map(lambda o: o.v, out, is_leaf=is_out)
        outs = jax.tree.leaves(out, is_leaf=is_out)
        stats = [o.stat for o in outs]
        order = None
    offsets = tuple(skip_lib.kept(ctx.signal, o, o) for o in state.offsets)
    return _finish(ctx, u, Moments(count, mu, nu, offsets), outs, stats, order)


class _Context(NamedTuple):
    method: Method
    k: dict
    signal: skip_lib.SkipSignal | None


class _LeafOut(NamedTuple):
    update: jax.Array
    m: jax.Array
    v: jax.Array
    changed: jax.Array
    stat: jax.Array | None  # the reduction's statistic, when reduced here
    v_acc: jax.Array | None = None  # for a packed buffer's reduction: v in the compute dtype
    g_acc: jax.Array | None = None  # and the gradient the moments took


def _cast(k: dict, name: str, acc: Any) -> jax.Array:
    return k[name].astype(acc)


def _leaf(ctx: _Context, g: jax.Array, m: jax.Array, v: jax.Array, reduce_here: bool = True):
    """The fused per-element update of one leaf (or one packed buffer)."""
    method, k, signal = ctx.method, ctx.k, ctx.signal
    acc = tu.compute_dtype(g.dtype, m.dtype, v.dtype)
    g_, m_, v_ = g.astype(acc), m.astype(acc), v.astype(acc)
    g_, m_, v_, changed = method.moments(k, g_, m_, v_)
    # Inside a guard, a skipped step keeps the old moments (adaptx._core.skip).
    m_, v_ = skip_lib.hold(signal, m, m_), skip_lib.hold(signal, v, v_)
    m_hat = _cast(k, "k_mu", acc) * m_
    if method.nesterov:
        m_hat = m_hat + _cast(k, "k_g", acc) * g_
    u = method.direction(k, m_hat, v_ * _cast(k, "inv_bc2", acc))
    stat = None
    red = method.reduction
    if red is not None and reduce_here:
        stat = _tensor_stat(ctx, g, g_, v_)
        u = u * red.factor(k, stat).astype(acc)
    if "step_scale" in k:
        u = u * _cast(k, "step_scale", acc)
    u = skip_lib.silence(signal, u)
    m_new = skip_lib.kept(signal, m, tu.to_storage(m_, m.dtype))
    v_new = skip_lib.kept(signal, v, tu.to_storage(v_, v.dtype))
    if red is not None and not reduce_here:
        # A packed buffer is scaled per tensor later: keep u in acc until then, with what
        # the reduction reads.
        g_used = g_ if method.changes_grad else None
        return _LeafOut(u, m_new, v_new, changed, None, v_, g_used)
    return _LeafOut(u.astype(g.dtype), m_new, v_new, changed, stat)


def _tensor_stat(ctx: _Context, g_in: jax.Array, g: jax.Array, v: jax.Array) -> jax.Array:
    """The reduction's statistic of one tensor, as float32.

    When ``g_in`` is a clip's ``s * g0`` (``adaptx._core.hints``) and the moments did not
    change it, the mean is ``s**degree * mean(terms(g0))``: the reduction reads ``g0``,
    so XLA does not write ``s * g0`` out as a temporary.
    """
    red, k = ctx.method.reduction, ctx.k
    acc = g.dtype
    scaled = hints_lib.lookup(g_in)
    w = red.weight(k).astype(acc)
    if scaled is not None and red.degree is not None and not ctx.method.changes_grad:
        g0, s0 = scaled[0].astype(acc), scaled[1].astype(acc)
        mean = s0**red.degree * w * jnp.mean(red.terms(k, g0, v))
    else:
        mean = w * jnp.mean(red.terms(k, g, v))
    return jnp.sqrt(mean).astype(jnp.float32)


def _packed(ctx: _Context, updates: Any, state: Moments):
    """:func:`_leaf` over the flat buffers and big leaves of a packed state.

    With a reduction, the per-element terms of every packed tensor are summed by tensor
    in one segment sum over the flat buffer, each tensor's factor is computed at once for
    all of them, and the flat update is scaled element by element (a gather of the
    factors) before the leaves are cut out of it: one kernel a leaf, as without it.
    """
    layout = state.mu.layout
    g_flats, g_bigs = packing.pack(layout, updates)
    n = len(g_flats)
    grads = g_flats + g_bigs
    ms, vs = state.mu.flats + state.mu.bigs, state.nu.flats + state.nu.bigs
    outs = [
        _leaf(ctx, g, m, v, reduce_here=i >= n)
        for i, (g, m, v) in enumerate(zip(grads, ms, vs, strict=True))
    ]
    stats = [o.stat for o in outs[n:]]
    u_flats = []
    for i, group in enumerate(layout.groups):
        u = outs[i].update
        if ctx.method.reduction is not None:
            u, stat = _scale_packed(ctx, layout, group, g_flats[i], outs[i], u)
            stats.append(stat)
        # The flat update is written out once; without the barrier XLA fuses its whole
        # computation (the concatenation included) into every leaf's slice, and each of
        # those kernels becomes a distinct and large one.
        u_flats.append(jax.lax.optimization_barrier(u.astype(g_flats[i].dtype)))
    leaves, treedef = jax.tree.flatten(updates)
    dtypes = tuple(jnp.result_type(x) for x in leaves)
    u_bigs = tuple(o.update for o in outs[n:])
    u = packing.unpack(layout, tuple(u_flats), u_bigs, state.offsets, dtypes, treedef)
    mu = packing.PackedTree([o.m for o in outs[:n]], [o.m for o in outs[n:]], layout)
    nu = packing.PackedTree([o.v for o in outs[:n]], [o.v for o in outs[n:]], layout)
    return u, mu, nu, outs, stats


def _scale_packed(ctx, layout, group, g_flat, out: _LeafOut, u):
    """A packed buffer's per-tensor statistics (a vector), and its update scaled by them."""
    red, k = ctx.method.reduction, ctx.k
    sizes = np.array([layout.size(i) for i in group])
    seg = jnp.asarray(np.repeat(np.arange(len(group), dtype=np.int32), sizes))
    g = out.g_acc if out.g_acc is not None else g_flat.astype(out.v_acc.dtype)
    sums = jax.ops.segment_sum(red.terms(k, g, out.v_acc), seg, len(group), indices_are_sorted=True)
    w = red.weight(k).astype(sums.dtype)
    stat = jnp.sqrt(w * (sums / jnp.asarray(sizes, sums.dtype))).astype(jnp.float32)
    # silenced again: on a skipped (non-finite) step the factor may be NaN
    u = skip_lib.silence(ctx.signal, u * red.factor(k, stat).astype(u.dtype)[seg])
    return u, stat


def _packed_order(layout: packing.Layout) -> np.ndarray:
    """Where each leaf's statistic sits in ``[big leaves..., group 0..., group 1...]``."""
    pos = np.zeros(len(layout.shapes), np.int32)
    flat = list(layout.big) + [i for g in layout.groups for i in g]
    pos[np.asarray(flat, np.int64)] = np.arange(len(flat), dtype=np.int32)
    return pos


def _finish(
    ctx: _Context, u: Any, moments: Moments, outs: list, stats: list, order: np.ndarray | None
) -> Step:
    """The :class:`Step` with its counters summed over leaves and packed tensors.

    ``order``: for a packed state, each leaf's position in the concatenated ``stats``
    (big leaves first, then each group's vector); ``None`` when they are in tree order.
    """
    zero_i, zero_f = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)
    changed = sum((o.changed for o in outs), zero_i)
    red = ctx.method.reduction
    if red is None:
        return Step(u, moments, changed, zero_i, zero_f)
    if not stats:  # an empty tree: no tensor, no statistic
        return Step(u, moments, changed, zero_i, zero_f, jnp.zeros([0], jnp.float32))
    # a packed buffer gives a vector, one statistic per tensor
    exceeded = sum((jnp.sum(red.exceeded(ctx.k, s), dtype=jnp.int32) for s in stats), zero_i)
    max_stat = jnp.max(jnp.stack([jnp.max(s) for s in stats]))
    by_leaf = jnp.concatenate([jnp.reshape(s, [-1]) for s in stats])
    if order is not None:
        by_leaf = by_leaf[jnp.asarray(order)]  # one gather: leaves back in tree order
    return Step(u, moments, changed, exceeded, max_stat, by_leaf)


def transformation(
    method: Method,
    b1: Any,
    b2: Any,
    *,
    mu_dtype: jax.typing.DTypeLike | None,
    nu_dtype: jax.typing.DTypeLike | None,
    pack_small_leaves: int | None,
    make_state: Callable[[Moments, Step | None, Any], Any],
) -> optax.GradientTransformationExtraArgs:
    """An optax transform running ``method`` on the engine.

    ``make_state(moments, step, context)`` builds the public transform's own state: from
    the initial moments (``step`` is ``None``, ``context`` the params) and after each
    update (``context`` the previous state). Checks the storage options every method
    shares (``mu_dtype``, ``nu_dtype``, ``pack_small_leaves``), naming ``method.name``.
    """
    fn = method.name
    validate.check_dtype(fn, "mu_dtype", mu_dtype)
    validate.check_dtype(fn, "nu_dtype", nu_dtype)
    # A concrete integer array is accepted (optax.inject_hyperparams passes numbers as
    # arrays); the value sizes buffers, so it cannot be traced.
    pack_small_leaves = validate.static_int(
        fn, "pack_small_leaves", pack_small_leaves, low=1, allow_none=True, example="65536"
    )
    mu_dtype = tu.canonical_dtype(mu_dtype)
    nu_dtype = tu.canonical_dtype(nu_dtype)

    def init_fn(params):
        return make_state(init(params, mu_dtype, nu_dtype, pack_small_leaves), None, params)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        moments = Moments(state.count, state.mu, state.nu, state.offsets)
        step = update(method, b1, b2, updates, moments, extra_args)
        return step.updates, make_state(step.moments, step, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
