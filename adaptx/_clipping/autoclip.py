"""AutoClip: clip to a percentile of the recent gradient norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._clipping.global_norm import clip_scale
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports(
    "autoclip", "grad_norm", "threshold", "scale", per_tensor=("tensor_grad_norm", "top_tensor")
)
class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      norms: ring buffer (float32, shape ``(history,)``) of the most recent finite
        pre-clip global norms, the current step's included. Only the first
        ``filled`` slots are meaningful; their order does not matter.
      index: slot the next norm is written to (int32, wraps around).
      filled: how many slots of ``norms`` hold a norm (int32, at most ``history``).
      grad_norm: global L2 norm of the incoming gradients at the last step, before
        clipping (float32).
      threshold: the clipping threshold used at the last step, the ``percentile``-th
        percentile of ``norms`` (float32; ``inf`` while no norm has been recorded).
      scale: factor the gradients were multiplied by at the last step, in [0, 1].
      tensor_grad_norm: with ``per_tensor``, each leaf's gradient norm at the last
        step (``TensorFigures``, float32); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last
        intervention (int32 index into ``tensor_grad_norm``; -1 before any).
    """

    norms: jax.Array
    index: jax.Array  # type: ignore[assignment]  # shadows tuple.index
    filled: jax.Array
    grad_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None


def _percentile(norms: jax.Array, filled: jax.Array, q: Any) -> jax.Array:
    """``np.percentile(norms[:filled], q)`` (linear interpolation), ``inf`` if ``filled == 0``.

    Fixed-shape and jit-safe: unfilled slots sort to the end as ``inf`` and are
    never indexed, because the interpolation positions stay below ``filled``.
    """
    size = norms.shape[0]
    valid = jnp.arange(size) < filled
    ordered = jnp.sort(jnp.where(valid, norms, jnp.inf))
    last = jnp.maximum(filled - 1, 0)
    pos = tu.as_scalar(q) / 100.0 * last.astype(jnp.float32)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
    hi = jnp.minimum(lo + 1, last)
    t = pos - lo.astype(jnp.float32)
    a, b = ordered[lo], ordered[hi]
    # NumPy's form of the interpolation: exact at both ends of the interval.
    value = jnp.where(t >= 0.5, b - (b - a) * (1.0 - t), a + (b - a) * t)
    return jnp.where(filled > 0, value, jnp.inf)


