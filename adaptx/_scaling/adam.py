"""Adam's moment estimates and rescaling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptx._core import hints as hints_lib
from adaptx._core import packing, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      mu: first-moment estimate, one array per parameter, in ``mu_dtype`` (with
        ``pack_small_leaves``, a ``PackedTree``: see :func:`scale_by_adam`).
      nu: second-moment estimate, one array per parameter, in ``nu_dtype`` (likewise).
      offsets: with ``pack_small_leaves``, each packed leaf's start in the flat
        buffers (int32 arrays of shape [1]); empty otherwise.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    offsets: tuple = ()


@reports("scale_by_adam", "spikes", "update_clipped", "max_update_rms", "momentum_scale")
class ScaleByAdamGuardedState(NamedTuple):
    r"""State of :func:`scale_by_adam` when SPAM or update clipping is switched on.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      mu: first-moment estimate, one array per parameter, in ``mu_dtype``.
      nu: second-moment estimate, one array per parameter, in ``nu_dtype``.
      spikes: gradient elements clipped by the spike rule at the last step (int32).
      update_clipped: tensors whose step was scaled down by update clipping at the
        last step (int32).
      max_update_rms: largest per-tensor :math:`\sqrt{\mathrm{mean}(g^2/\hat v)}` at
        the last step (float32; 0 when update clipping is off).
      momentum_scale: SPAM's post-reset warm-up factor applied at the last step
        (float32; 1 outside a warm-up).
      offsets: with ``pack_small_leaves``, each packed leaf's start in the flat
        buffers (int32 arrays of shape [1]); empty otherwise.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    spikes: jax.Array
    update_clipped: jax.Array
    max_update_rms: jax.Array
    momentum_scale: jax.Array
    offsets: tuple = ()


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    spike_threshold: float | jax.Array | None = None,
    reset_interval: int | None = None,
    reset_warmup: int = 150,
    spike_start: int = 20,
    update_rms_clip: float | jax.Array | None = None,
    pack_small_leaves: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam's bias-corrected moment estimates, with optional spike defenses.

    With :math:`t` the step count (starting at 1) and :math:`g_t` the incoming gradient:

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

      \hat m_t = \frac{m_t}{1-\beta_1^t}, \qquad \hat v_t = \frac{v_t}{1-\beta_2^t}, \qquad
      u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} .

    With ``nesterov=True`` (NAdam, Dozat 2016), :math:`\hat m_t` is replaced by
    :math:`\frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}`.

    Same numbers as ``optax.scale_by_adam`` for the same settings. The bias
    corrections are scalars computed once per step; the moments are updated in
    float32 (or wider) and stored back in their own dtypes, which are both
    configurable (``optax`` only lets you choose ``mu``'s). The returned update has
    the gradient's dtype.

    **Spike-aware clipping (SPAM, Huang et al. 2025).** With ``spike_threshold``
    :math:`\theta`, an element whose square exceeds :math:`\theta` times the
    previous second moment is clipped to that bound, keeping its sign, before the
    moments see it:

    .. math::

      g_{t,i} \leftarrow \operatorname{sign}(g_{t,i}) \sqrt{\theta\, v_{t-1,i}}
      \quad\text{if}\quad g_{t,i}^2 > \theta\, v_{t-1,i} .

    As in the paper's code, the rule is active from step ``spike_start`` on, and
    (with resets) only from ``spike_start`` steps after each reset, since the
    second moment is then an unreliable reference. One deliberate difference: an
    element whose second moment is still exactly zero (it has never had a nonzero
    gradient, like an embedding row not yet seen) is not clipped; the paper's code
    would clip it to zero at every step, so it could never start learning.

    **Momentum reset (SPAM).** With ``reset_interval`` :math:`\Delta T`, both
    moments are zeroed at steps :math:`t = k\Delta T` (the bias-correction count
    keeps running, as in the paper's code), and the update is multiplied by a
    cosine warm-up :math:`1 - 0.99\cdot\tfrac12(1 + \cos(\pi j / (W + 1)))` for the
    :math:`j = 0 \ldots W-1` steps after each reset, :math:`W` = ``reset_warmup``.

    **Update clipping (StableAdamW, Wortsman et al. 2023).** With
    ``update_rms_clip`` :math:`d`, each tensor's update is divided by

    .. math::

      \max\!\left(1, \frac{1}{d}\sqrt{\operatorname{mean}\!\left(
        \frac{g_t^2}{\max(\hat v_t, \epsilon^2)}\right)}\right),

    with :math:`\hat v_t` the bias-corrected second moment after this step's
    update. When the second moment under-estimates the current gradient (the
    situation that precedes loss spikes), the step shrinks instead of exploding.

    When any of these is on, the state is a :class:`ScaleByAdamGuardedState`,
    which keeps the number of clipped elements, update-clipped tensors, the largest
    update RMS ratio and the warm-up factor for :func:`adaptx.telemetry`.

    **Many small leaves.** With ``pack_small_leaves`` :math:`k`, the moments of every
    leaf with at most :math:`k` elements live in one flat buffer per dtype (a
    ``PackedTree``); each step concatenates those leaves' gradients once, updates the
    moments in one fused pass, and cuts each leaf's update out at an offset kept in
    the state. The numbers are the same as without packing; on a tree of hundreds or
    thousands of small leaves the step compiles several times faster and carries two
    state buffers instead of two per leaf. The updates still come back as a tree
    shaped like the gradients. With ``update_rms_clip``, each packed tensor's RMS is
    reduced over its own slices of the flat buffers. Leaves larger than
    :math:`k` keep their own buffers, and so does a leaf that ``init`` sees sharded
    across devices (concatenating it would gather it); under ``jit`` with automatic
    sharding ``init`` cannot see that, so call it outside ``jit`` or under
    ``jax.set_mesh``. Code that expects the moments shaped like the parameters (a
    checkpoint of an unpacked state, ``optax.tree_map_params``) sees a ``PackedTree``;
    ``state.mu.unpacked(state.offsets, params)`` gives the per-leaf view.

    Args:
      b1: decay :math:`\beta_1 \in [0, 1)` of the first moment.
      b2: decay :math:`\beta_2 \in [0, 1)` of the second moment.
      eps: :math:`\epsilon \ge 0` added to the denominator outside the square root.
      eps_root: :math:`\epsilon_{root} \ge 0` added inside the square root (useful
        when differentiating through the update, e.g. meta-learning).
      mu_dtype: storage dtype of :math:`m` (default: the parameter's dtype).
      nu_dtype: storage dtype of :math:`v` (default: the parameter's dtype). A value
        beyond a float16 state's range is stored as its largest value (65504), not
        ``inf``; for float16 parameters, ``jnp.float32`` keeps it exact.
      nesterov: use Nesterov momentum (NAdam).
      spike_threshold: SPAM's :math:`\theta > 0` (paper default 5000); ``None`` off.
      reset_interval: SPAM's :math:`\Delta T` in steps (paper default 500); ``None`` off.
      reset_warmup: SPAM's warm-up length :math:`W` after each reset (default 150).
      spike_start: steps before spike clipping starts, and after each reset (20).
      update_rms_clip: StableAdamW's :math:`d > 0` (paper default 1.0); ``None`` off.
      pack_small_leaves: pack the moments of leaves with at most this many elements
        (e.g. ``65536``) into flat buffers; ``None`` (default) keeps one array per leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = optax.chain(adaptx.scale_by_adam(), optax.scale(-1e-2))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.5, -0.1]), state)
      >>> optax.apply_updates(params, updates)
      Array([ 0.99, -1.99], dtype=float32)

      Update clipping keeps a step bounded when the gradient outgrows its history:

      >>> tx = adaptx.scale_by_adam(b2=0.99, update_rms_clip=1.0)
      >>> state = tx.init(jnp.zeros(4))
      >>> for _ in range(20):
      ...     _, state = tx.update(jnp.full(4, 1e-3), state)
      >>> u, state = tx.update(jnp.full(4, 10.0), state)   # a 10^4x spike
      >>> int(state.update_clipped), bool(jnp.all(jnp.abs(u) < 1))
      (1, True)

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.

      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.

      Wortsman et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, 2023.
    """
    fn = "scale_by_adam"
    validate.check_decay(fn, "b1", b1)
    validate.check_decay(fn, "b2", b2, example="0.999")
    validate.check_nonnegative(fn, "eps", eps, example="1e-8")
    validate.check_nonnegative(fn, "eps_root", eps_root, example="0.0")
    validate.check_dtype(fn, "mu_dtype", mu_dtype)
    validate.check_dtype(fn, "nu_dtype", nu_dtype)
    if spike_threshold is not None:
        validate.check_positive(fn, "spike_threshold", spike_threshold, example="5000.0")
    if update_rms_clip is not None:
        validate.check_positive(fn, "update_rms_clip", update_rms_clip, example="1.0")
    validate.check_int(
        fn, "reset_interval", reset_interval, low=1, allow_none=True, traced_ok=True, example="500"
    )
    validate.check_int(fn, "reset_warmup", reset_warmup, low=0, traced_ok=True, example="150")
    validate.check_int(fn, "spike_start", spike_start, low=0, traced_ok=True, example="20")
    # A concrete integer array is accepted (optax.inject_hyperparams passes numbers as
    # arrays); the value sizes buffers, so it cannot be traced.
    pack_small_leaves = validate.static_int(
        fn, "pack_small_leaves", pack_small_leaves, low=1, allow_none=True, example="65536"
    )
    mu_dtype = tu.canonical_dtype(mu_dtype)
    nu_dtype = tu.canonical_dtype(nu_dtype)
    guarded = any(x is not None for x in (spike_threshold, reset_interval, update_rms_clip))

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        if pack_small_leaves is None:
            mu = tu.zeros_like(params, dtype=mu_dtype)
            nu = tu.zeros_like(params, dtype=nu_dtype)
            starts = ()
        else:
            layout = packing.plan(params, pack_small_leaves)
            mu = packing.zeros(layout, params, mu_dtype)
            nu = packing.zeros(layout, params, nu_dtype)
            starts = packing.offsets(layout)
        if not guarded:
            return ScaleByAdamState(count=count, mu=mu, nu=nu, offsets=starts)
        return ScaleByAdamGuardedState(
            count=count,
            mu=mu,
            nu=nu,
            spikes=jnp.zeros([], jnp.int32),
            update_clipped=jnp.zeros([], jnp.int32),
            max_update_rms=jnp.zeros([], jnp.float32),
            momentum_scale=jnp.ones([], jnp.float32),
            offsets=starts,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        signal = skip_lib.from_extra_args(extra_args)
        hints = hints_lib.from_extra_args(extra_args)
        tu.check_float_leaves(fn, updates)
        packed = isinstance(state.mu, packing.PackedTree)
        if packed:
            packing.check(fn, updates, state.mu.layout)
        else:
            tu.check_same_structure(fn, updates, state.mu, "updates", "state.mu", shapes=True)
        f32 = jnp.float32
        previous = state.count  # steps taken before this one
        count = tu.safe_increment(previous)
        # Step-dependent scalars, computed once for the whole tree.
        c1, c2 = tu.as_scalar(b1, f32), tu.as_scalar(b2, f32)
        bc2 = tu.bias_correction(c2, count)
        inv_bc2 = 1.0 / bc2
        if nesterov:
            k_mu = c1 / tu.bias_correction(c1, tu.safe_increment(count))
            k_g = (1.0 - c1) / tu.bias_correction(c1, count)
        else:
            k_mu = 1.0 / tu.bias_correction(c1, count)
            k_g = jnp.zeros([], f32)
        e, e_root = tu.as_scalar(eps, f32), tu.as_scalar(eps_root, f32)
        keep, spike_on, warm = _spam_schedule(count, reset_interval, reset_warmup, spike_start)
        theta = tu.as_scalar(spike_threshold if spike_threshold is not None else 0.0, f32)
        d = tu.as_scalar(update_rms_clip if update_rms_clip is not None else 1.0, f32)

        def floor_of(v_, acc):  # max(v, bc2 eps^2): see the update-RMS comment below
            e_, bc2_ = e.astype(acc), bc2.astype(acc)
            return jnp.maximum(v_, bc2_ * (e_ * e_))

        def clip_factor(rms, acc):
            return 1 / jnp.maximum(jnp.ones([], acc), rms.astype(acc) / d.astype(acc))

        def ratio_terms(g, v):
            """The elements of StableAdamW's mean, ``bc2 g^2 / max(v, bc2 eps^2)`` (new v)."""
            acc = tu.compute_dtype(g.dtype, v.dtype)
            g_ = g.astype(acc)
            return bc2.astype(acc) * (g_ * (g_ / floor_of(v.astype(acc), acc)))

        def leaf(g, m, v, per_tensor=True):
            acc = tu.compute_dtype(g.dtype, m.dtype, v.dtype)
            g_, m_, v_ = g.astype(acc), m.astype(acc), v.astype(acc)
            b1_, b2_ = c1.astype(acc), c2.astype(acc)
            n_spikes = jnp.zeros([], jnp.int32)
            if reset_interval is not None:  # moments restart from zero at a reset step
                m_ = m_ * keep.astype(acc)
                v_ = v_ * keep.astype(acc)
            g_sq = g_ * g_
            if spike_threshold is None:
                m_ = (1 - b1_) * g_ + b1_ * m_
                v_ = (1 - b2_) * g_sq + b2_ * v_
            else:
                theta_ = theta.astype(acc)
                # An element with no second-moment history (v = 0: never seen a nonzero
                # gradient, e.g. an embedding row) has no reference and is not clipped.
                # The mask is written out once (one byte per element): the count and
                # both moments read it, so no kernel needs v_{t-1} after v is updated in
                # place, and XLA does not copy v.
                is_spike = jax.lax.optimization_barrier(spike_on & (v_ > 0) & (g_sq > theta_ * v_))
                n_spikes = _count_true(is_spike)
                # A clipped element enters v as its bound theta v_{t-1}, so then
                # v_t = (b2 + (1 - b2) theta) v_{t-1}, and the bound the first moment
                # needs, sqrt(theta v_{t-1}), is sqrt(theta v_t / (b2 + (1 - b2) theta)).
                v_ = (1 - b2_) * jnp.where(is_spike, theta_ * v_, g_sq) + b2_ * v_
                grow = b2_ + (1 - b2_) * theta_
                bound = jnp.sqrt(theta_ * (v_ / grow))
                g_ = jnp.where(is_spike, jnp.sign(g_) * bound, g_)
                m_ = (1 - b1_) * g_ + b1_ * m_
            # Inside a guard, a skipped step keeps the old moments (adaptx._core.skip).
            m_, v_ = skip_lib.hold(signal, m, m_), skip_lib.hold(signal, v, v_)
            m_hat = k_mu.astype(acc) * m_
            if nesterov:
                m_hat = m_hat + k_g.astype(acc) * g_
            v_hat = v_ * inv_bc2.astype(acc)
            u = m_hat / (jnp.sqrt(v_hat + e_root.astype(acc)) + e.astype(acc))
            rms = jnp.zeros([], f32)
            if update_rms_clip is not None and per_tensor:
                # mean(g^2 / max(v_hat, eps^2)) with v_hat = v / bc2, written as
                # bc2 * mean(g^2 / max(v, bc2 eps^2)): the same number, but the reduction
                # reads v itself, so XLA does not write v_hat out as a temporary.
                bc2_ = bc2.astype(acc)
                floor = floor_of(v_, acc)
                scaled = hints.lookup(g) if hints is not None else None
                if scaled is not None and spike_threshold is None:
                    # g = s * g0 from a clip before: s^2 mean(g0^2 / ...) reads g0 itself,
                    # so XLA does not write s * g0 out (adaptx._core.hints).
                    g0, s0 = scaled[0].astype(acc), scaled[1].astype(acc)
                    ratio = (s0 * s0) * bc2_ * jnp.mean(g0 * (g0 / floor))
                else:
                    ratio = bc2_ * jnp.mean(g_ * (g_ / floor))
                rms = jnp.sqrt(ratio).astype(f32)
                u = u * clip_factor(rms, acc)
            if reset_interval is not None:
                u = u * warm.astype(acc)
            u = skip_lib.silence(signal, u)
            m_ = skip_lib.kept(signal, m, tu.to_storage(m_, m.dtype))
            v_held = v_
            v_ = skip_lib.kept(signal, v, tu.to_storage(v_, v.dtype))
            # A packed buffer's update is scaled per tensor later: keep it in acc until then,
            # and hand over v in acc too (its per-tensor RMS reads it, as the one above does).
            if update_rms_clip is not None and not per_tensor:
                return (u, m_, v_, n_spikes, rms, v_held)
            return (u.astype(g.dtype), m_, v_, n_spikes, rms, None)

        if packed:
            per_tensor = None
            if update_rms_clip is not None:
                per_tensor = (ratio_terms, clip_factor, signal)
            u, mu, nu, spikes, rms = _packed_update(leaf, updates, state, hints, per_tensor)
        else:
            out = jax.tree.map(leaf, updates, state.mu, state.nu)
            u, mu, nu, spikes, rms, _ = tu.unzip(out, updates, 6)
        starts = tuple(skip_lib.kept(signal, o, o) for o in state.offsets)
        if not guarded:
            return u, ScaleByAdamState(count=count, mu=mu, nu=nu, offsets=starts)
        spikes, rms = jax.tree.leaves(spikes), jax.tree.leaves(rms)
        zero_i, zero_f = jnp.zeros([], jnp.int32), jnp.zeros([], f32)
        clipped = []
        if update_rms_clip is not None:  # a packed buffer gives a vector, one per tensor
            clipped = [
                jnp.sum(r > d, dtype=jnp.int32) if r.ndim else (r > d).astype(jnp.int32)
                for r in rms
            ]
        rms = [jnp.max(r) if r.ndim else r for r in rms]
        return u, ScaleByAdamGuardedState(
            count=count,
            mu=mu,
            nu=nu,
            spikes=sum(spikes, zero_i),
            update_clipped=sum(clipped, zero_i),
            max_update_rms=jnp.max(jnp.stack(rms)) if rms else zero_f,
            momentum_scale=warm,
            offsets=starts,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _packed_update(leaf, updates, state, hints, per_tensor=None):
    """``leaf`` over the flat buffers and big leaves of a packed state.

    ``per_tensor``: ``(ratio, clip_factor, signal)`` when StableAdamW's update clipping
    is on. The per-element terms of every packed tensor's RMS are then summed by tensor
    in one segment sum over the flat buffer, each tensor's factor is computed at once for
    all of them, and the flat update is scaled element by element (a gather of the
    factors) before the leaves are cut out of it: one kernel a leaf, as without clipping.

    Returns the update as a tree shaped like ``updates``, the new packed moments, and the
    spike counts (per buffer) and RMS values (per big leaf, and a vector per buffer).
    """
    layout = state.mu.layout
    g_flats, g_bigs = packing.pack(layout, updates, hints)
    grads = g_flats + g_bigs
    n = len(g_flats)
    outs = [
        leaf(g, m, v, per_tensor=k >= n)
        for k, (g, m, v) in enumerate(
            zip(grads, state.mu.flats + state.mu.bigs, state.nu.flats + state.nu.bigs, strict=True)
        )
    ]
    rms = [o[4] for o in outs[n:]]
    u_flats = []
    for k, group in enumerate(layout.groups):
        u = outs[k][0]
        if per_tensor is not None:
            ratio, clip_factor, signal = per_tensor
            sizes = np.array([layout.size(i) for i in group])
            seg = jnp.asarray(np.repeat(np.arange(len(group), dtype=np.int32), sizes))
            terms = ratio(g_flats[k], outs[k][5])  # g^2 / max(v, bc2 eps^2), elementwise
            sums = jax.ops.segment_sum(terms, seg, len(group), indices_are_sorted=True)
            r = jnp.sqrt(sums / jnp.asarray(sizes, sums.dtype)).astype(jnp.float32)
            rms.append(r)
            # silenced again: on a skipped (non-finite) step the factor may be NaN
            u = skip_lib.silence(signal, u * clip_factor(r, u.dtype)[seg])
            u = u.astype(g_flats[k].dtype)
        # The flat update is written out once; without the barrier XLA fuses its whole
        # computation (the concatenation included) into every leaf's slice, and each of
        # those kernels becomes a distinct and large one.
        u_flats.append(jax.lax.optimization_barrier(u))
    u_bigs = tuple(o[0] for o in outs[n:])
    leaves, treedef = jax.tree.flatten(updates)
    dtypes = tuple(jnp.result_type(x) for x in leaves)
    u = packing.unpack(layout, tuple(u_flats), u_bigs, state.offsets, dtypes, treedef)
    mu = packing.PackedTree([o[1] for o in outs[:n]], [o[1] for o in outs[n:]], layout)
    nu = packing.PackedTree([o[2] for o in outs[:n]], [o[2] for o in outs[n:]], layout)
    return u, mu, nu, [o[3] for o in outs], rms


def _count_true(mask: jax.Array, row: int = 64) -> jax.Array:
    """Number of true entries of a boolean array, as int32.

    Summed first in rows of ``row`` elements in int8 (no row sum can overflow), then the
    row sums in int32. XLA:CPU writes a widened copy of the mask before reducing it; this
    way the copy has one byte per element rather than four.
    """
    if mask.size % row or packing.is_sharded(mask):  # a sharded array is not reshaped
        return jnp.sum(mask, dtype=jnp.int32)
    return jnp.sum(jnp.sum(mask.reshape(-1, row), axis=1, dtype=jnp.int8), dtype=jnp.int32)


def _spam_schedule(
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
