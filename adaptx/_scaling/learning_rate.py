"""The last step of a recipe: scale by minus the learning rate, and keep the one applied."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports("scale_by_learning_rate", "learning_rate")
class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`.

    Attributes:
      count: steps taken (int32, saturating); a schedule is evaluated at it before it
        advances, as in ``optax.scale_by_schedule``. A skipped step does not advance it.
      learning_rate: the learning rate applied at the last step that was not skipped
        (float32; 0 before the first).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    learning_rate: jax.Array


def scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    flip_sign: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.scale_by_learning_rate``, keeping the learning rate it applied in its state.

    .. math::

      u_t = -\eta(t)\, g_t, \qquad t = \text{the steps taken before this one},

    with :math:`\eta(t) = \eta` for a number. The same numbers as
    ``optax.scale_by_learning_rate(learning_rate)`` (the factor is cast to each
    update's dtype before the product, as optax casts it), and for a schedule the same
    ``count``: the schedule is evaluated at the count, which then advances by one. The
    state also holds the learning rate applied at the last step, which
    :func:`adaptx.telemetry` reports as ``scale_by_learning_rate/learning_rate``: the
    number a schedule produced, with no host-side copy of the schedule to keep in step.
    Every adaptx recipe ends with it.

    A step skipped by a guard around it (:func:`adaptx.guard`, the skip protocol) returns
    zero updates and leaves the count and the figure as they were, so the schedule does
    not advance on a skipped step, as ``optax.scale_by_schedule``'s count does not when a
    guard selects its state.

    Args:
      learning_rate: :math:`\eta \ge 0`, a number (or array) or an optax schedule
        ``step -> lr`` (optax's signature gives it a default of ``None``; it is required).
      flip_sign: multiply by :math:`-\eta` (a descent step), as optax does; ``False``
        multiplies by :math:`\eta`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ScaleByLearningRateState`.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.scale_by_learning_rate(optax.linear_schedule(0.5, 0.0, 4))
      >>> state = tx.init(jnp.zeros(2))
      >>> for _ in range(3):  # the schedule at counts 0, 1, 2
      ...     updates, state = tx.update(jnp.ones(2), state)
      >>> updates, int(state.count)
      (Array([-0.25, -0.25], dtype=float32), 3)
      >>> {k: float(v) for k, v in adaptx.telemetry(state).items()}
      {'scale_by_learning_rate/learning_rate': 0.25}
    """
    fn = "scale_by_learning_rate"
    if learning_rate is None:
        raise ValueError(
            f"{fn}: `learning_rate` is required, got learning_rate=None. Pass e.g. "
            "learning_rate=1e-3 or an optax schedule."
        )
    if not isinstance(flip_sign, bool):
        raise ValueError(
            f"{fn}: `flip_sign` must be a bool, got flip_sign={flip_sign!r}. "
            "Pass e.g. flip_sign=True."
        )
    if not callable(learning_rate):
        validate.check_nonnegative(fn, "learning_rate", learning_rate, example="1e-3")

    def init_fn(params: optax.Params) -> ScaleByLearningRateState:
        del params
        zero = jnp.zeros([], jnp.float32)
        return ScaleByLearningRateState(count=jnp.zeros([], jnp.int32), learning_rate=zero)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByLearningRateState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByLearningRateState]:
        del params, extra_args
        tu.check_float_leaves(fn, updates, allow_complex=True)
        stateless = state is None or isinstance(state, optax.EmptyState)  # optax's own form
        if stateless and callable(learning_rate):
            raise ValueError(
                f"{fn}: a schedule needs the step count, but the state is {state!r}. Pass "
                "the state this transform's init returned."
            )
        lr = learning_rate if not callable(learning_rate) else learning_rate(state.count)
        step = -lr if flip_sign else lr  # optax's sign flip, then its cast to each leaf's dtype
        updates = jax.tree.map(lambda g: jnp.asarray(step, dtype=g.dtype) * g, updates)
        if stateless:  # a constant learning rate, the state optax's: returned as it came
            return updates, state
        new = ScaleByLearningRateState(tu.safe_increment(state.count), tu.as_scalar(lr))
        return updates, new

    return skip_lib.by_selection(optax.GradientTransformation(init_fn, update_fn))