def autoclip(
    percentile: jax.typing.ArrayLike = 10.0,
    history: int = 1000,
    *,
    axis_name: Any = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AutoClip: clips the global norm to a percentile of the recent global norms.

    Each step appends the incoming gradient's global norm :math:`\|g_t\|` to a
    history of the last :math:`H` norms, *then* clips to the :math:`p`-th
    percentile of that history, the current norm included:

    .. math::

      \mathcal{H}_t = \bigl(\|g_{\max(1,\,t-H+1)}\|, \dots, \|g_t\|\bigr), \qquad
      c_t = \operatorname{percentile}_p(\mathcal{H}_t), \qquad
      g_t \leftarrow \min\!\left(1, \frac{c_t}{\|g_t\|}\right) g_t .

    The percentile interpolates linearly between order statistics, as
    ``np.percentile`` does by default. Appending before taking the percentile is
    what the authors' reference code does, and it settles the first step: the
    history then holds only :math:`\|g_1\|`, so :math:`c_1 = \|g_1\|` and nothing
    is clipped. With ``percentile=100`` nothing is ever clipped; with a low
    percentile, a norm far above the recent ones is cut back to a typical one.

    The history is a fixed-size ring buffer in the state (float32, ``history``
    slots), so the transform is jit-safe and its state never changes shape. The
    paper's code keeps every norm since the start of training; the bounded window
    (as in the authors' later ``QuantileClip``, which also defaults to 1000) keeps
    memory and the per-step sort constant and lets the threshold follow the decay
    of the gradient norm over training.

    Where this implementation adds to the reference code:

    * A non-finite norm (NaN or ``inf`` gradients) is not written into the
      history, so one bad step cannot disable clipping for the next ``history``
      steps. That step's threshold is the percentile of the recorded norms
      (``inf`` if there are none), so an ``inf`` norm gets scale 0 once any norm
      has been recorded and NaN gradients pass through unchanged; wrap the
      optimizer in :func:`adaptx.guard` to skip such steps.
    * The scale is exactly :math:`\min(1, c_t / \|g_t\|)`; PyTorch's
      ``clip_grad_norm_`` divides by :math:`\|g_t\| + 10^{-6}`.

    An all-zero gradient records a zero norm, as in the reference code. The norm
    is accumulated in float32 or wider whatever the gradients' dtype, and the
    gradients are multiplied by one scalar.

    Args:
      percentile: :math:`p \in [0, 100]`, the percentile of the recent norms to
        clip to. The paper recommends 10. May be a tracer (for
        ``optax.inject_hyperparams``).
      history: :math:`H \ge 1`, how many recent norms to keep. It sizes the
        buffer, so it must be concrete when ``init`` is called (an ``int``, or a
        concrete integer array as ``optax.inject_hyperparams`` passes it);
        ``update`` reads the size from the state.
      axis_name: under ``shard_map``/``pmap``, the mapped axis (or axes) the
        gradient tree is sharded over; the squared norm is summed across it, so
        every shard records and clips by the true global norm.
      per_tensor: also keep each leaf's gradient norm and the leaf that led the last
        intervention, for ``adaptx.telemetry(state, per_tensor=True)`` (no extra pass
        over memory: the global norm is their sum).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AutoClipState`; :func:`adaptx.telemetry` reports ``grad_norm``,
      ``threshold`` and ``scale``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.autoclip(percentile=50.0, history=3)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in [1.0, 2.0, 3.0]:  # first step: nothing to compare with
      ...     updates, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> updates["w"]  # median of (1, 2, 3) is 2
      Array([2., 0.], dtype=float32)
      >>> updates, state = tx.update({"w": jnp.array([40.0, 0.0])}, state)
      >>> updates["w"]  # 1 has left the window: median of (2, 3, 40) is 3
      Array([3., 0.], dtype=float32)
      >>> round(float(adaptx.telemetry(state)["autoclip/scale"]), 4)
      0.075

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
    """
    validate.check_range("autoclip", "percentile", percentile, low=0.0, high=100.0, example="10.0")
    validate.check_int("autoclip", "history", history, low=1, traced_ok=True, example="1000")

    def init_fn(params: optax.Params) -> AutoClipState:
        size = validate.concrete_int("autoclip", "history", history)
        return AutoClipState(
            norms=jnp.zeros([size], jnp.float32),
            index=jnp.zeros([], jnp.int32),
            filled=jnp.zeros([], jnp.int32),
            grad_norm=jnp.zeros([], jnp.float32),
            threshold=jnp.full([], jnp.inf, jnp.float32),
            scale=jnp.ones([], jnp.float32),
            **per_tensor_lib.initial(params, per_tensor),
        )

    def update_fn(
        updates: optax.Updates,
        state: AutoClipState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AutoClipState]:
        del params, extra_args
        tu.check_float_leaves("autoclip", updates)
        norm, leaf_norms = per_tensor_lib.global_norm(updates, axis_name, per_tensor)
        norm32 = norm.astype(jnp.float32)
        record = jnp.isfinite(norm32)
        size = state.norms.shape[0]
        norms = jnp.where(record, state.norms.at[state.index].set(norm32), state.norms)
        filled = jnp.where(record, jnp.minimum(state.filled + 1, size), state.filled)
        index = jnp.where(record, (state.index + 1) % size, state.index)
        threshold = _percentile(norms, filled, percentile)
        s = clip_scale(norm, threshold)
        new_state = AutoClipState(
            norms=norms.astype(state.norms.dtype),
            index=index.astype(state.index.dtype),
            filled=filled.astype(state.filled.dtype),
            grad_norm=norm32.astype(state.grad_norm.dtype),
            threshold=threshold.astype(state.threshold.dtype),
            scale=s.astype(state.scale.dtype),
            **per_tensor_lib.updated(state, leaf_norms, s < 1),
        )
        return tu.scale(updates, s), new_state

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))
