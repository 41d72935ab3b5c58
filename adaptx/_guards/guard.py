"""Skip a step whose gradients or loss are non-finite or a statistical spike."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import loss_value, robust_stats, running_stats, validate
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports

#: Values of :attr:`GuardState.last_reason`.
OK, NONFINITE, SPIKE, NONFINITE_LOSS, LOSS_SPIKE, GRAD_NORM_LIMIT, LOSS_LIMIT = range(7)


@reports(
    "guard",
    "grad_norm",
    "skipped",
    "consecutive",
    "last_reason",
    "forced",
    "norm_mean",
    "norm_var",
    "loss",
    "loss_mean",
    "loss_std",
    "loss_z",
    "steps",
    "consecutive_nonfinite",
    "diverged",
    per_tensor=("tensor_grad_norm", "top_tensor"),
)
class GuardState(NamedTuple):
    """State of :func:`guard`.

    ``skipped``, ``consecutive``, ``forced``, ``steps``, ``consecutive_nonfinite`` and
    ``diverged`` are counters: they mean what ``adaptx._core.telemetry.COUNTERS`` says, in
    every state that reports them.

    Attributes:
      inner_state: the wrapped transformation's state (untouched by skipped steps).
      count: norms recorded in the spike statistics (int32).
      grad_norm: global norm of the incoming gradients at the last step (float32).
      skipped: steps skipped so far (int32, saturating).
      consecutive: steps skipped in a row up to the last one (int32).
      last_reason: why the last step was skipped (int32): 0 not skipped, 1 non-finite
        gradients, 2 gradient-norm spike, 3 non-finite loss, 4 loss spike, 5 gradient
        norm above ``max_grad_norm``, 6 loss above ``max_loss``.
      forced: spikes let through because ``max_consecutive_skips`` was reached (int32).
      norm_mean: running mean of accepted gradient norms (float32).
      norm_var: running variance of accepted gradient norms (float32).
      loss: the loss passed as ``value`` at the last step (float32; 0 without one).
      loss_count: finite losses recorded in the loss statistics (int32).
      loss_mean: running mean of the loss (float32), NaN-proof and winsorised.
      loss_var: running variance of the loss (float32).
      loss_z: z-score of the last step's loss against the statistics before it.
      steps: steps seen by the guard, skipped or not (int32, saturating).
      consecutive_nonfinite: steps in a row, up to the last one, whose gradients or loss
        were not finite (int32).
      diverged: 1 once ``max_consecutive_nonfinite`` non-finite steps came in a row, and
        from then on (int32; always 0 without ``max_consecutive_nonfinite``).
        :func:`adaptx.check` raises on it.
      tensor_grad_norm: with ``per_tensor``, each leaf's gradient norm at the last
        step (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last
        skipped step (int32 index into ``tensor_grad_norm``; -1 before any). On a
        non-finite step, the first non-finite leaf.
    """

    inner_state: optax.OptState
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    grad_norm: jax.Array
    skipped: jax.Array
    consecutive: jax.Array
    last_reason: jax.Array
    forced: jax.Array
    norm_mean: jax.Array
    norm_var: jax.Array
    loss: jax.Array
    loss_count: jax.Array
    loss_mean: jax.Array
    loss_var: jax.Array
    loss_z: jax.Array
    steps: jax.Array
    consecutive_nonfinite: jax.Array
    diverged: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None

    @property
    def loss_std(self) -> jax.Array:
        """Running standard deviation of the loss."""
        return jnp.sqrt(self.loss_var)


class _LossVerdict(NamedTuple):
    """What the guard concluded from the loss passed as ``value`` (see :func:`_judge_loss`)."""

    nonfinite: jax.Array
    spike: jax.Array
    loss: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mean: jax.Array
    var: jax.Array
    z: jax.Array


def _judge_loss(
    loss: jax.Array | None, state: GuardState, loss_z: Any, alpha: Any, at_limit: jax.Array
) -> _LossVerdict:
    """Non-finite and (with ``loss_z``) spike verdicts on the loss, and its new statistics.

    A spike is recorded winsorised (see :mod:`adaptx._core.robust_stats`), unless the guard
    is at ``max_consecutive_skips`` (``at_limit``) and lets it through: then the loss is
    recorded as it is, mean and variance, so the statistics move to the new level (kept
    winsorised, a lasting rise would be skipped again at all steps but one in
    ``max_consecutive_skips + 1``).
    """
    no = jnp.zeros([], bool)
    if loss is None:
        zero = jnp.zeros([], jnp.float32)
        return _LossVerdict(no, no, zero, state.loss_count, state.loss_mean, state.loss_var, zero)
    j = robust_stats.judge(
        loss,
        state.loss_count,
        state.loss_mean,
        state.loss_var,
        z_thresh=jnp.inf if loss_z is None else loss_z,
        min_gap=0.0,
    )
    spike = j.outlier if loss_z is not None else no
    rebase = spike & at_limit
    count, mean, var = robust_stats.record(
        state.loss_count,
        state.loss_mean,
        state.loss_var,
        jnp.where(rebase, loss, j.fed),
        alpha=alpha,
        when=True,
        outlier=j.outlier & ~rebase,
    )
    return _LossVerdict(~jnp.isfinite(loss), spike, loss, count, mean, var, j.z)


def guard(
    inner: optax.GradientTransformation,
    *,
    skip_nonfinite: bool = True,
    spike_z: jax.typing.ArrayLike | None = None,
    max_consecutive_skips: int | None = None,
    spike_alpha: jax.typing.ArrayLike = 0.97,
    spike_warmup: int = 25,
    loss_z: jax.typing.ArrayLike | None = None,
    loss_alpha: jax.typing.ArrayLike = 0.98,
    max_grad_norm: jax.typing.ArrayLike | None = None,
    max_loss: jax.typing.ArrayLike | None = None,
    max_consecutive_nonfinite: int | None = None,
    axis_name: Any = None,
    per_tensor: bool = False,
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

    **Fixed thresholds.** With ``max_grad_norm``, a step whose global gradient norm is
    above it is skipped (reason 5); with ``max_loss``, a step whose loss is above it
    (reason 6): the fixed limits of Megatron-LM's and axlearn's skip rules, for a run
    whose healthy scale is known.

    **The loss.** Pass the step's loss in the optax extra-args convention,
    ``tx.update(grads, state, params, value=loss)`` (as
    ``optax.contrib.reduce_on_plateau`` takes it; with ``flax.nnx``,
    ``optimizer.update(model, grads, value=loss)``), or as ``loss=loss`` (levanter's
    name); passing both with different values is an error. A non-finite loss is then skipped
    like a non-finite gradient. With ``loss_z``, a loss more than ``loss_z`` standard
    deviations above its running mean is skipped too; the statistics are NaN-proof and
    winsorised (a non-finite loss is never recorded, a spike is recorded as the bound),
    so one bad step cannot blind or sensitise the rule (see
    :mod:`adaptx._core.robust_stats`). Without ``value`` everything else works the same;
    ``loss_z`` without ``value`` is an error, so that the check cannot be lost silently.
    Give ``loss_z`` a ``max_consecutive_skips``: a skipped step cannot lower the loss, so
    once the loss has risen for good (a run already diverging), every later step is a
    loss spike and the run freezes where it is. On the example's LM at learning rate 1,
    ``robust_adamw(loss_z=6)`` without it ended at a held-out loss of 124-212 (3 seeds)
    against 2.8-3.0 without ``loss_z``. A spike let through at the limit is recorded as it
    is, so the loss statistics move to the new level.

    A skipped step returns zero updates and leaves the inner state bit-identical
    (no moment decay, no count increment), so parameters are untouched by
    ``optax.apply_updates``. Counters and the reason are kept in the state for
    :func:`adaptx.telemetry`. Everything is decided on device with ``jnp.where``:
    no host sync, no recompilation. adaptx transforms inside the guard (Adam's
    moments) receive the decision and select their own state within their fused
    update, which keeps XLA's in-place update of that state (selecting around the
    finished update would copy it first); the guard selects every other leaf.

    After ``max_consecutive_skips`` skipped steps in a row, the next spike (of the
    norm or of the loss) is let through and recorded in the statistics, so a lasting
    change in scale cannot stall a run forever. Non-finite steps are always skipped:
    applying them would turn every parameter into NaN.

    **A run that cannot recover.** A run whose every step is non-finite learns nothing,
    silently. With ``max_consecutive_nonfinite`` :math:`n`, after :math:`n` non-finite
    steps in a row the guard sets ``diverged`` in its state (a telemetry figure, for
    good); :func:`adaptx.check` on the fetched figures then raises
    :class:`adaptx.DivergedError`, at the user's logging step, with no host sync of its
    own.

    **What a guard protects, and what it does not.** It protects the parameters (zero
    updates) and the optimizer's state. It cannot undo what the forward pass already
    changed: BatchNorm's running statistics, or any other model state that the step
    updates outside the optimizer, take in a NaN batch before the guard sees the
    gradients. Restore those yourself on a skipped step (``GuardState.last_reason != 0``;
    with Flax NNX, :func:`adaptx.restore_on_skip`).

    **Inside other transforms.** The decision travels to the inner transform as the
    extra argument ``adaptx_skip`` (a boolean scalar array), so it crosses ``jit``,
    ``scan``, ``vmap`` and wrappers that forward extra arguments. adaptx transforms
    (and :func:`adaptx.chain`) keep their own state on a skipped step inside their own
    pass; for any other inner transform the guard selects every leaf of its state with
    ``where``, which is always correct but on XLA:CPU copies Adam's moments (selecting
    with ``lax.cond`` instead costs more still: ``bench/measured/skip_select.md``).

    Args:
      inner: the transformation to protect (typically a whole ``optax.chain``).
      skip_nonfinite: skip steps whose gradients (or loss) are not all finite.
      spike_z: :math:`z_{\max} > 0`; ``None`` disables spike skipping.
      max_consecutive_skips: after this many spike skips in a row, accept the
        next spike; ``None`` never forces a step through.
      spike_alpha: :math:`\alpha \in [0, 1)`, the EMA weight on the past.
      spike_warmup: accepted norms used for the initial statistics (>= 1).
      loss_z: skip a step whose loss has a z-score above this (> 0); ``None`` disables
        it. Needs ``value=loss`` at every update.
      loss_alpha: weight on the past of the loss statistics, in [0, 1).
      max_grad_norm: skip a step whose global gradient norm is above this (> 0);
        ``None`` disables it.
      max_loss: skip a step whose loss is above this; ``None`` disables it. Needs the
        loss at every update.
      max_consecutive_nonfinite: after this many non-finite steps in a row (>= 1), mark
        the run as diverged; ``None`` never does.
      axis_name: under ``shard_map``/``pmap``, the axis the gradients are sharded
        over; the norm is reduced across it (and the loss averaged over it) so every
        shard makes the same decision.
      per_tensor: also keep each leaf's gradient norm and the leaf that led the last
        skip, for ``adaptx.telemetry(state, per_tensor=True)`` (no extra pass over
        memory: the global norm is their sum).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`GuardState`; it honours the decision of a guard around it.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.guard(optax.adam(1e-2))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> bool(jnp.all(optax.apply_updates(params, updates)["w"] == params["w"]))  # untouched
      True
      >>> figures = adaptx.telemetry(state)
      >>> int(figures["guard/skipped"]), int(figures["guard/last_reason"])
      (1, 1)
      >>> _, state = tx.update({"w": jnp.ones(2)}, state, params, value=jnp.inf)
      >>> int(adaptx.telemetry(state)["guard/last_reason"])  # a non-finite loss
      3

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping non-finite steps).

      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025 (z-score spike detection on the norm).
    """
    fn = "guard"
    cfg = _Config(
        skip_nonfinite,
        spike_z,
        max_consecutive_skips,
        spike_alpha,
        spike_warmup,
        loss_z,
        loss_alpha,
        max_grad_norm,
        max_loss,
        max_consecutive_nonfinite,
    )
    _check_guard_args(fn, inner, cfg)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> GuardState:
        return _init_state(inner.init(params), **per_tensor_lib.initial(params, per_tensor))

    def update_fn(
        updates: optax.Updates,
        state: GuardState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GuardState]:
        tu.check_float_leaves(fn, updates)
        norm, leaf_norms = per_tensor_lib.global_norm(updates, axis_name, per_tensor)
        norm = norm.astype(jnp.float32)
        needs = _loss_needed_by(cfg)
        loss = loss_value.read(fn, extra_args, needed_by=needs, axis_name=axis_name)
        v = _decide(cfg, state, norm, loss)
        skip = skip_lib.combine(v.skip, extra_args)  # a guard inside a guard
        out, inner_state = skip_lib.run(inner, skip, updates, state.inner_state, params, extra_args)
        new = _record(cfg, state, v, norm, inner_state)
        new = new._replace(**per_tensor_lib.updated(state, leaf_norms, v.skip))
        # An outer guard's skip leaves this guard's own figures as they were, too.
        outer = skip_lib.decision(extra_args)
        return out, skip_lib.hold_fields(outer, state, new, held=("inner_state",))

    return skip_lib.Honouring(init_fn, update_fn)


class _Config(NamedTuple):
    """The guard's settings, as passed to :func:`guard`."""

    skip_nonfinite: bool
    spike_z: Any
    max_consecutive_skips: int | None
    spike_alpha: Any
    spike_warmup: int
    loss_z: Any
    loss_alpha: Any
    max_grad_norm: Any
    max_loss: Any
    max_consecutive_nonfinite: int | None


class _Verdict(NamedTuple):
    """What the guard concluded about one step (see :func:`_decide`)."""

    skip: jax.Array
    reason: jax.Array
    finite: jax.Array
    nonfinite: jax.Array
    norm_spike: jax.Array
    forced: jax.Array
    loss: _LossVerdict


def _loss_needed_by(cfg: _Config) -> str | None:
    if cfg.loss_z is not None:
        return f"loss_z={cfg.loss_z!r}"
    if cfg.max_loss is not None:
        return f"max_loss={cfg.max_loss!r}"
    return None


def _decide(cfg: _Config, state: GuardState, norm: jax.Array, loss: jax.Array | None) -> _Verdict:
    """Whether to skip this step, and why (``last_reason``'s code)."""
    no = jnp.zeros([], bool)
    finite = jnp.isfinite(norm)
    if cfg.max_consecutive_skips is not None:
        limit = jnp.asarray(cfg.max_consecutive_skips).astype(jnp.int32)
        at_limit = state.consecutive >= limit
    else:
        at_limit = no
    lv = _judge_loss(loss, state, cfg.loss_z, cfg.loss_alpha, at_limit)
    nonfinite = (~finite | lv.nonfinite) if cfg.skip_nonfinite else no
    if cfg.spike_z is not None:
        z = running_stats.zscore(norm, state.norm_mean, state.norm_var)
        warmed = state.count >= jnp.asarray(cfg.spike_warmup).astype(jnp.int32)
        norm_spike = finite & warmed & (z > tu.as_scalar(cfg.spike_z, jnp.float32))
    else:
        norm_spike = no
    over_norm = no
    if cfg.max_grad_norm is not None:
        over_norm = finite & (norm > tu.as_scalar(cfg.max_grad_norm, jnp.float32))
    over_loss = no
    if cfg.max_loss is not None and loss is not None:
        over_loss = jnp.isfinite(loss) & (loss > tu.as_scalar(cfg.max_loss, jnp.float32))
    spike = norm_spike | lv.spike
    forced = spike & at_limit
    skip = nonfinite | over_norm | over_loss | (spike & ~forced)
    reason = jnp.select(
        [~skip, nonfinite & ~finite, nonfinite, over_norm, over_loss, norm_spike],
        [OK, NONFINITE, NONFINITE_LOSS, GRAD_NORM_LIMIT, LOSS_LIMIT, SPIKE],
        LOSS_SPIKE,
    ).astype(jnp.int32)
    return _Verdict(skip, reason, finite, nonfinite, norm_spike, forced, lv)


def _record(
    cfg: _Config, state: GuardState, v: _Verdict, norm: jax.Array, inner_state: Any
) -> GuardState:
    """The guard's new state after a step judged by ``v``."""
    count, mean, var = running_stats.record(
        state.count,
        state.norm_mean,
        state.norm_var,
        norm,
        alpha=cfg.spike_alpha,
        warmup=cfg.spike_warmup,
        when=v.finite & (norm > 0) & ~(v.norm_spike & ~v.forced),
    )
    i32 = jnp.int32
    streak = jnp.where(v.nonfinite, tu.safe_increment(state.consecutive_nonfinite), 0).astype(i32)
    diverged = state.diverged
    if cfg.max_consecutive_nonfinite is not None:
        limit = jnp.asarray(cfg.max_consecutive_nonfinite).astype(i32)
        diverged = jnp.maximum(diverged, (streak >= limit).astype(i32))
    return state._replace(
        inner_state=inner_state,
        count=count,
        grad_norm=norm,
        skipped=tu.count_if(v.skip, state.skipped),
        consecutive=jnp.where(v.skip, tu.safe_increment(state.consecutive), 0).astype(i32),
        last_reason=v.reason,
        forced=tu.count_if(v.forced, state.forced),
        norm_mean=mean,
        norm_var=var,
        loss=v.loss.loss,
        loss_count=v.loss.count,
        loss_mean=v.loss.mean,
        loss_var=v.loss.var,
        loss_z=v.loss.z,
        steps=tu.safe_increment(state.steps),
        consecutive_nonfinite=streak,
        diverged=diverged,
    )


def _init_state(inner_state: optax.OptState, **per_tensor_fields) -> GuardState:
    def scalar(dtype=jnp.float32):  # a buffer of its own: state may be donated
        return jnp.zeros([], dtype)

    i32 = jnp.int32
    return GuardState(
        inner_state=inner_state,
        count=scalar(i32),
        grad_norm=scalar(),
        skipped=scalar(i32),
        consecutive=scalar(i32),
        last_reason=scalar(i32),
        forced=scalar(i32),
        norm_mean=scalar(),
        norm_var=scalar(),
        loss=scalar(),
        loss_count=scalar(i32),
        loss_mean=scalar(),
        loss_var=scalar(),
        loss_z=scalar(),
        steps=scalar(i32),
        consecutive_nonfinite=scalar(i32),
        diverged=scalar(i32),
        **per_tensor_fields,
    )


def _check_guard_args(fn: str, inner: Any, cfg: _Config) -> None:
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(
            f"{fn}: `inner` must be an optax GradientTransformation, got inner={inner!r}. "
            "Pass e.g. inner=adaptx.adamw(1e-3)."
        )
    if not isinstance(cfg.skip_nonfinite, bool):
        raise ValueError(
            f"{fn}: `skip_nonfinite` must be a bool, got skip_nonfinite={cfg.skip_nonfinite!r}. "
            "Pass e.g. skip_nonfinite=True."
        )
    for name, value, example in (
        ("spike_z", cfg.spike_z, "6.0"),
        ("loss_z", cfg.loss_z, "6.0"),
        ("max_grad_norm", cfg.max_grad_norm, "100.0"),
    ):
        if value is not None:
            validate.check_positive(fn, name, value, example=example)
    if cfg.max_loss is not None:
        validate.check_range(fn, "max_loss", cfg.max_loss, example="20.0")
    for name, value, example in (
        ("max_consecutive_skips", cfg.max_consecutive_skips, "10"),
        ("max_consecutive_nonfinite", cfg.max_consecutive_nonfinite, "100"),
    ):
        validate.check_int(fn, name, value, low=1, allow_none=True, traced_ok=True, example=example)
    validate.check_range(
        fn,
        "spike_alpha",
        cfg.spike_alpha,
        low=0.0,
        high=1.0,
        high_inclusive=False,
        example="0.97",
    )
    validate.check_int(fn, "spike_warmup", cfg.spike_warmup, low=1, traced_ok=True, example="25")
    validate.check_range(
        fn,
        "loss_alpha",
        cfg.loss_alpha,
        low=0.0,
        high=1.0,
        high_inclusive=False,
        example="0.98",
    )
    checks = (cfg.spike_z, cfg.loss_z, cfg.max_grad_norm, cfg.max_loss)
    if not cfg.skip_nonfinite and all(c is None for c in checks):
        raise ValueError(
            f"{fn}: nothing to guard against: skip_nonfinite=False and no spike_z, loss_z, "
            "max_grad_norm or max_loss. Pass e.g. skip_nonfinite=True."
        )
