"""SGD with momentum and global-norm clipping."""

from __future__ import annotations

import optax

from adaptx._core import validate
from adaptx._momentum.momentum import momentum as momentum_tx
from adaptx._recipes.common import check_learning_rate, optional_clip


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    *,
    nesterov: bool = False,
    max_norm: float | None = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with heavy-ball momentum behind global-norm gradient clipping.

    .. math::

      \tilde g_t = \min\!\left(1, \tfrac{c}{\|g_t\|}\right) g_t, \qquad
      b_t = \tilde g_t + \mu b_{t-1}, \qquad \theta_t = \theta_{t-1} - \eta_t b_t

    (Nesterov: :math:`\theta_t = \theta_{t-1} - \eta_t(\tilde g_t + \mu b_t)`). Equal to
    ``optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr, momentum, nesterov))``.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule.
      momentum: :math:`\mu \in [0, 1)`; ``None`` or ``0`` for plain SGD.
      nesterov: use Nesterov momentum.
      max_norm: global-norm bound :math:`c`; ``None`` disables clipping.

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
    use_momentum = momentum is not None and not (
        isinstance(momentum, int | float) and momentum == 0
    )
    return optax.chain(
        optional_clip(max_norm),
        momentum_tx(momentum, nesterov=nesterov) if use_momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
