"""Exponential moving average of the updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
      count: number of updates averaged so far (int32, saturating).
      ema: the (not bias-corrected) moving average, one array per parameter.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    ema: optax.Updates


def ema(
    decay: jax.typing.ArrayLike,
    debias: bool = True,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Exponential moving average of the updates, optionally bias-corrected.

    .. math::

      e_t = \beta e_{t-1} + (1-\beta) g_t, \qquad
      u_t = \begin{cases} e_t / (1-\beta^t) & \text{debias} \\ e_t & \text{otherwise.} \end{cases}

    Same numbers as ``optax.ema``, and its parameters in its order. The bias correction
    is one scalar per step. Complex leaves are averaged as they are, as optax does.

    Args:
      decay: :math:`\beta \in [0, 1)`.
      debias: divide by :math:`1-\beta^t` so early averages are not biased to zero.
      accumulator_dtype: storage dtype of the average (default: the parameter's dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.ema(0.9)
      >>> u, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> u                     # debiased: the first average is the first value
      Array([2.], dtype=float32)

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Section 3, bias correction).
    """
    fn = "ema"
    validate.check_decay(fn, "decay", decay)
    validate.check_dtype(fn, "accumulator_dtype", accumulator_dtype)
    dtype = tu.canonical_dtype(accumulator_dtype)

    def init_fn(params: optax.Params) -> EmaState:
        return EmaState(count=jnp.zeros([], jnp.int32), ema=tu.zeros_like(params, dtype=dtype))

    def update_fn(
        updates: optax.Updates,
        state: EmaState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, EmaState]:
        del params
        skip = skip_lib.decision(extra_args)
        tu.check_float_leaves(fn, updates, allow_complex=True)
        tu.check_same_structure(fn, updates, state.ema, "updates", "state.ema", shapes=True)
        count = tu.safe_increment(state.count)
        beta = tu.as_scalar(decay, jnp.float32)
        k = 1.0 / tu.bias_correction(beta, count) if debias else jnp.ones([], jnp.float32)

        def leaf(g, e):
            acc = tu.compute_dtype(g.dtype, e.dtype)
            b = beta.astype(acc)
            e_ = skip_lib.hold(skip, e, (1 - b) * g.astype(acc) + b * e.astype(acc))
            u = skip_lib.silence(skip, e_ * k.astype(acc))
            return u.astype(g.dtype), tu.to_storage(e_, e.dtype)

        u, avg = tu.unzip(jax.tree.map(leaf, updates, state.ema), updates, 2)
        return u, EmaState(count=skip_lib.hold(skip, state.count, count), ema=avg)

    return skip_lib.Honouring(init_fn, update_fn)
