r"""Mechanisms under test against Adam's own spikes: prototypes measured here, not in adaptx.

Bai et al. (2025) trace Adam's loss spikes to the second moment lagging the gradient:
while the gradient is small for many steps, :math:`\hat v` decays, the effective step
:math:`\eta / \sqrt{\hat v}` grows past the stability limit of the current curvature, and
the gradient grows faster than :math:`\hat v` can follow (:math:`g^2 / \hat v \gg 1`).
Two reactions to that lag, written as plain optax transforms (moments kept in float32,
updates returned in the gradient's dtype):

* :func:`catchup_adamw`: the second moment may rise at once and decays at :math:`\beta_2`,
  :math:`v_t = \max(\beta_2 v_{t-1} + (1-\beta_2) g_t^2,\ (1-\beta_2^t)\, g_t^2 / c^2)`, so
  that :math:`g_t^2 / \hat v_t \le c^2` element-wise.
* :func:`lag_backoff_adamw`: Adam whose whole step is multiplied by a factor
  :math:`s_t \in (0, 1]` that only goes down, and only when the loss is rising *and* the
  second moment lags:

  .. math::

    r_t = \max_{\text{tensors}} \sqrt{\operatorname{mean}(g_t^2 / \hat v_t)}, \qquad
    s_t = \begin{cases} \min(s_{t-1}, d / r_t) & r_t > d \text{ and } L_t > k\, \ell_{t-1} \\
    s_{t-1} & \text{otherwise,} \end{cases} \qquad
    \ell_t = \min(L_t, (1 + \kappa)\, \ell_{t-1})

  (:math:`\ell` a leaky minimum of the loss :math:`L`, passed as ``value=loss``). A run
  that keeps crossing the edge of stability is meant to settle at a rate below it; a run
  whose loss never rises keeps its rate. With ``rectify=True`` the step also carries
  RAdam's rectification (Liu et al. 2020), the warm-up that the Post-LN workload needs.

References:
  Liu et al., `On the Variance of the Adaptive Learning Rate and Beyond
  <https://arxiv.org/abs/1908.03265>`_, ICLR 2020.

  Bai et al., `Adaptive Preconditioners Trigger Loss Spikes in Adam
  <https://arxiv.org/abs/2506.04805>`_, 2025.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class _Moments(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    scale: jax.Array
    loss_min: jax.Array


def _rectifier(b2, t):
    r"""RAdam's factor and whether it applies at step ``t`` (Liu et al. 2020).

    :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`;
    for :math:`\rho_t > 5` the step is multiplied by
    :math:`\sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`,
    before that it is the bias-corrected momentum alone.
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    tf = t.astype(jnp.float32)
    rho = rho_inf - 2.0 * tf * b2**tf / (1.0 - b2**tf)
    safe = jnp.maximum(rho, 5.0)
    factor = jnp.sqrt((safe - 4) * (safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe))
    return factor, rho > 5.0


def _adam_with(lr, *, b1, b2, eps, weight_decay, nu_rule, step_rule, rectify=False):
    """Adam (float32 moments, decoupled decay) with a second-moment rule and a step factor;
    ``rectify`` adds RAdam's rectification."""

    def init_fn(params):
        z = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return _Moments(jnp.zeros([], jnp.int32), z, z, jnp.ones([]), jnp.full([], jnp.inf))

    def update_fn(grads, state, params=None, *, value=None, **extra):
        del extra
        t = state.count + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, g32)
        nu = jax.tree.map(lambda v, g: nu_rule(v, g, bc2), state.nu, g32)
        scale, loss_min = step_rule(g32, nu, bc2, state, value)
        step = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu)
        if rectify:
            factor, on = _rectifier(b2, t)
            step = jax.tree.map(lambda u, m: jnp.where(on, factor * u, m / bc1), step, mu)
        updates = jax.tree.map(
            lambda u, p, g: (-lr * (scale * u + weight_decay * p.astype(jnp.float32))).astype(
                g.dtype
            ),
            step,
            params,
            grads,
        )
        return updates, _Moments(t, mu, nu, scale, loss_min)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ema(b2):
    return lambda v, g, bc2: b2 * v + (1 - b2) * g * g


def _constant(g, nu, bc2, state, value):
    return state.scale, state.loss_min


def catchup_adamw(lr, c=1.0, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
    """Adam whose second moment rises at once to :math:`g^2/c^2` (see the module)."""

    def nu_rule(v, g, bc2):
        return jnp.maximum(b2 * v + (1 - b2) * g * g, bc2 * g * g / c**2)

    return _adam_with(
        lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, nu_rule=nu_rule, step_rule=_constant
    )


def lag_backoff_adamw(
    lr,
    d=1.2,
    gate=2.0,
    kappa=0.01,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-4,
    rectify=False,
):
    """Adam with a step factor that backs off on a rising loss with a lagging moment."""

    def step_rule(g, nu, bc2, state, value):
        per_tensor = jax.tree.map(
            lambda g, v: jnp.mean(g * g / jnp.maximum(v / bc2, eps**2)), g, nu
        )
        r = jnp.sqrt(jnp.max(jnp.stack(jax.tree.leaves(per_tensor))))
        loss = jnp.asarray(value, jnp.float32)
        back_off = (r > d) & (loss > gate * state.loss_min)
        scale = jnp.where(back_off, jnp.minimum(state.scale, d / r), state.scale)
        loss_min = jnp.where(
            jnp.isfinite(loss), jnp.minimum(loss, state.loss_min * (1 + kappa)), state.loss_min
        )
        return scale, loss_min

    return _adam_with(
        lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        nu_rule=_ema(b2),
        step_rule=step_rule,
        rectify=rectify,
    )
