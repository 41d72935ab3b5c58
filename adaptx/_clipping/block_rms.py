"""Per-tensor RMS clipping."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports("clip_by_block_rms", "tensors_clipped")
class ClipByBlockRmsState(NamedTuple):
    """State of :func:`clip_by_block_rms`.

    ``tensors_clipped`` is a counter: it means what ``adaptx._core.telemetry.COUNTERS``
    says, in every state that reports it.

    Attributes:
      tensors_clipped: tensors (blocks) scaled down at the last step (int32).
    """

    tensors_clipped: jax.Array


def clip_by_block_rms(threshold: float | jax.Array) -> optax.GradientTransformationExtraArgs:
    r"""Scales each tensor so that its root-mean-square is at most ``threshold``.

    For every leaf (block) :math:`g_b` with :math:`n_b` elements:

    .. math::

      \operatorname{rms}(g_b) = \sqrt{\tfrac{1}{n_b} \textstyle\sum_j g_{b,j}^2}, \qquad
      g_b \leftarrow \frac{g_b}{\max\!\left(1, \operatorname{rms}(g_b) / \tau\right)} .

    The mean of squares is accumulated in float32 or wider; a complex element counts
    :math:`|z|^2`. Gives the same numbers as ``optax.clip_by_block_rms``. The state
    counts how many blocks were clipped; like optax's, ``update`` also takes a ``None``
    (or ``optax.EmptyState``) state, and returns it, counting nothing.

    Args:
      threshold: the bound :math:`\tau > 0` on each block's RMS. May be a tracer.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.clip_by_block_rms(1.0)
      >>> grads = {"a": jnp.array([2.0, -2.0]), "b": jnp.array([0.5, 0.5])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> updates["a"], updates["b"]
      (Array([ 1., -1.], dtype=float32), Array([0.5, 0.5], dtype=float32))
      >>> int(state.tensors_clipped)
      1

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
      Cost <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping by block RMS).
    """
    validate.check_positive("clip_by_block_rms", "threshold", threshold)

    def init_fn(params: optax.Params) -> ClipByBlockRmsState:
        del params
        return ClipByBlockRmsState(tensors_clipped=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: ClipByBlockRmsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ClipByBlockRmsState]:
        del params, extra_args
        tu.check_float_leaves("clip_by_block_rms", updates, allow_complex=True)
        leaves, treedef = jax.tree.flatten(updates)
        out, clipped = [], []
        for g in leaves:
            acc = tu.compute_dtype(g.dtype)
            real = tu.real_dtype(acc)
            g32 = g.astype(acc)
            rms = jnp.sqrt(jnp.mean(tu.abs_sq(g32)))
            denom = jnp.maximum(jnp.ones([], real), rms / tu.as_scalar(threshold, real))
            clipped.append((denom > 1).astype(jnp.int32))
            out.append((g32 * (1 / denom).astype(acc)).astype(g.dtype))
        num = sum(clipped[1:], clipped[0]) if clipped else jnp.zeros([], jnp.int32)
        out = jax.tree.unflatten(treedef, out)
        if state is None or isinstance(state, optax.EmptyState):  # optax's stateless form
            return out, state
        return out, ClipByBlockRmsState(tensors_clipped=num)

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))
