"""AdamW with global-norm clipping, and Adam-atan2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adaptx._chain import chain
from adaptx._core import validate
from adaptx._recipes.common import check_learning_rate, decay_and_step, optional_clip
from adaptx._scaling.adam import scale_by_adam
from adaptx._scaling.adam_atan2 import scale_by_adam_atan2


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    max_norm: jax.typing.ArrayLike | None = 1.0,
    nu_dtype: jax.typing.DTypeLike | None = None,
    pack_small_leaves: int | None = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW (decoupled weight decay) behind global-norm gradient clipping.

    .. math::

      \tilde g_t = \min\!\left(1, \tfrac{c}{\|g_t\|}\right) g_t, \qquad
      \theta_t = \theta_{t-1} - \eta_t \left(
        \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
        + \lambda\, \theta_{t-1} \right)

    with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments of
    :math:`\tilde g`. Equal to ``optax.chain(optax.clip_by_global_norm(c),
    optax.adamw(...))``, with the pre-clip norm kept for :func:`adaptx.telemetry`; with
    ``max_norm=None``, to ``optax.adamw``. The positional parameters are
    ``optax.adamw``'s, in its order; adaptx's own options are keyword-only.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule ``step -> lr``.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: denominator floor, outside the square root.
      eps_root: :math:`\epsilon_{root} \ge 0`, added inside the square root.
      mu_dtype: storage dtype of the first moment.
      weight_decay: :math:`\lambda \ge 0`, decoupled weight decay (a number or a
        schedule, as in optax).
      mask: a tree of booleans (or a function of the params returning one) saying
        which parameters are decayed; typically excludes biases and norms.
      nesterov: use NAdam's Nesterov momentum.
      max_norm: global-norm bound :math:`c` (adaptx's default 1.0; optax has no
        clip); ``None`` disables clipping.
      nu_dtype: storage dtype of the second moment.
      pack_small_leaves: keep the moments of leaves with at most this many elements
        in flat buffers (e.g. ``65536``): the same numbers, a much faster compile and
        step on trees of many small leaves. See :func:`adaptx.scale_by_adam`.
      per_tensor: keep the clip's per-leaf gradient norms and the leaf that led the
        last clip, for ``adaptx.telemetry(state, per_tensor=True)`` (needs ``max_norm``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      when ``weight_decay`` is not zero.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, adaptx
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adaptx.adamw(1e-3, weight_decay=0.01)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> {k: round(float(v), 4) for k, v in adaptx.telemetry(state).items()}
      {'clip_by_global_norm/grad_norm': 3.4641, 'clip_by_global_norm/scale': 0.2887,
       'scale_by_learning_rate/learning_rate': 0.001}

      With many small leaves, their moments can share one flat buffer (same numbers,
      a faster compile and step):

      >>> params = {f"bias{i}": jnp.zeros(8) for i in range(100)}
      >>> state = adaptx.adamw(1e-3, pack_small_leaves=65536).init(params)
      >>> [flat.shape for flat in state[1].mu.flats]
      [(800,)]

    References:
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    fn = "adamw"
    check_learning_rate(fn, learning_rate)
    validate.check_decay(fn, "b1", b1)
    validate.check_decay(fn, "b2", b2, example="0.999")
    validate.check_nonnegative(fn, "eps", eps, example="1e-8")
    validate.check_nonnegative(fn, "eps_root", eps_root, example="0.0")
    if max_norm is not None:
        validate.check_nonnegative(fn, "max_norm", max_norm)
    return chain(
        optional_clip(max_norm, per_tensor, "adamw"),
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            nesterov=nesterov,
            pack_small_leaves=pack_small_leaves,
        ),
        *decay_and_step(fn, learning_rate, weight_decay, mask),
    )


def adam_atan2(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    a: jax.typing.ArrayLike = 1.27,
    b: jax.typing.ArrayLike = 1.0,
    max_norm: jax.typing.ArrayLike | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    nesterov: bool = False,
    pack_small_leaves: int | None = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam-atan2 with decoupled weight decay (Everett et al. 2024).

    .. math::

      \theta_t = \theta_{t-1} - \eta_t \left( a \operatorname{atan2}\!\left(\hat m_t,
        b\sqrt{\hat v_t}\right) + \lambda\, \theta_{t-1} \right)

    with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (see
    :func:`adaptx.scale_by_adam_atan2`): no epsilon, scale-invariant, and every
    element of the step bounded by :math:`\eta_t a \pi / 2` before weight decay.
    Unlike :func:`adaptx.adamw`, no global-norm clip by default (``max_norm=None``):
    the step is bounded by construction.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule ``step -> lr``.
      b1: decay of the first moment.
      b2: decay of the second moment (0.99, as in the reference implementations).
      weight_decay: :math:`\lambda \ge 0`, decoupled weight decay.
      mask: a tree of booleans (or a function of the params returning one) saying
        which parameters are decayed.
      a: the step's scale (1.27).
      b: the second moment's weight inside ``atan2`` (1).
      max_norm: a global-norm clip before the moments; ``None`` (default) for none.
      mu_dtype: storage dtype of the first moment.
      nu_dtype: storage dtype of the second moment.
      nesterov: use NAdam's Nesterov momentum.
      pack_small_leaves: keep the moments of leaves with at most this many elements
        in flat buffers; see :func:`adaptx.scale_by_adam`.
      per_tensor: keep the clip's per-leaf gradient norms and the leaf that led the
        last clip, for ``adaptx.telemetry(state, per_tensor=True)`` (needs ``max_norm``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      when ``weight_decay`` is not zero.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adaptx.adam_atan2(1e-2, weight_decay=0.0)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1e9, 1.0, -1e-9])}, state, params)
      >>> optax.apply_updates(params, updates)["w"]   # the same step whatever the scale
      Array([0.99002..., 0.99002..., 1.00997...], dtype=float32)

    References:
      Everett et al., `Scaling Exponents Across Parameterizations and Optimizers
      <https://arxiv.org/abs/2407.05872>`_, ICML 2024.

      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    fn = "adam_atan2"
    check_learning_rate(fn, learning_rate)
    if max_norm is not None:
        validate.check_nonnegative(fn, "max_norm", max_norm)
    return chain(
        optional_clip(max_norm, per_tensor, "adam_atan2"),
        scale_by_adam_atan2(
            b1,
            b2,
            a,
            b,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            nesterov=nesterov,
            pack_small_leaves=pack_small_leaves,
        ),
        *decay_and_step(fn, learning_rate, weight_decay, mask),
    )
