"""AdaGrad's accumulated-square rescaling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`.

    Attributes:
      sum_of_squares: accumulated squared gradients, one array per parameter.
    """

    sum_of_squares: optax.Updates


def scale_by_adagrad(
    initial_accumulator_value: jax.typing.ArrayLike = 0.1,
    eps: jax.typing.ArrayLike = 1e-7,
    *,
    dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by the root of the sum of all past squared gradients (AdaGrad).

    .. math::

      G_t = G_{t-1} + g_t^2, \qquad
      u_t = \begin{cases} g_t / \sqrt{G_t + \epsilon} & G_t > 0 \\ 0 & G_t = 0 \end{cases}

    with :math:`G_0` = ``initial_accumulator_value``. Same numbers as
    ``optax.scale_by_rss`` (the rescaling inside ``optax.adagrad``); a complex
    :math:`g_t` adds :math:`|g_t|^2`, as there.

    Args:
      initial_accumulator_value: :math:`G_0 \ge 0`.
      eps: :math:`\epsilon \ge 0`, numerical floor inside the square root.
      dtype: storage dtype of :math:`G` (default: the parameter's dtype). A value
        beyond a float16 state's range is stored as its largest value (65504), not
        ``inf``; for float16 parameters, ``jnp.float32`` keeps it exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.scale_by_adagrad(initial_accumulator_value=0.0, eps=0.0)
      >>> updates, _ = tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))
      >>> updates
      Array([ 1., -1.], dtype=float32)

    References:
      Duchi et al., `Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
    """
    fn = "scale_by_adagrad"
    validate.check_nonnegative(fn, "initial_accumulator_value", initial_accumulator_value, "0.1")
    validate.check_nonnegative(fn, "eps", eps, example="1e-7")
    validate.check_dtype(fn, "dtype", dtype)
    dtype = tu.canonical_dtype(dtype)

    def init_fn(params: optax.Params) -> ScaleByAdagradState:
        return ScaleByAdagradState(
            sum_of_squares=tu.full_like(params, initial_accumulator_value, dtype=dtype)
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByAdagradState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByAdagradState]:
        del params
        skip = skip_lib.decision(extra_args)
        tu.check_float_leaves(fn, updates, allow_complex=True)
        tu.check_same_structure(fn, updates, state.sum_of_squares, "updates", "state", shapes=True)
        e = tu.as_scalar(eps, jnp.float32)

        def leaf(g, s):
            acc = tu.compute_dtype(g.dtype, s.dtype)
            g_ = g.astype(acc)
            s_ = skip_lib.hold(skip, s, s.astype(acc) + tu.abs_sq(g_).astype(acc))
            pos = jnp.real(s_) > 0  # G is real (a complex G has a zero imaginary part)
            u = jnp.where(pos, g_ * jax.lax.rsqrt(s_ + e.astype(acc)), jnp.zeros([], acc))
            u = skip_lib.silence(skip, u)
            return u.astype(g.dtype), tu.to_storage(s_, s.dtype)

        u, sos = tu.unzip(jax.tree.map(leaf, updates, state.sum_of_squares), updates, 2)
        return u, ScaleByAdagradState(sum_of_squares=sos)

    return skip_lib.Honouring(init_fn, update_fn)
