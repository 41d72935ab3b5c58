"""The fused per-element pass of the Adam engine, per leaf or over packed buffers.

One step of a :class:`~adaptx._scaling.adam_engine.Method`: the gradient (times a clip's
scale, when one is folded in), the new moments (held under the skip protocol), the step
read off them, the per-tensor reduction where the method has one, and the counters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adaptx._core import packing
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._scaling.adam_engine import Method, Moments, Scalars, Step, step_scalars


class _Context(NamedTuple):
    method: Method
    k: Scalars
    skip: jax.Array | None
    scale: jax.Array | None  # a clip's scale folded into the pass (adaptx.chain)


class _LeafOut(NamedTuple):
    update: jax.Array
    m: jax.Array
    v: jax.Array
    changed: jax.Array
    stat: jax.Array | None  # the reduction's statistic, when reduced here
    v_acc: jax.Array | None = None  # for a packed buffer's reduction: v in the compute dtype
    g_acc: jax.Array | None = None  # and the gradient the moments took


def update(
    method: Method,
    b1: Any,
    b2: Any,
    updates: Any,
    state: Moments,
    extra_args: dict[str, Any],
    scale: jax.Array | None = None,
) -> Step:
    """One step of ``method`` on ``scale * updates``: checks, the fused pass, counters."""
    fn = method.name
    tu.check_float_leaves(
        fn, updates, allow_complex=method.no_complex is None, why=method.no_complex
    )
    packed = isinstance(state.mu, packing.PackedTree)
    if packed:
        packing.check(fn, updates, state.mu.layout)
    else:
        tu.check_same_structure(fn, updates, state.mu, "updates", "state.mu", shapes=True)
    skip = skip_lib.decision(extra_args)
    count = tu.safe_increment(state.count)
    ctx = _Context(method, step_scalars(method, b1, b2, count), skip, scale)
    if packed:
        u, mu, nu, outs, stats = _packed(ctx, updates, state)
        order: np.ndarray | None = _packed_order(state.mu.layout)
    else:
        out = jax.tree.map(lambda g, m, v: _leaf(ctx, g, m, v), updates, state.mu, state.nu)
        is_out = lambda x: isinstance(x, _LeafOut)  # noqa: E731
        u = jax.tree.map(lambda o: o.update, out, is_leaf=is_out)
        mu = jax.tree.map(lambda o: o.m, out, is_leaf=is_out)
        nu = jax.tree.map(lambda o: o.v, out, is_leaf=is_out)
        outs = jax.tree.leaves(out, is_leaf=is_out)
        stats = [o.stat for o in outs]
        order = None
    count = skip_lib.hold(skip, state.count, count)
    return _finish(ctx, u, Moments(count, mu, nu), outs, stats, order)


def _gradient(ctx: _Context, g: jax.Array, acc: Any) -> jax.Array:
    """The gradient the moments take, in the compute dtype: ``g``, or the clip's ``s * g``."""
    if ctx.scale is None:
        return g.astype(acc)
    return tu.scale_leaf(g, ctx.scale).astype(acc)


def _leaf(
    ctx: _Context, g: jax.Array, m: jax.Array, v: jax.Array, reduce_here: bool = True
) -> _LeafOut:
    """The fused per-element update of one leaf (or one packed buffer)."""
    method, k, skip = ctx.method, ctx.k, ctx.skip
    acc = tu.compute_dtype(g.dtype, m.dtype, v.dtype)
    g_, m_, v_ = _gradient(ctx, g, acc), m.astype(acc), v.astype(acc)
    g_, m_, v_, changed = method.moments(k, g_, m_, v_)
    # A skipped step keeps the old moments, selected here inside the pass.
    m_, v_ = skip_lib.hold(skip, m, m_), skip_lib.hold(skip, v, v_)
    m_hat = k.k_mu.astype(acc) * m_
    if k.k_g is not None:
        m_hat = m_hat + k.k_g.astype(acc) * g_
    u = method.direction(k, m_hat, v_ * k.inv_bc2.astype(acc))
    red = method.reduction
    stat = None
    if red is not None and reduce_here:
        stat = _tensor_stat(ctx, g, g_, v_)
        u = u * red.factor(k, stat).astype(acc)
    if k.step_scale is not None:
        u = u * k.step_scale.astype(acc)
    u = skip_lib.silence(skip, u)
    m_new, v_new = tu.to_storage(m_, m.dtype), tu.to_storage(v_, v.dtype)
    if red is not None and not reduce_here:
        # A packed buffer is scaled per tensor later: keep u in acc until then, with what
        # the reduction reads.
        g_used = g_ if method.changes_grad else None
        return _LeafOut(u, m_new, v_new, changed, None, v_, g_used)
    return _LeafOut(u.astype(g.dtype), m_new, v_new, changed, stat)


