"""SGD with momentum and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from adaptx._chain import chain
from adaptx._core import validate
from adaptx._momentum.momentum import momentum as momentum_tx
from adaptx._recipes.common import check_learning_rate, optional_clip
from adaptx._scaling.learning_rate import scale_by_learning_rate


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike | None = 0.9,
    nesterov: bool = False,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
    *,
    max_norm: jax.typing.ArrayLike | None = 1.0,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with heavy-ball momentum behind global-norm gradient clipping.

    .. math::

      \tilde g_t = \min\!\left(1, \tfrac{c}{\|g_t\|}\right) g_t, \qquad
      b_t = \tilde g_t + \mu b_{t-1}, \qquad \theta_t = \theta_{t-1} - \eta_t b_t

    (Nesterov: :math:`\theta_t = \theta_{t-1} - \eta_t(\tilde g_t + \mu b_t)`). Equal to
    ``optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr, momentum, nesterov))``;
    with ``max_norm=None``, to ``optax.sgd``. The positional parameters are
    ``optax.sgd``'s, in its order; adaptx's own option is keyword-only.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule.
      momentum: :math:`\mu \in [0, 1)`; ``None`` or ``0`` for plain SGD (adaptx's
        default 0.9; optax's is ``None``).
      nesterov: use Nesterov momentum.
      accumulator_dtype: storage dtype of the momentum buffer (default: the
        parameter's dtype); unused without momentum.
      max_norm: global-norm bound :math:`c` (adaptx's default 1.0; optax has no
        clip); ``None`` disables clipping.
      per_tensor: keep the clip's per-leaf gradient norms and the leaf that led the
        last clip, for ``adaptx.telemetry(state, per_tensor=True)`` (needs ``max_norm``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.sgd(0.1, momentum=None, max_norm=1.0)
      >>> params = jnp.array([0.0, 0.0])
      >>> updates, _ = tx.update(jnp.array([30.0, 40.0]), tx.init(params))
      >>> optax.apply_updates(params, updates)
      Array([-0.06, -0.08], dtype=float32)

    References:
      Robbins and Monro, `A Stochastic Approximation Method
      <https://doi.org/10.1214/aoms/1177729586>`_, 1951.
    """
    fn = "sgd"
    check_learning_rate(fn, learning_rate)
    if max_norm is not None:
        validate.check_nonnegative(fn, "max_norm", max_norm)
    if momentum is not None:
        validate.check_decay(fn, "momentum", momentum)
    validate.check_dtype(fn, "accumulator_dtype", accumulator_dtype)
    no_momentum = momentum is None or (isinstance(momentum, int | float) and momentum == 0)
    return chain(
        optional_clip(max_norm, per_tensor, "sgd"),
        optax.identity()
        if momentum is None or no_momentum
        else momentum_tx(momentum, nesterov=nesterov, dtype=accumulator_dtype),
        scale_by_learning_rate(learning_rate),
    )
