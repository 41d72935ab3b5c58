"""Skip a step whose gradients are non-finite or a statistical spike."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import running_stats, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports

OK, NONFINITE, SPIKE = 0, 1, 2


@reports(
    "guard",
    "grad_norm",
    "skipped",
    "consecutive",
    "last_reason",
    "forced",
    "norm_mean",
    "norm_var",
)
class GuardState(NamedTuple):
    """State of :func:`guard`.

    Attributes:
      inner_state: the wrapped transformation's state (untouched by skipped steps).
      count: norms recorded in the spike statistics (int32).
      grad_norm: global norm of the incoming gradients at the last step (float32).
      skipped: steps skipped so far (int32, saturating).
      consecutive: steps skipped in a row up to the last one (int32).
      last_reason: why the last step was skipped: 0 not skipped, 1 non-finite,
        2 spike (int32).
      forced: spikes let through because ``max_consecutive_skips`` was reached (int32).
      norm_mean: running mean of accepted gradient norms (float32).
      norm_var: running variance of accepted gradient norms (float32).
    """

    inner_state: optax.OptState
    count: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array
    consecutive: jax.Array
    last_reason: jax.Array
    forced: jax.Array
    norm_mean: jax.Array
    norm_var: jax.Array


def guard(
    inner: optax.GradientTransformation,
    *,
    skip_nonfinite: bool = True,
    spike_z: float | jax.Array | None = None,
    max_consecutive_skips: int | None = None,
    spike_alpha: float | jax.Array = 0.97,
    spike_warmup: int = 25,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a transformation so that bad steps are skipped, not applied.

    A step is skipped when its gradients contain a NaN or an infinity (the global
    norm :math:`\|g_t\|` is not finite), or, with ``spike_z``, when the norm is a
    statistical spike:

    .. math::

      z_t = \frac{\|g_t\| - \mu_{t-1}}{\sigma_{t-1} + 10^{-6}} > z_{\max},

    where :math:`\mu, \sigma^2` are the population mean and variance of the first
    ``spike_warmup`` accepted norms, then an exponential moving average
    (:math:`\mu_t = \alpha\mu_{t-1} + (1-\alpha)\|g_t\|`,
    :math:`\sigma_t^2 = \alpha\sigma_{t-1}^2 + (1-\alpha)(\|g_t\| - \mu_t)^2`) of
    accepted norms. No spike is declared during the warm-up. A zero norm (an
    all-zero gradient) is applied but not recorded: a warm-up of zeros would give
    :math:`\mu = \sigma = 0`, and every later gradient would be skipped as a spike.

    A skipped step returns zero updates and leaves the inner state bit-identical
    (no moment decay, no count increment), so parameters are untouched by
    ``optax.apply_updates``. Counters and the reason are kept in the state for
    :func:`adaptx.telemetry`. Everything is decided on device with ``jnp.where``:
    no host sync, no recompilation. adaptx transforms inside the guard (Adam's
    moments) receive the decision and select their own state within their fused
    update, which keeps XLA's in-place update of that state (selecting around the
    finished update would copy it first); the guard selects every other leaf.

    After ``max_consecutive_skips`` skipped steps in a row, the next spike is let
    through and recorded in the statistics, so a lasting change in the gradient
    scale cannot stall a run forever. Non-finite steps are always skipped:
    applying them would turn every parameter into NaN.

    Args:
      inner: the transformation to protect (typically a whole ``optax.chain``).
      skip_nonfinite: skip steps whose gradients are not all finite.
      spike_z: :math:`z_{\max} > 0`; ``None`` disables spike skipping.
      max_consecutive_skips: after this many spike skips in a row, accept the
        next spike; ``None`` never forces a step through.
      spike_alpha: :math:`\alpha \in [0, 1)`, the EMA weight on the past.
      spike_warmup: accepted norms used for the initial statistics (>= 1).
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are sharded
        over; the norm is reduced across it so every shard makes the same decision.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`GuardState`.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.guard(optax.adam(1e-2))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([1., 1.], dtype=float32)
      >>> {k: int(v) for k, v in adaptx.telemetry(state).items() if k != "guard/grad_norm"}
      {'guard/skipped': 1, 'guard/consecutive': 1, 'guard/last_reason': 1, 'guard/forced': 0,
       'guard/norm_mean': 0, 'guard/norm_var': 0}

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping non-finite steps).

      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025 (z-score spike detection on the norm).
    """
    fn = "guard"
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(
            f"{fn}: `inner` must be an optax GradientTransformation, got inner={inner!r}. "
            "Pass e.g. inner=adaptx.adamw(1e-3)."
        )
    if spike_z is not None:
        validate.check_positive(fn, "spike_z", spike_z, example="6.0")
    validate.check_int(
        fn,
        "max_consecutive_skips",
        max_consecutive_skips,
        low=1,
        allow_none=True,
        traced_ok=True,
        example="10",
    )
    validate.check_range(
        fn, "spike_alpha", spike_alpha, low=0.0, high=1.0, high_inclusive=False, example="0.97"
    )
    validate.check_int(fn, "spike_warmup", spike_warmup, low=1, traced_ok=True, example="25")
    if not skip_nonfinite and spike_z is None:
        raise ValueError(
            f"{fn}: nothing to guard against: skip_nonfinite=False and spike_z=None. "
            "Pass e.g. skip_nonfinite=True."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return GuardState(
            inner_state=inner.init(params),
            count=jnp.zeros([], jnp.int32),
            grad_norm=jnp.zeros([], jnp.float32),
            skipped=jnp.zeros([], jnp.int32),
            consecutive=jnp.zeros([], jnp.int32),
            last_reason=jnp.zeros([], jnp.int32),
            forced=jnp.zeros([], jnp.int32),
            norm_mean=jnp.zeros([], jnp.float32),
            norm_var=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        tu.check_float_leaves(fn, updates)
        norm = tu.global_norm(updates, axis_name).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        nonfinite = ~finite if skip_nonfinite else jnp.zeros([], bool)
        if spike_z is not None:
            z = running_stats.zscore(norm, state.norm_mean, state.norm_var)
            warmed = state.count >= jnp.asarray(spike_warmup).astype(jnp.int32)
            spike = finite & warmed & (z > tu.as_scalar(spike_z, jnp.float32))
        else:
            spike = jnp.zeros([], bool)
        if max_consecutive_skips is not None:
            limit = jnp.asarray(max_consecutive_skips).astype(jnp.int32)
            forced = spike & (state.consecutive >= limit)
        else:
            forced = jnp.zeros([], bool)
        skip = nonfinite | (spike & ~forced)

        # adaptx transforms inside select their own full-size state in their fused
        # update (see adaptx._core.skip); every other leaf is selected here. Select,
        # never multiply: 0 * NaN is NaN. Inside another guard, the inner state is
        # also kept when the outer one skips, so that one need not select it again.
        outer = skip_lib.from_extra_args(extra_args)
        signal = skip_lib.SkipSignal(skip if outer is None else skip | outer.flag)
        extra_args = {**extra_args, skip_lib.KEY: signal}
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        inner_state = jax.tree.map(
            lambda new, old: signal.select(old, new), new_inner, state.inner_state
        )
        if outer is not None:
            jax.tree.map(outer.keep, state.inner_state, inner_state)
        out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)

        count, mean, var = running_stats.record(
            state.count,
            state.norm_mean,
            state.norm_var,
            norm,
            alpha=spike_alpha,
            warmup=spike_warmup,
            when=finite & (norm > 0) & ~(spike & ~forced),
        )
        reason = jnp.where(nonfinite, NONFINITE, jnp.where(skip, SPIKE, OK)).astype(jnp.int32)
        return out, GuardState(
            inner_state=inner_state,
            count=count,
            grad_norm=norm,
            skipped=tu.count_if(skip, state.skipped),
            consecutive=jnp.where(skip, tu.safe_increment(state.consecutive), 0).astype(jnp.int32),
            last_reason=reason,
            forced=tu.count_if(forced, state.forced),
            norm_mean=mean,
            norm_var=var,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
