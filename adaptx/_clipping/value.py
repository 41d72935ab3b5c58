"""Element-wise clipping to a fixed range."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


def clip_by_value(max_abs: float | jax.Array) -> optax.GradientTransformationExtraArgs:
    r"""Clips every gradient element to :math:`[-c, c]`.

    .. math::

      g \leftarrow \min(\max(g, -c), c)

    Stateless (``update`` takes any state, ``None`` included). Complex numbers have no
    order, so a complex leaf raises ``TypeError``, as ``optax.clip`` refuses them.
    Unlike global-norm clipping it changes the gradient's direction;
    prefer :func:`adaptx.clip_by_global_norm` unless the element-wise bound is
    what you need.

    Args:
      max_abs: the bound :math:`c \ge 0`. May be a tracer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.clip_by_value(1.0)
      >>> updates, _ = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
      >>> updates
      Array([-1. ,  0.5,  1. ], dtype=float32)

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012.
    """
    validate.check_nonnegative("clip_by_value", "max_abs", max_abs)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params, extra_args
        tu.check_float_leaves(
            "clip_by_value",
            updates,
            allow_complex=False,
            why="complex numbers have no order, so no range to clip to (optax.clip refuses them)",
        )

        def clip(g):
            c = jnp.asarray(max_abs).astype(g.dtype)
            return jnp.clip(g, -c, c)

        return jax.tree.map(clip, updates), state

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))