def _tensor_stat(ctx: _Context, g_in: jax.Array, g: jax.Array, v: jax.Array) -> jax.Array:
    """The reduction's statistic of one tensor, as float32.

    With a clip's scale ``s`` folded in and a homogeneous reduction (``degree``) that the
    moment rule did not change, the mean is ``s**degree * mean(terms(g_in))``: it reads
    the unscaled gradient, so XLA does not write ``s * g_in`` out as a temporary.
    """
    red, k = ctx.method.reduction, ctx.k
    assert red is not None
    acc = g.dtype
    w = red.weight(k).astype(acc)
    s = ctx.scale
    if s is not None and red.degree is not None and not ctx.method.changes_grad:
        raw = g_in.astype(acc)
        mean = s.astype(acc) ** red.degree * w * jnp.mean(red.terms(k, raw, v))
    else:
        mean = w * jnp.mean(red.terms(k, g, v))
    return jnp.sqrt(mean).astype(jnp.float32)


def _packed(
    ctx: _Context, updates: Any, state: Moments
) -> tuple[Any, packing.PackedTree, packing.PackedTree, list[_LeafOut], list[Any]]:
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
    stats: list[Any] = [o.stat for o in outs[n:]]
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
    u = packing.unpack(layout, tuple(u_flats), u_bigs, dtypes, treedef)
    mu = packing.PackedTree(tuple(o.m for o in outs[:n]), tuple(o.m for o in outs[n:]), layout)
    nu = packing.PackedTree(tuple(o.v for o in outs[:n]), tuple(o.v for o in outs[n:]), layout)
    return u, mu, nu, outs, stats


def _scale_packed(
    ctx: _Context,
    layout: packing.Layout,
    group: tuple[int, ...],
    g_flat: jax.Array,
    out: _LeafOut,
    u: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """A packed buffer's per-tensor statistics (a vector), and its update scaled by them."""
    red, k = ctx.method.reduction, ctx.k
    assert red is not None and out.v_acc is not None
    acc = out.v_acc.dtype
    sizes = np.array([layout.size(i) for i in group])
    seg = jnp.asarray(np.repeat(np.arange(len(group), dtype=np.int32), sizes))
    w = red.weight(k).astype(acc)
    if out.g_acc is not None:  # the moment rule changed the gradient: reduce what it took
        g, s_pow = out.g_acc, None
    elif ctx.scale is not None and red.degree is None:
        g, s_pow = _gradient(ctx, g_flat, acc), None
    else:  # the unscaled gradient, and the clip's scale to the reduction's degree
        g = g_flat.astype(acc)
        s_pow = None
        if ctx.scale is not None and red.degree is not None:
            s_pow = ctx.scale.astype(acc) ** red.degree
    sums = jax.ops.segment_sum(red.terms(k, g, out.v_acc), seg, len(group), indices_are_sorted=True)
    if s_pow is not None:
        w = s_pow * w
    stat = jnp.sqrt(w * (sums / jnp.asarray(sizes, sums.dtype))).astype(jnp.float32)
    # silenced again: on a skipped (non-finite) step the factor may be NaN
    u = skip_lib.silence(ctx.skip, u * red.factor(k, stat).astype(u.dtype)[seg])
    return u, stat


def _packed_order(layout: packing.Layout) -> np.ndarray:
    """Where each leaf's statistic sits in ``[big leaves..., group 0..., group 1...]``."""
    pos = np.zeros(len(layout.shapes), np.int32)
    flat = list(layout.big) + [i for g in layout.groups for i in g]
    pos[np.asarray(flat, np.int64)] = np.arange(len(flat), dtype=np.int32)
    return pos


def _finish(
    ctx: _Context,
    u: Any,
    moments: Moments,
    outs: list[_LeafOut],
    stats: list[Any],
    order: np.ndarray | None,
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
