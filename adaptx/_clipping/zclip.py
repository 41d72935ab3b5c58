"""ZClip: z-score spike detection on the gradient norm, with an adaptive threshold."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._clipping.global_norm import clip_scale
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import running_stats, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports

# Added to the standard deviation in the z-score, as in the reference code.
_EPS = 1e-6

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


@reports(
    "zclip",
    "grad_norm",
    "threshold",
    "scale",
    "mean",
    "std",
    "z",
    "spike",
    "num_clipped",
    "num_skipped",
    per_tensor=("tensor_grad_norm", "top_tensor"),
)
class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    ``spike``, ``num_clipped`` and ``num_skipped`` are counters: they mean what
    ``adaptx._core.telemetry.COUNTERS`` says, in every state that reports them.

    Attributes:
      count: number of finite, nonzero gradient norms seen so far (int32,
        saturating). The first ``warmup_steps`` of them are the warm-up.
      mean: EMA mean :math:`\\mu` of the gradient norm (float32). During warm-up,
        the plain mean of the norms seen so far.
      var: EMA variance :math:`\\sigma^2` of the gradient norm (float32). During
        warm-up, the population variance of the norms seen so far.
      grad_norm: global L2 norm of the incoming gradients at the last step, before
        clipping (float32).
      threshold: the norm above which the last step would count as a spike, from
        the statistics it was judged by: :math:`\\mu + z_{thr}(\\sigma + \\epsilon)`
        in ``"zscore"`` mode, :math:`\\mu + z_{thr}\\sigma` in ``"percentile"`` mode
        (float32). Informative only during warm-up, when nothing is judged.
      scale: factor the gradients were multiplied by at the last step, in [0, 1]
        (0 on a skipped step).
      z: z-score :math:`(\\|g\\| - \\mu) / (\\sigma + \\epsilon)` of the last step
        (float32; 0 during warm-up).
      spike: 1 if the last step was detected as a spike, else 0 (int32).
      num_clipped: number of steps so far whose gradients were scaled down, by the
        adaptive threshold or by ``max_norm`` (int32, saturating).
      num_skipped: number of steps so far zeroed by ``zero_on_spike`` (int32,
        saturating).
      tensor_grad_norm: with ``per_tensor``, each leaf's gradient norm at the last
        step (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last
        intervention (int32 index into ``tensor_grad_norm``; -1 before any).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mean: jax.Array
    var: jax.Array
    grad_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    z: jax.Array
    spike: jax.Array
    num_clipped: jax.Array
    num_skipped: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None

    @property
    def std(self) -> jax.Array:
        """EMA standard deviation :math:`\\sigma = \\sqrt{\\sigma^2}` of the gradient norm."""
        return jnp.sqrt(self.var)


def zclip(
    alpha: jax.typing.ArrayLike = 0.97,
    z_thresh: jax.typing.ArrayLike = 2.5,
    warmup_steps: int = 25,
    *,
    max_norm: jax.typing.ArrayLike | None = None,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: jax.typing.ArrayLike = 1.0,
    skip_update_on_spike: bool = False,
    zero_on_spike: bool = False,
    axis_name: Any = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clips the global norm when it is a statistical outlier of its recent history.

    ZClip tracks an exponential moving average of the mean :math:`\mu` and
    variance :math:`\sigma^2` of the global gradient norm :math:`n_t = \|g_t\|`,
    and treats a norm far above the mean as a spike.

    **Warm-up.** The first ``warmup_steps`` norms only feed the statistics:
    :math:`\mu` and :math:`\sigma^2` start as the population mean and variance
    (divided by :math:`N`, not :math:`N-1`) of those norms. Warm-up steps are not
    clipped adaptively; they are clipped to ``max_norm`` when it is given.

    **After warm-up**, in the default ``mode="zscore"``, with :math:`\epsilon = 10^{-6}`:

    .. math::

      z_t = \frac{n_t - \mu}{\sigma + \epsilon}, \qquad
      \text{spike} \iff z_t > z_{thr}, \qquad
      c_t = \begin{cases}
        f \left(\mu + \dfrac{z_{thr}\,\sigma}{z_t / z_{thr}}\right)
          & \text{``adaptive\_scaling''} \\[1ex]
        \mu & \text{``mean''}
      \end{cases}

    ``adaptive_scaling`` clips a larger outlier to a *lower* threshold, between
    :math:`\mu` and :math:`\mu + z_{thr}\sigma`; :math:`f` is ``clip_factor``,
    which multiplies the whole threshold, as in the reference code (its docstring
    says only the :math:`z_{thr}\sigma` term; values below 1 clip more
    aggressively). In ``mode="percentile"`` a spike is
    :math:`n_t > \mu + z_{thr}\sigma` and :math:`c_t = \mu + z_{thr}\sigma`
    (``clip_option`` and ``clip_factor`` are not used). On a spike the gradients
    are scaled to norm :math:`c_t`; otherwise they pass unchanged. ``max_norm``,
    when given, is a hard ceiling on top: the bound is :math:`\min(c_t, M)` on a
    spike and :math:`M` otherwise. The statistics are then fed the *clipped* norm
    (:math:`c_t` on a spike, :math:`n_t` otherwise; ``max_norm`` does not enter):

    .. math::

      \hat n_t = \begin{cases} c_t & \text{spike} \\ n_t & \text{otherwise} \end{cases},
      \qquad \mu \leftarrow \alpha\mu + (1-\alpha)\hat n_t, \qquad
      \sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(\hat n_t - \mu)^2 ,

    the variance update using the *new* mean, exactly as the reference code does.
    When every warm-up norm is equal, :math:`\sigma = 0` and any norm more than
    :math:`z_{thr}\epsilon` above the mean is a spike, clipped to :math:`f\mu`
    (``adaptive_scaling``) or :math:`\mu` (``mean``).

    ``skip_update_on_spike=True`` is the reference code's option of that name: a spike
    is still clipped, but the statistics are left alone at that step (the spike does
    not enter :math:`\mu, \sigma^2` at all, not even clipped).

    Where this implementation adds to the reference code:

    * ``zero_on_spike=True`` returns zero updates on a spike instead of clipping
      (``scale`` 0, ``num_skipped`` counts them). The statistics are updated
      exactly as when clipping, so a lasting rise in the norm is still absorbed
      and a run cannot skip forever. (It is adaptx's own option, not the reference
      code's ``skip_update_on_spike`` above.)
    * A non-finite norm leaves the statistics and ``count`` untouched (in the
      reference code one NaN would turn the mean into NaN for good) and does not
      count towards the warm-up. An ``inf`` norm after warm-up is a spike: scale 0,
      or zero updates with ``zero_on_spike``; NaN gradients pass through. Wrap the
      optimizer in :func:`adaptx.guard` to skip such steps.
    * So does a zero norm (an all-zero gradient: nothing to clip, passed through).
      Recorded, a warm-up of zero gradients (frozen layers, a masked-out loss)
      would give :math:`\mu = \sigma = 0`, and every later gradient would be a
      spike clipped to zero, for good.
    * The scale is exactly :math:`\min(1, c / n_t)`; the reference code divides by
      :math:`n_t + 10^{-6}`. Statistics are kept in float32.

    The reference code defaults ``max_grad_norm`` to 1.0; here ``max_norm``
    defaults to ``None`` (no hard ceiling), so that ZClip's own threshold is the
    only clipping unless asked for. Pass ``max_norm=1.0`` for the reference setup.

    Args:
      alpha: EMA smoothing factor :math:`\alpha \in [0, 1]` for :math:`\mu` and
        :math:`\sigma^2` (larger is smoother). May be a tracer.
      z_thresh: :math:`z_{thr} > 0`, the z-score above which a norm is a spike (in
        ``"percentile"`` mode, the number of standard deviations above the mean
        to clip to). May be a tracer.
      warmup_steps: number :math:`N \ge 1` of steps whose norms initialise the
        statistics. May be a tracer.
      max_norm: optional hard ceiling :math:`M \ge 0` on the global norm, applied
        at every step including warm-up. May be a tracer.
      mode: ``"zscore"`` (clip only spikes, to :math:`c_t`) or ``"percentile"``
        (clip any norm above :math:`\mu + z_{thr}\sigma` to that value).
      clip_option: in ``"zscore"`` mode, what a spike is clipped to:
        ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: :math:`f > 0`, multiplier of the ``adaptive_scaling``
        threshold. May be a tracer.
      skip_update_on_spike: as the reference code: on a spike, clip but leave the
        statistics unchanged.
      zero_on_spike: return zero updates on a spike instead of clipping (the
        statistics are updated as when clipping).
      axis_name: under ``shard_map``/``pmap``, the mapped axis (or axes) the
        gradient tree is sharded over; the squared norm is summed across it, so
        every shard keeps the same statistics of the true global norm.
      per_tensor: also keep each leaf's gradient norm and the leaf that led the last
        intervention, for ``adaptx.telemetry(state, per_tensor=True)`` (no extra pass
        over memory: the global norm is their sum).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ZClipState`; :func:`adaptx.telemetry` reports ``grad_norm``,
      ``threshold``, ``scale``, ``mean``, ``std``, ``z``, ``spike``,
      ``num_clipped`` and ``num_skipped``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.zclip(warmup_steps=4)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in [0.9, 1.1, 0.9, 1.1]:  # warm-up: mean 1, std 0.1
      ...     _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([4.0, 0.0])}, state)  # z = 30
      >>> updates["w"]  # clipped to 1 + 2.5 * 0.1 / (30 / 2.5)
      Array([1.0208..., 0. ], dtype=float32)
      >>> figures = adaptx.telemetry(state)
      >>> int(figures["zclip/spike"]), int(figures["zclip/num_clipped"])
      (1, 1)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    fn = "zclip"
    _check_args(
        fn,
        alpha,
        z_thresh,
        warmup_steps,
        max_norm,
        mode,
        clip_option,
        clip_factor,
        skip_update_on_spike,
        zero_on_spike,
    )

    def init_fn(params: optax.Params) -> ZClipState:
        return ZClipState(
            count=jnp.zeros([], jnp.int32),
            mean=jnp.zeros([], jnp.float32),
            var=jnp.zeros([], jnp.float32),
            grad_norm=jnp.zeros([], jnp.float32),
            threshold=jnp.zeros([], jnp.float32),
            scale=jnp.ones([], jnp.float32),
            z=jnp.zeros([], jnp.float32),
            spike=jnp.zeros([], jnp.int32),
            num_clipped=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            **per_tensor_lib.initial(params, per_tensor),
        )

    def update_fn(
        updates: optax.Updates,
        state: ZClipState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ZClipState]:
        del params
        tu.check_float_leaves(fn, updates)
        f32 = jnp.float32
        a = tu.as_scalar(alpha, f32)
        zt = tu.as_scalar(z_thresh, f32)
        cf = tu.as_scalar(clip_factor, f32)
        n_warm = jnp.asarray(warmup_steps).astype(jnp.int32)

        norm, leaf_norms = per_tensor_lib.global_norm(updates, axis_name, per_tensor)
        n = norm.astype(f32)
        finite = jnp.isfinite(n)
        warm = state.count < n_warm
        mean, var = state.mean, state.var
        std = jnp.sqrt(var)

        z, detect, is_spike, clip_to = _detect(mode, clip_option, n, mean, std, zt, cf)
        spike = ~warm & is_spike

        # One scalar scale: the adaptive bound on a spike, the hard ceiling always.
        s = jnp.where(spike, clip_scale(norm, clip_to), jnp.ones_like(norm))
        if max_norm is not None:
            s = jnp.minimum(s, clip_scale(norm, max_norm))
        if zero_on_spike:
            skipped = spike
            s = jnp.where(skipped, jnp.zeros_like(s), s)
        else:
            skipped = jnp.zeros([], bool)

        # Statistics: running population moments during warm-up, then the EMA of
        # the clipped norm. Non-finite and zero norms are not recorded.
        fed = jnp.where(spike, clip_to, n)
        keep = ~spike if skip_update_on_spike else jnp.ones([], bool)
        count, new_mean, new_var = running_stats.record(
            state.count, mean, var, fed, alpha=a, warmup=n_warm, when=finite & (n > 0) & keep
        )

        clipped = ~skipped & (s < 1)
        new_state = ZClipState(
            count=count.astype(state.count.dtype),
            mean=new_mean.astype(state.mean.dtype),
            var=new_var.astype(state.var.dtype),
            grad_norm=n.astype(state.grad_norm.dtype),
            threshold=detect.astype(state.threshold.dtype),
            scale=s.astype(state.scale.dtype),
            z=jnp.where(warm, jnp.zeros_like(z), z).astype(state.z.dtype),
            spike=spike.astype(state.spike.dtype),
            num_clipped=tu.count_if(clipped, state.num_clipped),
            num_skipped=tu.count_if(skipped, state.num_skipped),
            **per_tensor_lib.updated(state, leaf_norms, spike | (s < 1)),
        )
        out = tu.scale(updates, s)
        if zero_on_spike:
            # Exact zeros even for inf gradients (inf * 0 would be NaN).
            out = jax.tree.map(lambda x: jnp.where(skipped, jnp.zeros_like(x), x), out)
        return out, new_state

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def _detect(
    mode: str,
    clip_option: str,
    n: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    zt: jax.Array,
    cf: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Spike detection against the current statistics: ``(z, threshold, is_spike, clip_to)``."""
    z = (n - mean) / (std + _EPS)
    if mode == "percentile":
        detect = mean + zt * std
        return z, detect, n > detect, detect
    detect = mean + zt * (std + _EPS)
    is_spike = z > zt
    if clip_option == "adaptive_scaling":
        # z_thr * std / (z / z_thr); z > z_thr > 0 wherever it is used.
        eta = jnp.where(is_spike, z / zt, jnp.ones_like(z))
        return z, detect, is_spike, (mean + zt * std / eta) * cf
    return z, detect, is_spike, mean


def _check_args(
    fn: str,
    alpha: Any,
    z_thresh: Any,
    warmup_steps: Any,
    max_norm: Any,
    mode: str,
    clip_option: str,
    clip_factor: Any,
    skip_update_on_spike: Any,
    zero_on_spike: Any,
) -> None:
    validate.check_range(fn, "alpha", alpha, low=0.0, high=1.0, example="0.97")
    validate.check_positive(fn, "z_thresh", z_thresh, example="2.5")
    validate.check_int(fn, "warmup_steps", warmup_steps, low=1, traced_ok=True, example="25")
    if max_norm is not None:
        validate.check_nonnegative(fn, "max_norm", max_norm, example="1.0")
    validate.check_choice(fn, "mode", mode, _MODES)
    validate.check_choice(fn, "clip_option", clip_option, _CLIP_OPTIONS)
    validate.check_positive(fn, "clip_factor", clip_factor, example="1.0")
    for name, flag in (
        ("skip_update_on_spike", skip_update_on_spike),
        ("zero_on_spike", zero_on_spike),
    ):
        if not isinstance(flag, bool):
            raise ValueError(
                f"{fn}: `{name}` must be a bool, got {name}={flag!r}. Pass e.g. {name}=True."
            )
