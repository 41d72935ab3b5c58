"""Clip the global norm only when it is an outlier of the run's own log-norm history."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._clipping.global_norm import clip_scale
from adaptx._clipping.scalar_clip import scalar_clip
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import robust_stats, validate
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports


@reports(
    "clip_spikes",
    *("grad_norm", "threshold", "typical", "scale", "z", "spike", "num_clipped"),
    per_tensor=("tensor_grad_norm", "top_tensor"),
)
class ClipSpikesState(NamedTuple):
    """State of :func:`clip_spikes`.

    ``spike`` and ``num_clipped`` are counters: they mean what
    ``adaptx._core.telemetry.COUNTERS`` says, in every state that reports them.

    Attributes:
      count: finite, nonzero norms recorded so far (int32, saturating).
      log_mean: running mean :math:`\\mu` of :math:`\\log\\|g\\|` (float32).
      log_var: running variance :math:`\\sigma^2` of :math:`\\log\\|g\\|` (float32).
      grad_norm: global norm of the incoming gradients at the last step (float32).
      threshold: the norm above which the last step counted as a spike,
        :math:`\\exp(b_t)` (``initial_max_norm`` at the first step, or 0 when there is
        none, as in the initial state; at most ``max_norm``). A spike is clipped to
        ``typical``.
      scale: factor the gradients were multiplied by at the last step, in [0, 1].
      z: z-score of the last step's log-norm, :math:`(\\log\\|g_t\\| - \\mu)/\\sigma`.
      spike: 1 if the last step's norm was an outlier, else 0 (int32).
      num_clipped: steps so far whose gradients were scaled down (int32, saturating).
      tensor_grad_norm: with ``per_tensor``, each leaf's norm at the last step
        (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last
        clipped step (int32 index into ``tensor_grad_norm``; -1 before any).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    log_mean: jax.Array
    log_var: jax.Array
    grad_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    z: jax.Array
    spike: jax.Array
    num_clipped: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None

    @property
    def typical(self) -> jax.Array:
        """The running geometric mean of the norm, :math:`\\exp(\\mu)` (0 before any norm)."""
        return jnp.where(jnp.greater(self.count, 0), jnp.exp(self.log_mean), 0.0)  # (nnx-safe)


def clip_spikes(
    z_thresh: jax.typing.ArrayLike = 6.0,
    min_ratio: jax.typing.ArrayLike = 4.0,
    alpha: jax.typing.ArrayLike = 0.95,
    *,
    max_ratio: jax.typing.ArrayLike = 10.0,
    initial_max_norm: jax.typing.ArrayLike | None = None,
    max_norm: jax.typing.ArrayLike | None = None,
    axis_name: Any = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips the global norm when, and only when, it is an outlier of its own history.

    Judged in log space against running statistics (:mod:`adaptx._core.robust_stats`)
    of the norms before it, with :math:`n_t = \|g_t\|`:

    .. math::

      b_t = \mu_{t-1} + \min\bigl(\max(z_{thr}\,\sigma_{t-1},\ \log r),\ \log R\bigr),
      \qquad
      g_t \leftarrow \begin{cases}
        \dfrac{e^{\mu_{t-1}}}{n_t}\, g_t & \log n_t > b_t \\[1ex]
        g_t & \text{otherwise,} \end{cases}

    where :math:`\mu, \sigma^2` are the running mean and variance of
    :math:`\log n` (the exact mean and variance of the first
    :math:`1/(1-\alpha)` norms, then an exponential moving average with weight
    :math:`\alpha` on the past). A norm is an outlier if it is both :math:`z_{thr}`
    standard deviations and :math:`r` times above its running geometric mean
    :math:`e^{\mu}`, the typical norm, and always if it is :math:`R` times above it; an
    outlier is clipped to the typical norm :math:`e^{\mu}`, whatever its size. The
    statistics record :math:`\min(\log n_t, b_t)`, and an outlier moves only the mean,
    never the variance (:mod:`adaptx._core.robust_stats`).

    Why this rule, and not ZClip's (from ``bench/stability``, on recorded healthy runs):

    * **Log space.** Gradient norms are positive and drift multiplicatively as a model
      learns (often several-fold over a run); their log is close to symmetric, and a
      :math:`z`-score of it is scale-free, so one threshold fits every model.
    * **A minimum ratio** :math:`r`. On a quiet stretch :math:`\sigma` becomes small and a
      pure z-score flags ordinary noise; :math:`r` keeps "outlier" meaning a jump of at
      least :math:`r\times`.
    * **Clip to the typical norm, not to the detection bound.** Where the log-norm is
      noisy, :math:`e^{b_t}` is many times the typical norm: clipping to it let only a
      third of the benchmark's :math:`100\times` spikes down to 10 times the median norm.
      (Clipping to :math:`r e^{\mu}` missed early spikes of the LM runs, whose first norms
      are 3 times their later median.)
    * **A maximum ratio** :math:`R`. On the unstable LM run (learning rate 1), a
      :math:`6\sigma` band let :math:`10^4\times` spikes through unclipped; a jump of
      :math:`R\times` is never benign for Adam's second moment.
    * **Winsorised statistics, variance held on outliers.** A spike leaves no aftershock
      and does not blind the rule (it moves :math:`\mu` by at most
      :math:`(1-\alpha)(b_t - \mu)` and leaves :math:`\sigma` alone), a NaN or inf is
      never recorded, and a lasting rise of the norm by a factor :math:`J` stops being
      clipped after at most :math:`\log(J/r) / ((1-\alpha)\log r)` steps (13 for a
      :math:`10\times` rise with the defaults).
    * **No unprotected warm-up.** Statistics exist from the second step; at the first,
      the norm is clipped to ``initial_max_norm`` when given (harmless for Adam, whose
      first step is invariant to the gradient's scale, and it keeps a first-step spike
      out of Adam's second moment).

    A non-finite norm is passed through unchanged (scale 1 for NaN, 0 for inf, as
    :func:`adaptx.clip_by_global_norm`); wrap the optimizer in :func:`adaptx.guard` to
    skip such steps, as :func:`adaptx.robust_adamw` does.

    Args:
      z_thresh: :math:`z_{thr} > 0`, in standard deviations of :math:`\log n`.
      min_ratio: :math:`r > 1`, the smallest jump over the typical norm that counts.
      max_ratio: :math:`R \ge r`, a jump over the typical norm that always counts.
      alpha: :math:`\alpha \in [0, 1)`, the weight on the past of the running statistics.
      initial_max_norm: ceiling on the norm at the first step, before statistics
        exist; ``None`` for none.
      max_norm: optional hard ceiling on the norm at every step.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are sharded over.
      per_tensor: also keep each leaf's gradient norm and the leaf that led the last
        clip, for ``adaptx.telemetry(state, per_tensor=True)`` (no extra pass over memory:
        the global norm is their sum).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ClipSpikesState`.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.clip_spikes()
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in [1.0, 1.2, 0.9, 1.1]:
      ...     _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([1e4, 0.0])}, state)
      >>> round(float(updates["w"][0]), 3)  # clipped to the typical norm
      1.044
      >>> int(adaptx.telemetry(state)["clip_spikes/spike"])
      1

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025 (a z-score of the gradient norm against
      its running statistics; here in log space, winsorised, with ratio bounds).

      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013 (clipping the global norm).
    """
    fn = "clip_spikes"
    validate.check_positive(fn, "z_thresh", z_thresh, example="6.0")
    validate.check_range(fn, "min_ratio", min_ratio, low=1.0, low_inclusive=False, example="4.0")
    validate.check_range(fn, "max_ratio", max_ratio, low=1.0, low_inclusive=False, example="10.0")
    validate.check_range(
        fn, "alpha", alpha, low=0.0, high=1.0, high_inclusive=False, example="0.95"
    )
    for name, value in (("initial_max_norm", initial_max_norm), ("max_norm", max_norm)):
        if value is not None:
            validate.check_positive(fn, name, value, example="1.0")

    def init_fn(params: optax.Params) -> ClipSpikesState:
        def scalar(value, dtype=jnp.float32):  # a buffer of its own: state may be donated
            return jnp.full([], value, dtype)

        return ClipSpikesState(
            count=scalar(0, jnp.int32),
            log_mean=scalar(0.0),
            log_var=scalar(0.0),
            grad_norm=scalar(0.0),
            threshold=scalar(0.0),
            scale=scalar(1.0),
            z=scalar(0.0),
            spike=scalar(0, jnp.int32),
            num_clipped=scalar(0, jnp.int32),
            **per_tensor_lib.initial(params, per_tensor),
        )

    def scale_fn(updates: optax.Updates, state: ClipSpikesState) -> tuple[jax.Array, Any]:
        tu.check_float_leaves(fn, updates)
        f32 = jnp.float32
        norm, leaf_norms = per_tensor_lib.global_norm(updates, axis_name, per_tensor)
        n = norm.astype(f32)
        log_n = jnp.log(jnp.where(n > 0, n, 1.0))
        j = robust_stats.judge(
            log_n,
            state.count,
            state.log_mean,
            state.log_var,
            z_thresh=z_thresh,
            min_gap=jnp.log(tu.as_scalar(min_ratio, f32)),
            max_gap=jnp.log(tu.as_scalar(max_ratio, f32)),
        )
        first = state.count == 0
        ceiling = jnp.inf if initial_max_norm is None else tu.as_scalar(initial_max_norm, f32)
        typical = jnp.exp(state.log_mean)
        clip_to = jnp.where(first, ceiling, jnp.where(j.outlier, typical, jnp.inf))
        if max_norm is not None:
            clip_to = jnp.minimum(clip_to, tu.as_scalar(max_norm, f32))
        s = clip_scale(n, clip_to)
        fed = jnp.where(first, jnp.minimum(log_n, jnp.log(ceiling)), j.fed)
        count, mean, var = robust_stats.record(
            state.count,
            state.log_mean,
            state.log_var,
            fed,
            alpha=alpha,
            when=n > 0,
            outlier=j.outlier,
        )
        threshold = jnp.where(first, ceiling, jnp.exp(j.bound))
        if max_norm is not None:
            threshold = jnp.minimum(threshold, tu.as_scalar(max_norm, f32))
        threshold = jnp.where(jnp.isfinite(threshold), threshold, 0.0)  # the state stays finite
        new_state = ClipSpikesState(
            count=count,
            log_mean=mean,
            log_var=var,
            grad_norm=n,
            threshold=threshold,
            scale=s,
            z=j.z,
            spike=j.outlier.astype(jnp.int32),
            num_clipped=tu.count_if(s < 1, state.num_clipped),
            **per_tensor_lib.updated(state, leaf_norms, s < 1),
        )
        return s.astype(norm.dtype), new_state

    return scalar_clip(init_fn, scale_fn)
