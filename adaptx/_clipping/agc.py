"""Unit-wise adaptive gradient clipping (AGC)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


def _unit_axes(ndim: int, shape: tuple, axis: Any) -> tuple[int, ...] | None:
    """The axes a unit's norm is reduced over (``None``: the whole tensor)."""
    if axis is not None:
        return (axis,) if isinstance(axis, int) else tuple(axis)
    squeezed = sum(1 for d in shape if d != 1)
    if ndim <= 1 or squeezed <= 1:
        return None
    if ndim in (2, 3):
        return (0,)
    if ndim == 4:
        return (0, 1, 2)
    if ndim == 5:
        return (0, 1, 2, 3)
    raise ValueError(
        f"adaptive_grad_clip: cannot infer the unit axes of a parameter with shape {shape}; "
        "pass `axis=` (an int or tuple of ints) naming the axes to reduce over."
    )


def _unit_norm(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    acc = tu.compute_dtype(x.dtype)
    return jnp.sqrt(jnp.sum(tu.abs_sq(x.astype(acc)), axis=axes, keepdims=True))


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-3,
    axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Unit-wise adaptive gradient clipping (AGC), Brock et al. 2021.

    For every unit :math:`i` (a column of a dense kernel, an output filter of a
    convolution) with parameters :math:`W_i` and gradient :math:`G_i`:

    .. math::

      G_i \leftarrow
      \begin{cases}
        \lambda \dfrac{\max(\|W_i\|, \epsilon)}{\|G_i\|} G_i
          & \text{if } \|G_i\| > \lambda \max(\|W_i\|, \epsilon) \\
        G_i & \text{otherwise.}
      \end{cases}

    Units: vectors and scalars are one unit; rank-2 and rank-3 tensors reduce over
    axis 0 (``(in, out)`` kernels), rank-4 over ``(0, 1, 2)`` (HWIO), rank-5 over
    ``(0, 1, 2, 3)``. Pass ``axis`` for other layouts. Same numbers as
    ``optax.adaptive_grad_clip``. Norms are computed in float32 or wider, from
    :math:`|z|^2` for complex leaves (as optax). Stateless: ``update`` takes any state,
    ``None`` included, and returns it.

    Args:
      clipping: :math:`\lambda > 0`, the largest allowed ratio of gradient norm to
        parameter norm.
      eps: :math:`\epsilon \ge 0`, floor on the parameter norm so that
        zero-initialised units can still move.
      axis: axes a unit's norm is reduced over, overriding the rank-based default.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.adaptive_grad_clip(0.1)
      >>> params = jnp.array([3.0, 4.0])           # norm 5, bound 0.5
      >>> grads = jnp.array([0.0, 10.0])
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates
      Array([0. , 0.5], dtype=float32)

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
    """
    validate.check_positive("adaptive_grad_clip", "clipping", clipping, example="0.01")
    validate.check_nonnegative("adaptive_grad_clip", "eps", eps, example="1e-3")

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del extra_args
        validate.require_params("adaptive_grad_clip", params)
        tu.check_float_leaves("adaptive_grad_clip", updates, allow_complex=True)
        tu.check_same_structure(
            "adaptive_grad_clip", updates, params, "updates", "params", shapes=True
        )

        def clip(g, p):
            axes = _unit_axes(p.ndim, p.shape, axis)
            g_norm = _unit_norm(g, axes)
            p_norm = _unit_norm(p, axes)
            acc = g_norm.dtype
            bound = tu.as_scalar(clipping, acc) * jnp.maximum(p_norm, tu.as_scalar(eps, acc))
            # One scale per unit (not per element): 1 where within bound.
            too_big = g_norm > bound
            s = jnp.where(too_big, bound / jnp.where(too_big, g_norm, 1.0), 1.0)
            g_acc = tu.compute_dtype(g.dtype, acc)  # complex for a complex g
            return (g.astype(g_acc) * s.astype(g_acc)).astype(g.dtype)

        return jax.tree.map(clip, updates, params), state

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))
