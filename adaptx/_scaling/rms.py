"""RMSProp's second-moment rescaling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      nu: running mean of squared gradients, in ``nu_dtype``.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    nu: optax.Updates


def scale_by_rms(
    decay: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    initial_scale: jax.typing.ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by the root of a running mean of squared gradients (RMSProp).

    .. math::

      v_t = \rho\, v_{t-1} + (1-\rho)\, g_t^2, \qquad
      \hat v_t = \begin{cases} v_t / (1-\rho^t) & \text{bias\_correction} \\
                                v_t & \text{otherwise} \end{cases}

      u_t = \frac{g_t}{\sqrt{\hat v_t + \epsilon}} \ \ (\text{eps\_in\_sqrt}) \quad\text{or}\quad
      u_t = \frac{g_t}{\sqrt{\hat v_t} + \epsilon} .

    Same numbers as ``optax.scale_by_rms`` for the same settings, and its positional
    parameters in its order. A complex :math:`g_t` adds :math:`|g_t|^2` to :math:`v`,
    as in optax;
    ``scale_by_rms(decay=b2, eps_in_sqrt=False, bias_correction=True)`` matches
    ``scale_by_adam(b1=0, b2=b2)`` without storing a first moment.

    Args:
      decay: :math:`\rho \in [0, 1)`, decay of the running mean.
      eps: :math:`\epsilon \ge 0`, numerical floor.
      initial_scale: initial value of :math:`v` (``optax`` default 0; TF1 used 1).
      eps_in_sqrt: put :math:`\epsilon` inside the square root.
      bias_correction: divide by :math:`1-\rho^t`.
      nu_dtype: storage dtype of :math:`v` (default: the parameter's dtype). A value
        beyond a float16 state's range is stored as its largest value (65504), not
        ``inf``; for float16 parameters, ``jnp.float32`` keeps it exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.scale_by_rms(decay=0.0, eps=0.0)
      >>> updates, _ = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> updates
      Array([ 1., -1.], dtype=float32)

    References:
      Hinton, `Lecture 6.5 of Neural Networks for Machine Learning
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.
    """
    fn = "scale_by_rms"
    validate.check_decay(fn, "decay", decay)
    validate.check_nonnegative(fn, "eps", eps, example="1e-8")
    validate.check_nonnegative(fn, "initial_scale", initial_scale, example="0.0")
    validate.check_dtype(fn, "nu_dtype", nu_dtype)
    nu_dtype = tu.canonical_dtype(nu_dtype)

    def init_fn(params: optax.Params) -> ScaleByRmsState:
        return ScaleByRmsState(
            count=jnp.zeros([], jnp.int32), nu=tu.full_like(params, initial_scale, dtype=nu_dtype)
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByRmsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByRmsState]:
        del params
        skip = skip_lib.decision(extra_args)
        tu.check_float_leaves(fn, updates, allow_complex=True)
        tu.check_same_structure(fn, updates, state.nu, "updates", "state.nu", shapes=True)
        f32 = jnp.float32
        count = tu.safe_increment(state.count)
        rho = tu.as_scalar(decay, f32)
        inv_bc = 1.0 / tu.bias_correction(rho, count) if bias_correction else jnp.ones([], f32)
        e = tu.as_scalar(eps, f32)

        def leaf(g, v):
            acc = tu.compute_dtype(g.dtype, v.dtype)
            g_, r = g.astype(acc), rho.astype(acc)
            v_ = skip_lib.hold(skip, v, (1 - r) * tu.abs_sq(g_).astype(acc) + r * v.astype(acc))
            v_hat = v_ * inv_bc.astype(acc) if bias_correction else v_
            if eps_in_sqrt:
                u = g_ * jax.lax.rsqrt(v_hat + e.astype(acc))
            else:
                u = g_ / (jnp.sqrt(v_hat) + e.astype(acc))
            u = skip_lib.silence(skip, u)
            return u.astype(g.dtype), tu.to_storage(v_, v.dtype)

        u, nu = tu.unzip(jax.tree.map(leaf, updates, state.nu), updates, 2)
        return u, ScaleByRmsState(count=skip_lib.hold(skip, state.count, count), nu=nu)

    return skip_lib.Honouring(init_fn, update_fn)
