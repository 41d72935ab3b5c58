"""Flax NNX: undoing what a skipped step's forward pass changed in the model.

Flax is imported when :func:`restore_on_skip` is called, so adaptx itself does not need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from adaptx._guards.guard import GuardState
from adaptx._telemetry import _unwrap, find_states

_FN = "restore_on_skip"


def _reasons(optimizer: Any) -> list[jax.Array]:
    """Every guard's ``last_reason`` in the optimizer's state, outer first."""
    return [_unwrap(state.last_reason) for _, state in find_states(optimizer, GuardState)]


def _select(skipped: jax.Array, before: Any, after: Any) -> Any:
    """``after`` with each leaf that ``before`` also holds, in the same shape, put back
    where ``skipped``; leaves the step created are left as they are."""
    old = {path: x for path, x in jax.tree_util.tree_flatten_with_path(before)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(after)
    out = []
    for path, new in leaves:
        prev = old.get(path)
        if prev is not None and jnp.shape(prev) == jnp.shape(new):
            new = jnp.where(skipped, prev, new)
        out.append(new)
    treedef_: Any = treedef  # jaxlib's PyTreeDef has no type stubs
    return treedef_.unflatten(out)


@contextlib.contextmanager
def restore_on_skip(model: Any, optimizer: Any) -> Iterator[None]:
    """Puts back the model's non-parameter state when the optimizer's guard skips the step.

    :func:`adaptx.guard` protects what the optimizer owns: on a skipped step the
    parameters and the optimizer state are left bit-identical. It cannot protect what the
    forward pass changed before the optimizer saw the gradients: the running statistics of
    ``nnx.BatchNorm`` (``nnx.BatchStat``), and any other non-``nnx.Param`` variable the
    step writes (caches, counters). A NaN batch leaves its NaN in those, and every later
    evaluation is NaN although the guard skipped the step. Wrap the step in this:

    .. code-block:: python

      @nnx.jit
      def train_step(model, optimizer, batch):
          with adaptx.restore_on_skip(model, optimizer):
              loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
              optimizer.update(model, grads, value=loss)
          return loss

    On entry it keeps ``nnx.state(model, nnx.Not(nnx.Param))``; on exit, if a guard in
    ``optimizer`` skipped this step (its ``last_reason`` is nonzero), it puts it back with
    ``jnp.where``: no host sync and no recompilation, inside ``nnx.jit`` or outside it.
    Variables the step created are left as they are. Call ``optimizer.update`` inside the
    block: the guard decides there. If the block raises, nothing is put back.

    Args:
      model: the ``flax.nnx`` module (or any nnx graph node) the step runs.
      optimizer: the ``nnx.Optimizer`` updating it; its ``tx`` must hold an
        :func:`adaptx.guard` (as :func:`adaptx.robust_adamw` does).

    Returns:
      A context manager (``with``; it yields nothing).

    Raises:
      ValueError: on entry, if ``optimizer`` holds no guard; on exit, if
        ``optimizer.update`` was not called inside the block.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> optimizer = nnx.Optimizer(model, adaptx.robust_adamw(1e-2), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x):
      ...     with adaptx.restore_on_skip(model, optimizer):
      ...         loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      ...         optimizer.update(model, grads, value=loss)
      ...     return loss
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> _ = train_step(model, optimizer, x)
      >>> before = model.layers[1].mean[...]
      >>> _ = train_step(model, optimizer, x * jnp.nan)   # skipped by the guard
      >>> bool(jnp.array_equal(model.layers[1].mean[...], before))
      True
    """
    from flax import nnx

    reasons = _reasons(optimizer)
    if not reasons:
        raise ValueError(
            f"{_FN}: the optimizer holds no adaptx.guard, so no step is ever skipped and "
            f"there is nothing to restore; got optimizer={type(optimizer).__name__}. Build it "
            "with a guard, e.g. nnx.Optimizer(model, adaptx.guard(tx), wrt=nnx.Param) or "
            "adaptx.robust_adamw(1e-3)."
        )
    before = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    yield
    after = _reasons(optimizer)
    if len(after) == len(reasons) and all(a is b for a, b in zip(after, reasons, strict=True)):
        raise ValueError(
            f"{_FN}: the optimizer's guard state did not change inside the block, so it "
            "cannot tell whether this step was skipped. Call optimizer.update(model, grads) "
            "inside the `with adaptx.restore_on_skip(model, optimizer):` block."
        )
    skipped = jnp.any(jnp.stack([jnp.asarray(r) != 0 for r in after]))
    state = nnx.state(model, nnx.Not(nnx.Param))
    nnx.replace_by_pure_dict(state, _select(skipped, before, nnx.to_pure_dict(state)))
    nnx.update(model, state)
