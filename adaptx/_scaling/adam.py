"""Adam's moment estimates and rescaling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import tree as tu
from adaptx._core import validate


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      mu: first-moment estimate, one array per parameter, in ``mu_dtype``.
      nu: second-moment estimate, one array per parameter, in ``nu_dtype``.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam's bias-corrected moment estimates.

    With :math:`t` the step count (starting at 1) and :math:`g_t` the incoming gradient:

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

      \hat m_t = \frac{m_t}{1-\beta_1^t}, \qquad \hat v_t = \frac{v_t}{1-\beta_2^t}, \qquad
      u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} .

    With ``nesterov=True`` (NAdam, Dozat 2016), :math:`\hat m_t` is replaced by
    :math:`\frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}`.

    Same numbers as ``optax.scale_by_adam`` for the same settings. The bias
    corrections are scalars computed once per step; the moments are updated in
    float32 (or wider) and stored back in their own dtypes, which are both
    configurable (``optax`` only lets you choose ``mu``'s). The returned update has
    the gradient's dtype.

    Args:
      b1: decay :math:`\beta_1 \in [0, 1)` of the first moment.
      b2: decay :math:`\beta_2 \in [0, 1)` of the second moment.
      eps: :math:`\epsilon \ge 0` added to the denominator outside the square root.
      eps_root: :math:`\epsilon_{root} \ge 0` added inside the square root (useful
        when differentiating through the update, e.g. meta-learning).
      mu_dtype: storage dtype of :math:`m` (default: the parameter's dtype).
      nu_dtype: storage dtype of :math:`v` (default: the parameter's dtype).
      nesterov: use Nesterov momentum (NAdam).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = optax.chain(adaptx.scale_by_adam(), optax.scale(-1e-2))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.5, -0.1]), state)
      >>> optax.apply_updates(params, updates)
      Array([ 0.99, -1.99], dtype=float32)

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
    """
    fn = "scale_by_adam"
    validate.check_decay(fn, "b1", b1)
    validate.check_decay(fn, "b2", b2, example="0.999")
    validate.check_nonnegative(fn, "eps", eps, example="1e-8")
    validate.check_nonnegative(fn, "eps_root", eps_root, example="0.0")
    validate.check_dtype(fn, "mu_dtype", mu_dtype)
    validate.check_dtype(fn, "nu_dtype", nu_dtype)
    mu_dtype = tu.canonical_dtype(mu_dtype)
    nu_dtype = tu.canonical_dtype(nu_dtype)

    def init_fn(params):
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=tu.zeros_like(params, dtype=mu_dtype),
            nu=tu.zeros_like(params, dtype=nu_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        tu.check_float_leaves(fn, updates)
        tu.check_same_structure(fn, updates, state.mu, "updates", "state.mu")
        count = tu.safe_increment(state.count)
        # Step-dependent scalars, computed once for the whole tree.
        f32 = jnp.float32
        c1, c2 = tu.as_scalar(b1, f32), tu.as_scalar(b2, f32)
        inv_bc2 = 1.0 / tu.bias_correction(c2, count)
        if nesterov:
            k_mu = c1 / tu.bias_correction(c1, tu.safe_increment(count))
            k_g = (1.0 - c1) / tu.bias_correction(c1, count)
        else:
            k_mu = 1.0 / tu.bias_correction(c1, count)
            k_g = jnp.zeros([], f32)
        e, e_root = tu.as_scalar(eps, f32), tu.as_scalar(eps_root, f32)

        def leaf(g, m, v):
            acc = tu.compute_dtype(g.dtype, m.dtype, v.dtype)
            g_, m_, v_ = g.astype(acc), m.astype(acc), v.astype(acc)
            b1_, b2_ = c1.astype(acc), c2.astype(acc)
            m_ = (1 - b1_) * g_ + b1_ * m_
            v_ = (1 - b2_) * (g_ * g_) + b2_ * v_
            m_hat = k_mu.astype(acc) * m_
            if nesterov:
                m_hat = m_hat + k_g.astype(acc) * g_
            v_hat = v_ * inv_bc2.astype(acc)
            u = m_hat / (jnp.sqrt(v_hat + e_root.astype(acc)) + e.astype(acc))
            return u.astype(g.dtype), m_.astype(m.dtype), v_.astype(v.dtype)

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        u, mu, nu = tu.unzip(out, updates, 3)
        return u, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

