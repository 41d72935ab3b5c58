"""Dynamic loss scaling for float16 training, as a transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports("dynamic_loss_scale", "scale", "good_steps", "nonfinite_skipped")
class DynamicLossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    ``good_steps`` and ``nonfinite_skipped`` are counters: they mean what
    ``adaptx._core.telemetry.COUNTERS`` says, in every state that reports them.

    Attributes:
      scale: the loss scale to use for the next step (float32).
      good_steps: finite steps since the scale last changed (int32).
      nonfinite_skipped: steps skipped so far because their gradients were not finite
        (int32, saturating).
      inner_state: the wrapped transformation's state (``optax.EmptyState`` when
        used as a chain element).
    """

    scale: jax.Array
    good_steps: jax.Array
    nonfinite_skipped: jax.Array
    inner_state: optax.OptState


def dynamic_loss_scale(
    init_scale: jax.typing.ArrayLike = 2.0**15,
    period: int = 2000,
    factor: jax.typing.ArrayLike = 2.0,
    min_scale: jax.typing.ArrayLike = 1.0,
    *,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic loss scaling (mixed-precision training) as a transformation.

    The loss is multiplied by :math:`S` before differentiation (read the current
    value with :func:`adaptx.loss_scale`), so small float16 gradients do not
    underflow. This transform then unscales the gradients and adapts :math:`S`:

    .. math::

      g_t \leftarrow g_t / S_t, \qquad
      S_{t+1} = \begin{cases}
        \max(S_t / f,\ S_{\min}) & \text{if } g_t \text{ has a NaN or Inf (step skipped)} \\
        f\, S_t & \text{after } P \text{ consecutive finite steps} \\
        S_t & \text{otherwise.}
      \end{cases}

    A non-finite step yields exact zero updates. Put the transform around the
    optimizer with ``inner=`` so that a skipped step also leaves the optimizer's
    state untouched (no moment decay, no step count); as the first element of an
    ``optax.chain`` it can only zero the gradients, and the later transforms still
    advance their state on those zeros.

    Args:
      init_scale: :math:`S_0 > 0` (default :math:`2^{15}`).
      period: :math:`P \ge 1`, finite steps before the scale grows.
      factor: :math:`f > 1`, growth and back-off factor.
      min_scale: :math:`S_{\min} > 0`, the scale never backs off below it.
      inner: the optimizer to run on the unscaled gradients; ``None`` to use this
        transform as a chain element.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`DynamicLossScaleState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.dynamic_loss_scale(init_scale=1024.0, inner=optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2, jnp.float16)}
      >>> state = tx.init(params)
      >>> loss = lambda p, s: s * jnp.sum(p["w"].astype(jnp.float32) ** 2)
      >>> grads = jax.grad(loss)(params, adaptx.loss_scale(state))   # scaled gradients
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.8, 0.8], dtype=float16)
      >>> _, state = tx.update({"w": jnp.array([jnp.inf, 0], jnp.float16)}, state, params)
      >>> float(adaptx.loss_scale(state)), int(state.nonfinite_skipped)
      (512.0, 1)

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018.
    """
    fn = "dynamic_loss_scale"
    validate.check_positive(fn, "init_scale", init_scale, example="32768.0")
    validate.check_int(fn, "period", period, low=1, traced_ok=True, example="2000")
    validate.check_range(fn, "factor", factor, low=1.0, low_inclusive=False, example="2.0")
    validate.check_positive(fn, "min_scale", min_scale, example="1.0")
    if inner is not None and (not hasattr(inner, "init") or not hasattr(inner, "update")):
        raise ValueError(
            f"{fn}: `inner` must be an optax GradientTransformation or None, got inner={inner!r}."
        )
    wrapped = None if inner is None else optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> DynamicLossScaleState:
        return DynamicLossScaleState(
            scale=tu.as_scalar(init_scale, jnp.float32),
            good_steps=jnp.zeros([], jnp.int32),
            nonfinite_skipped=jnp.zeros([], jnp.int32),
            inner_state=optax.EmptyState() if wrapped is None else wrapped.init(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: DynamicLossScaleState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, DynamicLossScaleState]:
        tu.check_float_leaves(fn, updates)
        finite = jnp.isfinite(tu.sum_of_squares(updates))
        grads = tu.scale(updates, 1.0 / state.scale)
        outer = skip_lib.decision(extra_args)
        skip = skip_lib.combine(~finite, extra_args)  # an overflow, or a guard's skip around
        if wrapped is None:
            out, inner_state = skip_lib.zeros_if(skip, grads), state.inner_state
        else:
            out, inner_state = skip_lib.run(
                wrapped, skip, grads, state.inner_state, params, extra_args
            )

        f = tu.as_scalar(factor, jnp.float32)
        good = jnp.where(finite, tu.safe_increment(state.good_steps), 0)
        grow = good >= jnp.asarray(period).astype(jnp.int32)
        grown = jnp.where(grow, state.scale * f, state.scale)
        grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
        backed_off = jnp.maximum(state.scale / f, tu.as_scalar(min_scale, jnp.float32))
        new = DynamicLossScaleState(
            scale=jnp.where(finite, grown, backed_off).astype(jnp.float32),
            good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
            nonfinite_skipped=tu.count_if(~finite, state.nonfinite_skipped),
            inner_state=inner_state,
        )
        return out, skip_lib.hold_fields(outer, state, new, held=("inner_state",))

    return skip_lib.Honouring(init_fn, update_fn)


def loss_scale(opt_state: Any) -> jax.Array:
    """The current loss scale kept by :func:`dynamic_loss_scale` inside ``opt_state``.

    Multiply the loss by it before differentiating. Works on any optimizer state
    (or ``flax.nnx.Optimizer``) that contains exactly one ``dynamic_loss_scale``.

    Args:
      opt_state: an optimizer state, or a ``flax.nnx.Optimizer``.

    Returns:
      The scale, a float32 scalar ``jax.Array`` (no host sync).

    Raises:
      ValueError: if the state holds no ``dynamic_loss_scale``, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = optax.chain(adaptx.dynamic_loss_scale(init_scale=256.0), optax.sgd(0.1))
      >>> adaptx.loss_scale(tx.init({"w": jnp.zeros(2)}))
      Array(256., dtype=float32)
    """
    from adaptx._telemetry import _unwrap, find_states

    found = find_states(opt_state, DynamicLossScaleState)
    if len(found) != 1:
        raise ValueError(
            f"loss_scale: expected exactly one dynamic_loss_scale in the optimizer state, "
            f"found {len(found)}. Build the optimizer with adaptx.dynamic_loss_scale(...)."
        )
    return _unwrap(found[0][1].scale)
