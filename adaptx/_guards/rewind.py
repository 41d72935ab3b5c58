"""Rewind to the last good state, with a learning-rate backoff, when the loss diverges."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import loss_value, robust_stats, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports


@reports("rewind", "rewinds", "lr_scale", "loss_mean")
class RewindState(NamedTuple):
    """State of :func:`rewind`.

    ``rewinds`` is a counter: it means what ``adaptx._core.telemetry.COUNTERS`` says, in
    every state that reports it.

    Attributes:
      inner_state: the wrapped transformation's state.
      good_params: the parameters of the last snapshot.
      good_inner: the inner state of the last snapshot.
      since: healthy steps since the last snapshot (int32).
      lr_scale: factor on every update, ``backoff`` to the power of the rewinds (float32).
      rewinds: rewinds so far (int32, saturating).
      loss_count: healthy losses recorded (int32).
      loss_mean: running mean of the healthy losses (float32).
      loss_var: running variance of the healthy losses (float32).
    """

    inner_state: optax.OptState
    good_params: optax.Params
    good_inner: optax.OptState
    since: jax.Array
    lr_scale: jax.Array
    rewinds: jax.Array
    loss_count: jax.Array
    loss_mean: jax.Array
    loss_var: jax.Array


def rewind(
    inner: optax.GradientTransformation,
    *,
    loss_factor: jax.typing.ArrayLike = 2.0,
    backoff: jax.typing.ArrayLike = 0.5,
    snapshot_every: int = 50,
    warmup: int = 20,
    alpha: jax.typing.ArrayLike = 0.98,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so that a diverging loss sends the run back to its last good state.

    Every ``snapshot_every`` healthy steps the parameters and the inner state are copied.
    A step *diverges* when its loss (passed as ``value=loss``) is non-finite, or, once
    ``warmup`` healthy losses have been seen, above ``loss_factor`` times their running
    mean :math:`\bar L` (:mod:`adaptx._core.robust_stats`, winsorised, NaN-proof). Then
    the update returned moves the parameters back to the snapshot,

    .. math::

      u_t = \theta_{\text{good}} - \theta_t, \qquad
      s \leftarrow \beta s, \qquad \text{otherwise} \quad u_t = s\, u^{\text{inner}}_t,

    the inner state is restored, and every later update is scaled by :math:`s`, the
    learning-rate backoff (:math:`\beta` = ``backoff``). This is the restart-and-skip
    practice of large runs (PaLM: restart from a checkpoint before the spike and skip the
    batches that caused it), inside the optimizer, with no checkpoint round trip. It
    costs a copy of the parameters and of the inner state, and a select over both at
    every step.

    Args:
      inner: the optimizer to protect.
      loss_factor: a loss above this many times the running mean diverges (> 1).
      backoff: factor on the learning rate after each rewind, in (0, 1].
      snapshot_every: healthy steps between snapshots (>= 1).
      warmup: healthy losses before the ratio rule applies (>= 1).
      alpha: weight on the past of the running loss statistics, in [0, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`RewindState`;
      its ``update`` needs ``params`` and ``value``.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.rewind(optax.sgd(0.1), warmup=2, snapshot_every=1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> for loss in [1.0, 1.1, 0.9]:
      ...     u, state = tx.update({"w": jnp.ones(2)}, state, params, value=loss)
      ...     params = optax.apply_updates(params, u)
      >>> u, state = tx.update({"w": jnp.ones(2)}, state, params, value=50.0)
      >>> params = optax.apply_updates(params, u)
      >>> [round(float(w), 4) for w in params["w"]]  # back to the last snapshot
      [0.8, 0.8]
      >>> float(adaptx.telemetry(state)["rewind/lr_scale"])
      0.5

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (restarting before a loss spike).
    """
    fn = "rewind"
    validate.check_range(
        fn, "loss_factor", loss_factor, low=1.0, low_inclusive=False, example="2.0"
    )
    validate.check_range(
        fn, "backoff", backoff, low=0.0, high=1.0, low_inclusive=False, example="0.5"
    )
    validate.check_int(fn, "snapshot_every", snapshot_every, low=1, example="50")
    validate.check_int(fn, "warmup", warmup, low=1, example="20")
    validate.check_range(
        fn, "alpha", alpha, low=0.0, high=1.0, high_inclusive=False, example="0.98"
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> RewindState:
        inner_state = inner.init(params)
        copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 - buffers of their own
        i32 = jnp.int32
        return RewindState(
            inner_state=inner_state,
            good_params=copy(params),
            good_inner=copy(inner_state),
            since=jnp.zeros([], i32),
            lr_scale=jnp.ones([], jnp.float32),
            rewinds=jnp.zeros([], i32),
            loss_count=jnp.zeros([], i32),
            loss_mean=jnp.zeros([], jnp.float32),
            loss_var=jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates: optax.Updates,
        state: RewindState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RewindState]:
        validate.require_params(fn, params)
        loss = loss_value.read(fn, extra_args, needed_by="rewinding")
        assert loss is not None  # needed_by raises when there is none
        ready = state.loss_count >= warmup
        bad = ~jnp.isfinite(loss) | (ready & (loss > loss_factor * state.loss_mean))
        # The inner transform skips a bad step (it is restored from the snapshot below),
        # and any step a guard around this one skips.
        outer = skip_lib.decision(extra_args)
        skip = skip_lib.combine(bad, extra_args)
        new_updates, new_inner = skip_lib.held(
            inner, skip, updates, state.inner_state, params, extra_args
        )
        back = jax.tree.map(lambda g, p: (g - p).astype(p.dtype), state.good_params, params)
        scale = state.lr_scale
        out = jax.tree.map(
            lambda u, b: jnp.where(bad, b, u * scale.astype(u.dtype)), new_updates, back
        )
        inner_state = jax.tree.map(lambda g, n: jnp.where(bad, g, n), state.good_inner, new_inner)
        since = jnp.where(bad, 0, tu.safe_increment(state.since)).astype(jnp.int32)
        take = ~bad & (since >= snapshot_every)
        # The snapshot is this step's starting point: parameters and state before the update.
        good_params = jax.tree.map(lambda o, p: jnp.where(take, p, o), state.good_params, params)
        good_inner = jax.tree.map(
            lambda o, s: jnp.where(take, s, o), state.good_inner, state.inner_state
        )
        count, mean, var = robust_stats.record(
            state.loss_count, state.loss_mean, state.loss_var, loss, alpha=alpha, when=~bad
        )
        new = RewindState(
            inner_state=inner_state,
            good_params=good_params,
            good_inner=good_inner,
            since=jnp.where(take, 0, since).astype(jnp.int32),
            lr_scale=jnp.where(bad, scale * backoff, scale).astype(jnp.float32),
            rewinds=tu.count_if(bad, state.rewinds),
            loss_count=count,
            loss_mean=mean,
            loss_var=var,
        )
        # Under a guard's skip, nothing moves: no update, no rewind, the state as it was.
        return skip_lib.zeros_if(outer, out), skip_lib.select_state(outer, state, new)

    return skip_lib.Honouring(init_fn, update_fn)
