"""Global-norm clipping that keeps the pre-clip norm for logging."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._clipping.scalar_clip import scalar_clip
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports("clip_by_global_norm", "grad_norm", "scale", per_tensor=("tensor_grad_norm", "top_tensor"))
class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`.

    Attributes:
      grad_norm: global L2 norm of the incoming gradients at the last step, before
        clipping (float32 scalar).
      scale: factor the gradients were multiplied by at the last step, in [0, 1].
      tensor_grad_norm: with ``per_tensor``, each leaf's gradient norm at the last
        step (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last
        clipped step (int32 index into ``tensor_grad_norm``; -1 before any).
    """

    grad_norm: jax.Array
    scale: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None


def clip_scale(norm: jax.Array, max_norm: Any) -> jax.Array:
    r"""The scalar :math:`\min(1, c / \|g\|)`, safe at :math:`\|g\| = 0` and :math:`c = 0`.

    A NaN norm gives scale 1 (the NaN propagates; guard against it with
    :func:`adaptx.guard`); an infinite norm gives scale 0.
    """
    max_norm = tu.as_scalar(max_norm, norm.dtype)
    clipped = norm > max_norm
    safe_norm = jnp.where(clipped, norm, jnp.ones_like(norm))
    return jnp.where(clipped, max_norm / safe_norm, jnp.ones_like(norm))


def clip_by_global_norm(
    max_norm: float | jax.Array, *, axis_name: Any = None, per_tensor: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the whole gradient tree so that its global L2 norm is at most ``max_norm``.

    .. math::

      \|g\| = \sqrt{\textstyle\sum_i \|g_i\|_2^2}, \qquad
      s = \min\!\left(1, \frac{c}{\|g\|}\right), \qquad g_i \leftarrow s\, g_i .

    The norm is accumulated in float32 (or wider) whatever the leaves' dtype, so
    bf16/fp16 gradients whose norm overflows their own dtype still clip correctly.
    All-zero gradients and ``max_norm == 0`` give zero updates, never NaN. The
    scale is one scalar, applied by a multiply fused into the next elementwise pass.

    The pre-clip norm and the scale are kept in the state and reported by
    :func:`adaptx.telemetry`, so they can be logged without a host sync. Like
    ``optax.clip_by_global_norm``, ``update`` also takes a ``None`` (or
    ``optax.EmptyState``) state, and returns it: the same updates, no telemetry. A
    complex element counts :math:`|z|^2` in the norm, as in optax.

    Args:
      max_norm: the bound :math:`c \ge 0` on the global norm. May be a tracer (for
        ``optax.inject_hyperparams``).
      axis_name: under ``shard_map``/``pmap``, the mapped axis (or axes) the tree
        is sharded over; the squared norm is summed across it, so every shard clips
        by the true global norm rather than its local one.
      per_tensor: also keep each leaf's gradient norm and the leaf that led the last
        clip, for ``adaptx.telemetry(state, per_tensor=True)`` (no extra pass over
        memory: the global norm is their sum).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(grads)
      >>> updates, state = tx.update(grads, state)
      >>> updates["w"]
      Array([0.6, 0.8], dtype=float32)
      >>> adaptx.telemetry(state)["clip_by_global_norm/grad_norm"]
      Array(5., dtype=float32)

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013.
    """
    validate.check_nonnegative("clip_by_global_norm", "max_norm", max_norm)

    def init_fn(params: optax.Params) -> ClipByGlobalNormState:
        one = jnp.ones([], jnp.float32)
        return ClipByGlobalNormState(
            grad_norm=jnp.zeros([], jnp.float32),
            scale=one,
            **per_tensor_lib.initial(params, per_tensor),
        )

    def scale_fn(updates: optax.Updates, state: Any) -> tuple[jax.Array, Any]:
        tu.check_float_leaves("clip_by_global_norm", updates, allow_complex=True)
        norm, leaf_norms = per_tensor_lib.global_norm(updates, axis_name, per_tensor)
        # max_norm = 0 zeroes every gradient, even one whose squares underflow float32
        # (|g| below about 1e-19) and whose computed norm is therefore 0.
        s = jnp.where(tu.as_scalar(max_norm, norm.dtype) > 0, clip_scale(norm, max_norm), 0.0)
        if state is None or isinstance(state, optax.EmptyState):  # optax's stateless form
            return s, state
        new_state = ClipByGlobalNormState(
            grad_norm=norm.astype(state.grad_norm.dtype),
            scale=s.astype(state.scale.dtype),
            **per_tensor_lib.updated(state, leaf_norms, s < 1),
        )
        return s, new_state

    return scalar_clip(init_fn, scale_fn)
