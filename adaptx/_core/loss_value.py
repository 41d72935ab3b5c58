"""The loss a transformation receives as ``value=``, the optax extra-args convention.

``tx.update(grads, state, params, value=loss)``, as ``optax.contrib.reduce_on_plateau``
and the line searches take it; with ``flax.nnx``, ``optimizer.update(model, grads,
value=loss)``. Read by :func:`adaptx.guard` and :func:`adaptx.rewind`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def read(
    fn: str, extra_args: dict, *, needed_by: str | None = None, axis_name: Any = None
) -> jax.Array | None:
    """The scalar loss passed as ``value=``, as float32, or ``None`` when there is none.

    Raises ``ValueError`` when ``value`` is not a real scalar, or is missing although
    ``needed_by`` (a description of what needs it, e.g. ``"loss_z=6.0"``) is given. Under
    ``shard_map``/``pmap``, ``axis_name`` averages it so every shard sees the same loss.
    """
    value = extra_args.get("value")
    if value is None:
        if needed_by is not None:
            raise ValueError(
                f"{fn}: {needed_by} needs the loss, but no `value` was passed. "
                "Call tx.update(grads, state, params, value=loss) "
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
