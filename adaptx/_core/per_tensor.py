"""One float32 figure per parameter leaf, kept in a transform's state with the leaves' paths.

The transforms that reduce per leaf anyway (a global norm is a sum of per-leaf sums of
squares; AdaGC clips per tensor; update clipping has a per-tensor RMS) can keep those
per-leaf numbers instead of throwing them away. They cost no pass over memory: each is
a scalar that the step already computes. :class:`TensorFigures` holds them as one
float32 vector, one entry per leaf, with the leaves' paths as static data (part of the
tree structure, not arrays), so :func:`adaptx.telemetry` can name each figure by its
parameter path from the state alone, inside or outside ``jit``, and in an
``nnx.Optimizer``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaptx._core import tree as tu


@jax.tree_util.register_pytree_node_class
class TensorFigures:
    """A float32 vector of per-leaf figures, and the paths of the leaves they belong to.

    Attributes:
      values: float32 array of shape ``[len(paths)]``.
      paths: the leaves' paths, ``"encoder/layers/0/kernel"``, in tree order (static).
    """

    def __init__(self, values: Any, paths: tuple[str, ...]):
        self.values = values
        self.paths = paths

    def tree_flatten(self):
        return (self.values,), self.paths

    @classmethod
    def tree_unflatten(cls, paths, children):
        return cls(children[0], paths)

    def replace(self, values: Any) -> TensorFigures:
        return TensorFigures(values, self.paths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorFigures):
            return NotImplemented
        a, b = self.values, other.values
        same = a is b or (
            np.array_equal(np.asarray(a), np.asarray(b))
            if hasattr(a, "shape") and hasattr(b, "shape")
            else a == b
        )
        return self.paths == other.paths and bool(same)

    __hash__ = None  # type: ignore[assignment]  # equal by value, like the arrays it holds

    def __repr__(self) -> str:
        return f"TensorFigures({len(self.paths)} leaves)"


def _key(k: Any) -> str | None:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
        return None  # an nnx Variable's array: the path names the variable
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_string(path: tuple) -> str:
    """A tree path as the parameter tree names it, joined with "/"."""
    return "/".join(s for s in (_key(k) for k in path) if s is not None)


def paths(tree: Any) -> tuple[str, ...]:
    """The paths of ``tree``'s leaves, in tree order."""
    return tuple(path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def zeros(tree: Any) -> TensorFigures:
    """Zero figures for every leaf of ``tree`` (a fresh state)."""
    names = paths(tree)
    return TensorFigures(jnp.zeros([len(names)], jnp.float32), names)


def leaf_sums_of_squares(tree: Any, axis_name: Any = None) -> jax.Array:
    """Each leaf's sum of squares (|z|^2 for complex), float32 or wider, as one vector.

    As in ``adaptx._core.tree.sum_of_squares``, a tree of many small leaves does not get
    one reduction kernel per leaf (on thousands of leaves, XLA's compile time grows with
    the kernel count). The small leaves are concatenated exactly as that function does
    (so XLA computes the concatenation once for both, and once for a packed Adam's flat
    buffer of the same leaves), and each run of consecutive equal-size leaves is read
    back as rows and reduced along them: on a tree of equal small leaves, one reduction
    that XLA fuses with the concatenation, so nothing more is written. Reduced
    across ``axis_name`` with one collective when given, so under ``shard_map`` the
    figures are the global ones, not a shard's.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([0], jnp.float32)
    acc = tu.compute_dtype(*(x.dtype for x in leaves))
    real = tu.real_dtype(acc)

    def sq(x):
        return jnp.sum(tu.abs_sq(x.astype(acc if jnp.iscomplexobj(x) else real)))

    small = [i for i, x in enumerate(leaves) if x.size <= tu.SMALL_LEAF]
    if len(small) < tu.MANY_SMALL_LEAVES:
        out = jnp.stack([sq(x) for x in leaves])
    else:
        flat_dt = acc if any(jnp.iscomplexobj(leaves[i]) for i in small) else real
        flat = tu.abs_sq(jnp.concatenate([jnp.ravel(leaves[i]).astype(flat_dt) for i in small]))
        order = [i for i, x in enumerate(leaves) if x.size > tu.SMALL_LEAF]
        parts = [jnp.stack([sq(leaves[i]) for i in order])] if order else []
        start = 0
        for run in _runs([leaves[i].size for i in small]):
            size = leaves[small[run[0]]].size
            rows = flat[start : start + len(run) * size].reshape(len(run), size)
            parts.append(jnp.sum(rows, axis=1))
            order.extend(small[k] for k in run)
            start += len(run) * size
        where = np.empty(len(leaves), np.int32)
        where[np.asarray(order)] = np.arange(len(order), dtype=np.int32)
        out = jnp.concatenate([p.astype(real) for p in parts])[jnp.asarray(where)]
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


def _runs(sizes: list[int]) -> list[list[int]]:
    """Positions of consecutive equal sizes, one list per run."""
    runs: list[list[int]] = []
    for k, size in enumerate(sizes):
        if runs and sizes[runs[-1][0]] == size:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def global_norm(tree: Any, axis_name: Any, per_tensor: bool) -> tuple[jax.Array, Any]:
    """The global norm, and with ``per_tensor`` each leaf's norm (float32 vector, else None).

    Without ``per_tensor`` this is ``adaptx._core.tree.global_norm``; with it, the norm is
    the square root of the per-leaf sums' total (the same number to rounding).
    """
    if not per_tensor:
        return tu.global_norm(tree, axis_name), None
    sq = leaf_sums_of_squares(tree, axis_name)
    return jnp.sqrt(jnp.sum(sq)), jnp.sqrt(sq).astype(jnp.float32)


def top(values: jax.Array) -> jax.Array:
    """Index (int32) of the leaf with the largest figure; -1 for an empty tree."""
    if values.shape[0] == 0:
        return jnp.asarray(-1, jnp.int32)
    return jnp.argmax(values).astype(jnp.int32)


def keep_top(intervened: jax.Array, values: jax.Array, previous: jax.Array) -> jax.Array:
    """The leading leaf of this step when the transform intervened, else the last one."""
    return jnp.where(intervened, top(values), previous).astype(jnp.int32)


def initial(params: Any, on: bool, figure: str = "tensor_grad_norm") -> dict:
    """The per-tensor fields of a fresh state: zeros and no leading leaf (or none when off)."""
    if not on:
        return {}
    return {figure: zeros(params), "top_tensor": jnp.full([], -1, jnp.int32)}


def updated(
    state: Any, values: jax.Array | None, intervened: jax.Array, figure: str = "tensor_grad_norm"
) -> dict:
    """The per-tensor fields after a step: this step's ``values``, and the leaf that led
    the last intervention (``intervened``: this step's; otherwise the one before)."""
    if values is None:
        return {}
    return {
        figure: getattr(state, figure).replace(values),
        "top_tensor": keep_top(intervened, values, state.top_tensor),
    }
