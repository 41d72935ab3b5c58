"""Gradient accumulation over micro-batches that drops the non-finite ones."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import loss_value, validate
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core.telemetry import reports


@reports("accumulate", "micro_step", "window_finite", "window_dropped", "dropped")
class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      micro_step: micro-batches taken into the current window (int32), from 0 to
        ``every_k_steps - 1``; 0 again once the window is closed.
      grad_sum: the sum of the window's finite micro-gradients, one array per parameter
        (float32, or the parameter's dtype if wider).
      loss_sum: the sum of the window's finite losses (float32; 0 when no loss is passed).
      window_finite: finite micro-batches in the current window, or in the last one once it
        is closed (int32).
      window_dropped: micro-batches dropped in the current window, or in the last one once
        it is closed (int32).
      dropped: micro-batches dropped so far (int32, saturating).
      inner_state: the wrapped transformation's state: it advances once per window that
        holds a finite micro-batch.
    """

    micro_step: jax.Array
    grad_sum: optax.Updates
    loss_sum: jax.Array
    window_finite: jax.Array
    window_dropped: jax.Array
    dropped: jax.Array
    inner_state: optax.OptState


class _Window(NamedTuple):
    """What one micro-batch does to the window (see :func:`_take`)."""

    start: jax.Array  # this micro-batch opens a window: the sums start from zero
    keep: jax.Array  # it is finite (or skip_nonfinite is off): it enters the sums
    emit: jax.Array  # it closes the window: the inner transform takes the step
    finite: jax.Array  # the window's finite micro-batches, this one included
    dropped: jax.Array  # the window's dropped micro-batches, this one included


def _take(
    state: AccumulateState, k: int, updates: Any, loss: jax.Array | None, skip_nonfinite: bool
) -> _Window:
    """The window after this micro-batch: its verdict, and whether the window closes."""
    keep = jnp.ones([], bool)
    if skip_nonfinite:
        # The guard's test of a step: the sum of squares (float32 or wider) is finite.
        keep = jnp.isfinite(tu.sum_of_squares(updates))
        if loss is not None:
            keep &= jnp.isfinite(loss)
    start = state.micro_step == 0
    zero = jnp.zeros([], jnp.int32)
    finite = jnp.where(start, zero, state.window_finite) + keep.astype(jnp.int32)
    dropped = jnp.where(start, zero, state.window_dropped) + (~keep).astype(jnp.int32)
    emit = state.micro_step >= k - 1
    return _Window(start, keep, emit, finite, dropped)


def _inner_args(extra_args: dict[str, Any], mean_loss: jax.Array) -> dict[str, Any]:
    """The extra arguments for the inner transform: the window's mean loss for its loss."""
    return {
        key: mean_loss if key in ("value", "loss") and value is not None else value
        for key, value in extra_args.items()
    }


