"""The loss a transformation receives as ``value=`` (optax's name) or ``loss=`` (levanter's).

``tx.update(grads, state, params, value=loss)``, as ``optax.contrib.reduce_on_plateau``
and the line searches take it; with ``flax.nnx``, ``optimizer.update(model, grads,
value=loss)``. ``loss=loss`` is the same. Read by :func:`adaptx.guard` and
:func:`adaptx.rewind`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def read(
    fn: str, extra_args: dict, *, needed_by: str | None = None, axis_name: Any = None
) -> jax.Array | None:
    """The scalar loss passed as ``value=``, as float32, or ``None`` when there is none.

    Reads ``value`` or ``loss``. Raises ``ValueError`` when the loss is not a real scalar,
    or is missing although ``needed_by`` (a description of what needs it, e.g.
    ``"loss_z=6.0"``) is given. Under ``shard_map``/``pmap``, ``axis_name`` averages it
    so every shard sees the same loss.
    """
    value = _one_of(fn, extra_args.get("value"), extra_args.get("loss"))
    if value is None:
        if needed_by is not None:
            raise ValueError(
                f"{fn}: {needed_by} needs the loss, but neither `value` nor `loss` was "
                "passed. Call tx.update(grads, state, params, value=loss) "
                "(or nnx_optimizer.update(model, grads, value=loss))."
            )
        return None
    try:
        v = jnp.asarray(value)
    except TypeError:
        v = None
    if (
        v is None
        or v.ndim != 0
        or not (jnp.issubdtype(v.dtype, jnp.floating) or v.dtype.kind in "iu")
    ):
        raise ValueError(
            f"{fn}: `value` must be the scalar loss, got "
            + (f"value={value!r}" if v is None else f"value of shape {v.shape}, dtype {v.dtype}")
            + ". Pass e.g. value=loss where loss = jnp.mean(per_example_losses)."
        )
    v = v.astype(jnp.float32)
    return v if axis_name is None else jax.lax.pmean(v, axis_name)


def _one_of(fn: str, value: Any, loss: Any) -> Any:
    """The loss given as ``value=`` or ``loss=``; both only when they are one and the same."""
    if value is None or loss is None or value is loss:
        return loss if value is None else value
    if isinstance(value, jax.core.Tracer) or isinstance(loss, jax.core.Tracer):
        same = False  # two traced values cannot be compared here
    else:
        try:
            same = bool(jnp.asarray(value) == jnp.asarray(loss))
        except (TypeError, ValueError):
            same = False
    if not same:
        raise ValueError(
            f"{fn}: the loss was passed twice with different values, value={value!r} and "
            f"loss={loss!r}. Pass it once, as value=loss (optax's name) or loss=loss."
        )
    return value
