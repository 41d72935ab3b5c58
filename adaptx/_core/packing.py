"""Small leaves packed into flat buffers, so one fused pass serves them all.

On a tree of many small leaves (biases and norm scales, or the hundreds of layers of
a deep model) an optimizer step costs kernels and buffers, not bandwidth: a per-leaf
Adam compiles three kernels and carries two state buffers for every leaf, and XLA's
compile time grows faster than the number of kernels.

A transform that packs keeps the per-element state of every leaf with at most
``max_size`` elements in one flat buffer per dtype. Each step it concatenates those
leaves' inputs once, runs its per-element update once over the flat buffers, and
cuts each leaf's output back out of them. Larger leaves keep their own buffers and
their own fused pass, since packing them would add a copy of the gradient and of the
update per step.

Which leaf sits where is static: a :class:`Layout` (shapes, dtypes, groups, each packed
leaf's start), carried as the pytree aux data of the packed state, never as arrays in
it. A tree map or a cast over the state (``jax.tree.map(jnp.zeros_like, state)``, a
dtype round trip, a checkpoint restore) therefore cannot move a leaf. Each leaf is cut
out with a static slice. On XLA:CPU a static slice at each leaf's own offset is a
kernel of its own, so on a tree of thousands of small leaves the step compiles slower
than with offsets read at run time (which shared one kernel per shape, but had to live
in the state as arrays, where a tree map could rewrite them):
``bench/measured/explicit_core.md`` gives the measurement.

The tree interface is unchanged: ``init(params)`` and ``update(grads, state)`` take
and return the user's tree; only the state's layout differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every leaf of a tree lives in a packed state (static, hashable).

    Attributes:
      treedef: the structure of the tree the state was initialised with.
      keys: each leaf's full path (``jax.tree_util.keystr``), which the state's
        unpacked leaves carry as their key.
      paths: each leaf's path (``jax.tree_util.keystr``), without a trailing ``.value``:
        a state initialised from parameters wrapped in variables (``flax.nnx.Param``)
        serves gradients that are the same tree of plain arrays.
      shapes: each leaf's shape, in flattening order.
      dtypes: each leaf's dtype at ``init``.
      groups: the indices of the packed leaves, one tuple per dtype.
      big: the indices of the leaves that keep their own buffers.
      starts: each packed leaf's start in its group's flat buffer, in the order of
        ``groups`` (leaf by leaf, group after group).
    """

    treedef: Any
    keys: tuple[str, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    groups: tuple[tuple[int, ...], ...]
    big: tuple[int, ...]
    starts: tuple[int, ...]

    def size(self, i: int) -> int:
        return int(np.prod(self.shapes[i], dtype=np.int64))

    def group_size(self, k: int) -> int:
        return sum(self.size(i) for i in self.groups[k])


def is_sharded(x: Any) -> bool:
    """Whether ``x``'s abstract sharding splits it across devices.

    Read from the abstract value (``jax.typeof(x).sharding``), which is the same for a
    concrete array, a tracer under ``jit`` and a ``jax.ShapeDtypeStruct``: the layout
    does not depend on where ``init`` runs. A mesh with explicit axes (``jax.make_mesh``'s
    default) carries the partition spec in it; under automatic (``Auto``) axes nothing
    is known and the leaf counts as replicated.
    """
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
    if sharding is None and not isinstance(x, jax.ShapeDtypeStruct):
        try:
            sharding = jax.typeof(x).sharding
        except (AttributeError, TypeError):
            return False
    spec = getattr(sharding, "spec", None)
    return spec is not None and any(s is not None for s in spec)


def plan(tree: Any, max_size: int) -> Layout:
    """The layout that packs every leaf of ``tree`` with at most ``max_size`` elements.

    A leaf known to be sharded (see :func:`is_sharded`) is never packed: concatenating
    it would gather it onto every device.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [x for _, x in flat]
    keys = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    paths = tuple(_path(p) for p, _ in flat)
    shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
    dtypes = tuple(jnp.dtype(jnp.result_type(x)) for x in leaves)
    groups: dict[Any, list[int]] = {}
    big = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes, strict=True)):
        if int(np.prod(shape, dtype=np.int64)) <= max_size and not is_sharded(leaves[i]):
            groups.setdefault(dt, []).append(i)
        else:
            big.append(i)
    groups_ = tuple(tuple(g) for g in groups.values())
    starts = []
    for g in groups_:
        offset = 0
        for i in g:
            starts.append(offset)
            offset += int(np.prod(shapes[i], dtype=np.int64))
    return Layout(treedef, keys, paths, shapes, dtypes, groups_, tuple(big), tuple(starts))


def _path(path: tuple) -> str:
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path) or "<root>"


class LeafKey:
    """A path entry that prints as a whole parameter path, e.g. ``['dense']['kernel']``.

    An unpacked leaf of a :class:`PackedTree` carries its parameter's path, so a state
    path such as ``[1].mu['dense']['kernel']`` ends with the parameter's path, as it
    does in a per-leaf state (tools that give state arrays their parameter's sharding
    match on that).
    """

    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"LeafKey({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeafKey) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


class PackedTree:
    """A state tree in packed form: one flat buffer per group, one array per big leaf.

    Attributes:
      flats: one 1-D array per group of :attr:`Layout.groups`, the group's leaves
        concatenated (flattened, in tree order).
      bigs: one array per leaf of :attr:`Layout.big`, in its own shape.
      layout: the static :class:`Layout`.
    """

    def __init__(self, flats: tuple, bigs: tuple, layout: Layout):
        self.flats = tuple(flats)
        self.bigs = tuple(bigs)
        self.layout = layout

    def _flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(f"flat{k}") for k in range(len(self.flats))]
        keys += [LeafKey(self.layout.keys[i]) for i in self.layout.big]
        return list(zip(keys, (*self.flats, *self.bigs), strict=True)), self.layout

    def _flatten(self):
        return (*self.flats, *self.bigs), self.layout

    @classmethod
    def _unflatten(cls, layout, children):
        n = len(layout.groups)
        return cls(tuple(children[:n]), tuple(children[n:]), layout)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedTree):
            return NotImplemented
        return (self.flats, self.bigs, self.layout) == (other.flats, other.bigs, other.layout)

    __hash__ = None  # type: ignore[assignment]  # content equality, like the states around it

    def __repr__(self) -> str:  # noqa: D105
        flats = ", ".join(f"{jnp.shape(f)}" for f in self.flats)
        return f"PackedTree(flats=[{flats}], {len(self.bigs)} unpacked leaves)"

    def unpacked(self, like: Any) -> Any:
        """The same state as a tree shaped like ``like`` (the parameters), for inspection."""
        dtypes: list[Any] = [None] * len(self.layout.shapes)
        for k, g in enumerate(self.layout.groups):
            for i in g:
                dtypes[i] = jnp.result_type(self.flats[k])
        for j, i in enumerate(self.layout.big):
            dtypes[i] = jnp.result_type(self.bigs[j])
        treedef = jax.tree.structure(like)
        return unpack(self.layout, self.flats, self.bigs, tuple(dtypes), treedef)


jax.tree_util.register_pytree_with_keys(
    PackedTree,
    PackedTree._flatten_with_keys,
    PackedTree._unflatten,
    PackedTree._flatten,
)


def zeros(layout: Layout, tree: Any, dtype: Any = None) -> PackedTree:
    """A zero state for ``tree`` in ``dtype`` (default: each leaf's own dtype).

    The unpacked leaves' zeros are made like the leaves themselves, so they keep a
    sharded leaf's sharding.
    """
    leaves = jax.tree.leaves(tree)
    flats = tuple(
        jnp.zeros([layout.group_size(k)], dtype or layout.dtypes[g[0]])
        for k, g in enumerate(layout.groups)
    )
    bigs = tuple(jnp.zeros_like(leaves[i], dtype=dtype) for i in layout.big)
    return PackedTree(flats, bigs, layout)


def check(fn: str, tree: Any, layout: Layout, what: str = "updates") -> None:
    """Raises ``ValueError`` naming the mismatch when ``tree`` does not fit the layout."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = tuple(_path(p) for p, _ in flat)
    if treedef != layout.treedef and paths != layout.paths:
        raise ValueError(
            f"{fn}: the {what} tree and the packed state have different structures.\n"
            f"  {what}: {treedef}\n  state: {layout.treedef}\n"
            "Pass the same tree structure the state was initialised with."
        )
    for path, (_, x), shape in zip(paths, flat, layout.shapes, strict=True):
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(
                f"{fn}: {what} leaf {path} has shape {tuple(jnp.shape(x))} but the packed "
                f"state was initialised with {shape}. Pass the same shapes the state was "
                "initialised with."
            )


def pack(layout: Layout, tree: Any) -> tuple[tuple, tuple]:
    """``tree``'s leaves as (one concatenation per group, the big leaves)."""
    leaves = jax.tree.leaves(tree)
    flats = tuple(jnp.concatenate([jnp.ravel(leaves[i]) for i in g]) for g in layout.groups)
    return flats, tuple(leaves[i] for i in layout.big)


def unpack(layout: Layout, flats: tuple, bigs: tuple, dtypes: tuple, treedef: Any) -> Any:
    """The ``treedef`` tree whose packed leaves are cut from ``flats`` at the layout's starts.

    ``dtypes`` gives each leaf's output dtype.
    """
    out: list[Any] = [None] * len(layout.shapes)
    starts = iter(layout.starts)
    for k, g in enumerate(layout.groups):
        for i in g:
            start = next(starts)
            piece = jax.lax.slice(flats[k], (start,), (start + layout.size(i),))
            out[i] = piece.reshape(layout.shapes[i]).astype(dtypes[i])
    for j, i in enumerate(layout.big):
        out[i] = bigs[j].astype(dtypes[i])
    return treedef.unflatten(out)