def accumulate(
    inner: optax.GradientTransformation,
    every_k_steps: int,
    *,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates micro-batch gradients; a non-finite micro-batch is dropped, not averaged in.

    ``optax.MultiSteps(inner, every_k_steps)``'s contract: ``update`` takes one
    micro-batch's gradients at a time, returns zero updates on the first :math:`k-1`
    micro-steps of each window and, on the :math:`k`-th, the update of ``inner`` applied
    to the mean of the window's micro-gradients; ``inner``'s state advances once per
    window. Unlike ``MultiSteps``, a micro-batch whose gradients are not all finite (their
    sum of squares is not finite, the guard's test), or whose loss passed as
    ``value=``/``loss=`` is not, is dropped: the mean is taken over the finite ones,

    .. math::

      \bar g = \frac{1}{|F|} \sum_{i \in F} g_i, \qquad
      F = \{ i \le k : g_i \text{ and } \ell_i \text{ finite} \},

    so one bad micro-batch costs a window its share of the data, not the whole step (and
    one NaN no longer poisons the average). If every micro-batch of a window is bad, the
    :math:`k`-th step is skipped: ``inner`` runs under the skip protocol (an adaptx inner
    transform keeps its own state, any other has its state selected), and the updates are
    zero. With ``skip_nonfinite=False`` every micro-batch is averaged in, as in
    ``MultiSteps``.

    The sum is kept in float32 (or the parameters' dtype if wider), whatever the
    gradients' dtype, and the mean is handed to ``inner`` in the gradients' dtype. When a
    loss is passed, ``inner`` receives the mean of the window's finite losses in its place
    (a guard inside sees the window's loss, not the last micro-batch's). ``inner`` is
    traced once and runs at every micro-step, as in ``MultiSteps``; on all but the
    :math:`k`-th it is told to skip, so its state is held.

    Inside :func:`adaptx.guard` (or any transform that passes the skip decision down), a
    micro-batch the guard skips leaves this state, the window included, as it was.

    Args:
      inner: the transformation to run once per window (typically a whole optimizer).
      every_k_steps: :math:`k \ge 1`, micro-batches per window (a Python int).
      skip_nonfinite: drop micro-batches whose gradients or loss are not finite.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AccumulateState`; it honours the decision of a guard around it.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.accumulate(optax.sgd(1.0), 3)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for g in ([1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0]):
      ...     updates, state = tx.update(jnp.array(g), state, params)
      >>> updates  # minus the mean of the two finite micro-batches
      Array([-2., -3.], dtype=float32)
      >>> {k: int(v) for k, v in adaptx.telemetry(state).items()}
      {'accumulate/micro_step': 0, 'accumulate/window_finite': 2,
       'accumulate/window_dropped': 1, 'accumulate/dropped': 1}

    References:
      Goyal et al., `Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour
      <https://arxiv.org/abs/1706.02677>`_, 2017 (a large batch as the mean of smaller ones).

      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping non-finite steps).
    """
    fn = "accumulate"
    _check_args(fn, inner, every_k_steps, skip_nonfinite)
    k = int(every_k_steps)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> AccumulateState:
        return _init_state(params, inner.init(params))

    def update_fn(
        updates: optax.Updates,
        state: AccumulateState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AccumulateState]:
        tu.check_float_leaves(fn, updates, allow_complex=True)
        tu.check_same_structure(
            fn, updates, state.grad_sum, "updates", "state.grad_sum", shapes=True
        )
        loss = loss_value.read(fn, extra_args)
        outer = skip_lib.decision(extra_args)
        w = _take(state, k, updates, loss, skip_nonfinite)
        n = jnp.maximum(w.finite, 1)

        def leaf(g: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
            zero = jnp.zeros([], s.dtype)
            total = jnp.where(w.start, zero, s) + jnp.where(w.keep, g.astype(s.dtype), zero)
            mean = (total / n.astype(s.dtype)).astype(g.dtype)
            return mean, skip_lib.hold(outer, s, total)

        mean, grad_sum = tu.unzip(jax.tree.map(leaf, updates, state.grad_sum), updates, 2)
        loss_sum = jnp.where(w.start, jnp.zeros([], jnp.float32), state.loss_sum)
        if loss is not None:
            loss_sum = loss_sum + jnp.where(w.keep, loss, jnp.zeros([], jnp.float32))
        inner_args = _inner_args(extra_args, loss_sum / n.astype(jnp.float32))
        # Told to skip on every micro-step but the window's last, and on that one when
        # every micro-batch was dropped (or a guard around this one skips).
        skip = skip_lib.combine(~w.emit | (w.finite == 0), extra_args)
        out, inner_state = skip_lib.run(inner, skip, mean, state.inner_state, params, inner_args)
        new = AccumulateState(
            micro_step=jnp.where(w.emit, 0, state.micro_step + 1).astype(jnp.int32),
            grad_sum=grad_sum,
            loss_sum=loss_sum,
            window_finite=w.finite,
            window_dropped=w.dropped,
            dropped=tu.count_if(~w.keep, state.dropped),
            inner_state=inner_state,
        )
        # An outer guard's skip leaves the whole window as it was (grad_sum: held above).
        return out, skip_lib.hold_fields(outer, state, new, held=("inner_state", "grad_sum"))

    return skip_lib.Honouring(init_fn, update_fn)


def _check_args(fn: str, inner: Any, every_k_steps: Any, skip_nonfinite: Any) -> None:
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(
            f"{fn}: `inner` must be an optax GradientTransformation, got inner={inner!r}. "
            "Pass e.g. inner=adaptx.adamw(1e-3)."
        )
    validate.check_int(fn, "every_k_steps", every_k_steps, low=1, example="4")
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(
            f"{fn}: `skip_nonfinite` must be a bool, got skip_nonfinite={skip_nonfinite!r}. "
            "Pass e.g. skip_nonfinite=True."
        )


def _init_state(params: optax.Params, inner_state: optax.OptState) -> AccumulateState:
    def counter() -> jax.Array:  # a buffer of its own: the state may be donated
        return jnp.zeros([], jnp.int32)

    return AccumulateState(
        micro_step=counter(),
        grad_sum=jax.tree.map(lambda p: jnp.zeros_like(p, tu.compute_dtype(p.dtype)), params),
        loss_sum=jnp.zeros([], jnp.float32),
        window_finite=counter(),
        window_dropped=counter(),
        dropped=counter(),
        inner_state=inner_state,
    )
