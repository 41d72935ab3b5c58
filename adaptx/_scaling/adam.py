"""Adam's moment estimates and rescaling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports
from adaptx._scaling import adam_engine as engine
from adaptx._scaling import adam_family as family
from adaptx._scaling import spam, update_rms


@reports(
    "scale_by_adam",
    *("spikes", "tensors_clipped", "max_update_rms", "momentum_scale"),
    per_tensor=("tensor_update_rms", "top_tensor"),
)
class ScaleByAdamState(NamedTuple):
    r"""State of :func:`scale_by_adam`.

    The four figures after ``nu`` are kept when a spike defense (SPAM's clip or
    reset, or update clipping) is on, and are ``None`` otherwise, so a plain Adam
    state holds only what ``optax.ScaleByAdamState`` holds and reports nothing to
    :func:`adaptx.telemetry`. ``spikes`` and ``tensors_clipped`` are counters: they
    mean what ``adaptx._core.telemetry.COUNTERS`` says, in every state that reports them.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      mu: first-moment estimate, one array per parameter, in ``mu_dtype`` (with
        ``pack_small_leaves``, a ``PackedTree``: see :func:`scale_by_adam`).
      nu: second-moment estimate, one array per parameter, in ``nu_dtype`` (likewise).
      spikes: gradient elements clipped by the spike rule at the last step (int32).
      tensors_clipped: tensors whose step update clipping scaled down at the last
        step (int32).
      max_update_rms: largest per-tensor :math:`\sqrt{\mathrm{mean}(g^2/\hat v)}` at
        the last step (float32; 0 when update clipping is off).
      momentum_scale: SPAM's post-reset warm-up factor applied at the last step
        (float32; 1 outside a warm-up).
      tensor_update_rms: with ``per_tensor`` (and update clipping), each leaf's update
        RMS ratio at the last step (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest ratio at the last step
        that clipped any (int32 index into ``tensor_update_rms``; -1 before any).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: optax.Updates
    nu: optax.Updates
    spikes: jax.Array | None = None
    tensors_clipped: jax.Array | None = None
    max_update_rms: jax.Array | None = None
    momentum_scale: jax.Array | None = None
    tensor_update_rms: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None


_NO_COMPLEX_FORM = (
    "SPAM's spike clip and momentum reset (spike_threshold, reset_interval) and "
    "StableAdamW's update clipping (update_rms_clip) have no complex form"
)


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
    nesterov: bool = False,
    spike_threshold: jax.typing.ArrayLike | None = None,
    reset_interval: int | None = None,
    reset_warmup: int = 150,
    spike_start: int = 20,
    update_rms_clip: jax.typing.ArrayLike | None = None,
    pack_small_leaves: int | None = None,
    per_tensor: bool = False,
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

    Same numbers as ``optax.scale_by_adam`` for the same settings, and its positional
    parameters (``b1, b2, eps, eps_root, mu_dtype``); the options after those are
    keyword-only. Complex parameters are handled as optax handles them: :math:`m` is
    complex and :math:`v` takes :math:`|g_t|^2`. The bias
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

    When any of these is on, the state (:class:`ScaleByAdamState`) also keeps the
    number of clipped elements, update-clipped tensors, the largest update RMS ratio
    and the warm-up factor for :func:`adaptx.telemetry`. None of them has a complex
    form (each compares :math:`g^2` with :math:`v` element by element or per tensor):
    with any of them on, a complex leaf raises ``TypeError``.

    **Many small leaves.** With ``pack_small_leaves`` :math:`k`, the moments of every
    leaf with at most :math:`k` elements live in one flat buffer per dtype (a
    ``PackedTree``); each step concatenates those leaves' gradients once, updates the
    moments in one fused pass, and cuts each leaf's update out with a static slice. The
    numbers are the same as without packing, and the state carries two buffers per dtype
    instead of two per leaf; the updates still come back as a tree shaped like the
    gradients. Which leaf sits where is static pytree data (the ``PackedTree``'s layout),
    so a tree map or a cast over the state cannot move a leaf. With ``update_rms_clip``,
    each packed tensor's RMS is reduced over its own slice of the flat buffers. Leaves
    larger than :math:`k` keep their own buffers, and so does a leaf whose *abstract*
    sharding (``jax.typeof(leaf).sharding``) splits it across devices, since
    concatenating it would gather it: on a mesh with explicit axes (``jax.make_mesh``'s
    default) that is the same inside and outside ``jit``, under ``jax.eval_shape`` and on
    a checkpoint's abstract target. Under automatic (``Auto``) axes nothing is known and
    the leaf counts as replicated: give such a model explicit axes, or leave it unpacked.
    Code that expects the moments shaped like the parameters (a checkpoint of an unpacked
    state, ``optax.tree_map_params``) sees a ``PackedTree``;
    ``state.mu.unpacked(params)`` gives the per-leaf view.

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
      per_tensor: with ``update_rms_clip``, also keep each tensor's update RMS ratio and
        the tensor that led the last update clip, for ``adaptx.telemetry(state,
        per_tensor=True)`` (the ratios update clipping computes anyway).

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
      >>> int(state.tensors_clipped), bool(jnp.all(jnp.abs(u) < 1))
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
    if spike_threshold is not None:
        validate.check_positive(fn, "spike_threshold", spike_threshold, example="5000.0")
    if update_rms_clip is not None:
        validate.check_positive(fn, "update_rms_clip", update_rms_clip, example="1.0")
    validate.check_int(
        fn, "reset_interval", reset_interval, low=1, allow_none=True, traced_ok=True, example="500"
    )
    validate.check_int(fn, "reset_warmup", reset_warmup, low=0, traced_ok=True, example="150")
    validate.check_int(fn, "spike_start", spike_start, low=0, traced_ok=True, example="20")
    if per_tensor and update_rms_clip is None:
        raise ValueError(
            f"{fn}: per_tensor=True keeps each tensor's update RMS, which only update "
            "clipping computes; pass update_rms_clip too (e.g. update_rms_clip=1.0), or "
            "per_tensor=False."
        )
    defended = any(x is not None for x in (spike_threshold, reset_interval, update_rms_clip))
    method = adam_method(
        fn,
        eps,
        eps_root,
        nesterov=nesterov,
        rule=_moment_rule(spike_threshold, reset_interval, reset_warmup, spike_start),
        reduction=None if update_rms_clip is None else update_rms.reduction(update_rms_clip, eps),
        changes_grad=spike_threshold is not None,
        no_complex=_NO_COMPLEX_FORM if defended else None,
    )

    def make_state(
        moments: engine.Moments, step: engine.Step | None, context: Any
    ) -> ScaleByAdamState:
        state = ScaleByAdamState(moments.count, moments.mu, moments.nu)
        if not defended:
            return state
        if step is None:  # context: the params
            return state._replace(  # distinct arrays: a fresh state may be donated
                spikes=jnp.zeros([], jnp.int32),
                tensors_clipped=jnp.zeros([], jnp.int32),
                max_update_rms=jnp.zeros([], jnp.float32),
                momentum_scale=jnp.ones([], jnp.float32),
                **per_tensor_lib.initial(context, per_tensor, "tensor_update_rms"),
            )
        warm = spam.schedule(moments.count, reset_interval, reset_warmup, spike_start)[2]
        figures = step.stats if per_tensor else None  # context: the previous state
        return state._replace(
            spikes=step.changed,
            tensors_clipped=step.exceeded,
            max_update_rms=step.max_stat,
            momentum_scale=warm,
            **per_tensor_lib.updated(context, figures, step.exceeded > 0, "tensor_update_rms"),
        )

    return family.transformation(
        method,
        b1,
        b2,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        pack_small_leaves=pack_small_leaves,
        make_state=make_state,
    )


class _Rule(NamedTuple):
    """A moment rule with its own scalars and step scale (Adam's, or SPAM's)."""

    moments: engine.MomentRule
    scalars: Callable[[jax.Array], Any]
    step_scale: Callable[[jax.Array], jax.Array] | None


_ADAM_RULE = _Rule(engine.ema_moments, engine.no_scalars, None)


def adam_method(
    fn: str,
    eps: jax.typing.ArrayLike,
    eps_root: jax.typing.ArrayLike,
    *,
    nesterov: bool = False,
    rule: _Rule = _ADAM_RULE,
    reduction: engine.Reduction | None = None,
    changes_grad: bool = False,
    no_complex: str | None = None,
) -> engine.Method:
    r"""Adam's step as an engine method.

    The step is :math:`\hat m / (\sqrt{\hat v + \epsilon_{root}} + \epsilon)`.
    """
    e, e_root = tu.as_scalar(eps, jnp.float32), tu.as_scalar(eps_root, jnp.float32)

    def direction(k: engine.Scalars, m_hat: jax.Array, v_hat: jax.Array) -> jax.Array:
        acc = m_hat.dtype
        return m_hat / (jnp.sqrt(v_hat + e_root.astype(acc)) + e.astype(acc))

    return engine.Method(
        name=fn,
        scalars=rule.scalars,
        moments=rule.moments,
        direction=direction,
        reduction=reduction,
        changes_grad=changes_grad,
        nesterov=nesterov,
        step_scale=rule.step_scale,
        no_complex=no_complex,
    )


def _moment_rule(
    spike_threshold: Any, reset_interval: int | None, reset_warmup: int, spike_start: int
) -> _Rule:
    """Adam's moment rule, or SPAM's when its clip or reset is on."""
    if spike_threshold is None and reset_interval is None:
        return _ADAM_RULE
    return _Rule(
        spam.moments(spike=spike_threshold is not None, reset=reset_interval is not None),
        spam.scalars(spike_threshold, reset_interval, reset_warmup, spike_start),
        None
        if reset_interval is None
        else spam.step_scale(reset_interval, reset_warmup, spike_start),
    )
