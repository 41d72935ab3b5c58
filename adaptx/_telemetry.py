"""Reading what adaptx transforms measured out of any optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adaptx._core.per_tensor import TensorFigures
from adaptx._core.telemetry import per_tensor_fields, registered


def _unwrap(x: Any) -> Any:
    """The array inside a ``flax.nnx`` variable (``OptArray``), or ``x`` itself."""
    if hasattr(x, "get_value") and not isinstance(x, jax.Array):
        return x.get_value()
    return x


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _scalar(x: Any) -> jax.Array:
    x = jnp.asarray(_unwrap(x))
    return x if x.ndim == 0 else jnp.mean(x.astype(jnp.float32))


def find_states(opt_state: Any, cls: type | None = None) -> list[tuple[str, Any]]:
    """Every registered adaptx state in ``opt_state`` (optionally of one class), with its path.

    States nested inside other registered states (a transform inside
    :func:`adaptx.guard`) are found too, outer first.
    """
    opt_state = getattr(opt_state, "opt_state", opt_state)  # a flax.nnx.Optimizer
    out: list[tuple[tuple, Any]] = []

    def walk(tree: Any, prefix: tuple) -> None:
        found = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: x is not tree and registered(x) is not None
        )[0]
        for path, node in found:
            if node is tree or registered(node) is None:
                continue
            out.append((prefix + tuple(path), node))
            walk(node, prefix + tuple(path))

    if registered(opt_state) is not None:
        out.append(((), opt_state))
    walk(opt_state, ())
    return [
        ("/".join(_key_name(k) for k in path), node)
        for path, node in out
        if cls is None or isinstance(node, cls)
    ]


def _per_tensor(node: Any, prefix: str) -> dict[str, jax.Array]:
    """One key per leaf for each per-tensor figure of ``node``, and its leading leaf."""
    out: dict[str, jax.Array] = {}
    for field in per_tensor_fields(node):
        value = getattr(node, field)
        if value is None:
            continue
        if isinstance(value, TensorFigures):
            values = jnp.asarray(_unwrap(value.values))
            for i, path in enumerate(value.paths):
                out[f"{prefix}/{field}/{path}"] = values[i]
        else:
            out[f"{prefix}/{field}"] = jnp.asarray(_unwrap(value))
    return out


def telemetry(opt_state: Any, per_tensor: bool = False) -> dict[str, jax.Array]:
    """Every figure adaptx transforms keep in their state, as a flat dict of scalars.

    Walks any optimizer state: adaptx transforms nested anywhere inside
    ``optax.chain``, ``optax.masked``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, :func:`adaptx.guard`, or the ``opt_state`` of a
    ``flax.nnx.Optimizer`` (pass the optimizer or its ``opt_state``). Keys are
    ``"<transform>/<figure>"``, e.g. ``"clip_by_global_norm/grad_norm"``; when a
    transform appears more than once, each key is prefixed with its path in the
    state tree (``"0/clip_by_global_norm/grad_norm"``). Values are 0-d
    ``jax.Array``; a per-tensor figure is reported by its mean.

    Pure and cheap: inside ``jax.jit`` it adds no computation beyond those means,
    and outside it performs no host transfer, so it can be returned from a jitted
    train step and logged asynchronously.

    With ``per_tensor=True``, the transforms built with ``per_tensor=True`` add one
    key per parameter leaf, ``"<transform>/<figure>/<param path>"`` (the figure's name
    starts with ``tensor_``, e.g. ``"clip_spikes/tensor_grad_norm/encoder/layers/0/
    kernel"``, the path written as the parameter tree names it), and
    ``"<transform>/top_tensor"``: the position, among that transform's per-tensor keys,
    of the leaf that led its last intervention (-1 before any).

    Args:
      opt_state: an optimizer state, or a ``flax.nnx.Optimizer``.
      per_tensor: also report the per-tensor figures.

    Returns:
      ``dict[str, jax.Array]`` of scalars, in the order the transforms appear in
      the state; empty if the state holds no adaptx measurements.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = optax.chain(adaptx.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([6.0, 8.0])}, state)
      >>> {k: round(float(v), 4) for k, v in adaptx.telemetry(state).items()}
      {'clip_by_global_norm/grad_norm': 10.0, 'clip_by_global_norm/scale': 0.1}
    """
    states = find_states(opt_state)
    regs = [registered(node) for _, node in states]
    assert all(r is not None for r in regs)  # find_states keeps registered nodes only
    names = [r[0] for r in regs if r is not None]
    out: dict[str, jax.Array] = {}
    for (path, node), name, reg in zip(states, names, regs, strict=True):
        prefix = name if names.count(name) == 1 else f"{path}/{name}"
        for field in reg[1] if reg is not None else ():
            value = getattr(node, field)
            if value is not None:  # a figure the transform was not asked to keep
                out[f"{prefix}/{field}"] = _scalar(value)
        if per_tensor:
            out.update(_per_tensor(node, prefix))
    return out
