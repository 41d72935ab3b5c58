"""Carrying a run's moments and step counts over to another optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptx._core.packing import PackedTree

_FN = "adopt_state"
#: Fields whose arrays are per-parameter moments, carried leaf by leaf.
MOMENTS = ("mu", "nu", "trace", "ema", "sum_of_squares")
#: The fields of the states that count steps for a schedule (``optax.scale_by_schedule``,
#: ``adaptx.scale_by_learning_rate``, ``optax.inject_hyperparams``); their ``count`` is
#: carried when old and new have as many.
SCHEDULE_COUNTERS = (
    frozenset({"count"}),
    frozenset({"count", "learning_rate"}),
    frozenset({"count", "hyperparams", "inner_state"}),
    frozenset({"count", "hyperparams", "hyperparams_states", "inner_state"}),
)

KeyPath = tuple[Any, ...]


class _Node(NamedTuple):
    """A state (NamedTuple, or a dict as a checkpoint restores it) with a field we carry."""

    where: KeyPath
    node: Any
    fields: dict[str, Any]

    @property
    def moments(self) -> list[str]:
        return [f for f in MOMENTS if f in self.fields]

    def describe(self) -> str:
        name = type(self.node).__name__
        parts = []
        for f in self.fields:
            if f in MOMENTS:
                parts.append(f"{f}: {len(jax.tree.leaves(self.fields[f]))} arrays")
            elif f == "count":
                parts.append(f)
        return f"{name} at {_path_str(self.where) or '(root)'} ({', '.join(parts)})"


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path: KeyPath) -> str:
    return "/".join(_key_name(k) for k in path)


def _fields(node: Any) -> dict[str, Any] | None:
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return {f: getattr(node, f) for f in node._fields}
    if isinstance(node, Mapping) and node and all(isinstance(k, str) for k in node):
        return dict(node)
    return None


def _is_counter(n: _Node) -> bool:
    return frozenset(n.fields) in SCHEDULE_COUNTERS


def _nodes(tree: Any) -> list[_Node]:
    """Every moment state and schedule counter in ``tree``, outer first.

    A moment state's own subtrees are shaped like the parameters: they are not searched.
    """
    out: list[_Node] = []

    def visit(node: Any, where: KeyPath) -> None:
        fields = _fields(node)
        if fields is not None:
            found = _Node(where, node, fields)
            if found.moments or _is_counter(found):
                out.append(found)
            if found.moments:
                return
        children = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and _fields(x) is not None
        )[0]
        for path, child in children:
            if child is not node and _fields(child) is not None:
                visit(child, where + tuple(path))

    visit(tree, ())
    return out


def _refuse_packed(nodes: list[_Node], what: str) -> None:
    for n in nodes:
        packed = any(isinstance(n.fields[f], PackedTree) for f in n.moments)
        if packed or n.fields.get("offsets"):
            raise ValueError(
                f"{_FN}: {what} holds Adam moments packed by pack_small_leaves "
                f"({type(n.node).__name__} at {_path_str(n.where) or '(root)'}); adopting a "
                "packed state is not supported yet. Build that optimizer without "
                "pack_small_leaves (e.g. adaptx.adamw(1e-3), pack_small_leaves=None)."
            )


def _moment_leaves(n: _Node) -> list[tuple[KeyPath, tuple[str, str, tuple], Any]]:
    """``(path in the node, (field, parameter path, shape), leaf)`` of each moment array."""
    out = []
    for rel, leaf in jax.tree_util.tree_flatten_with_path(n.node)[0]:
        field = _key_name(rel[0])
        if field in MOMENTS:
            out.append((rel, (field, _path_str(rel[1:]), tuple(np.shape(leaf))), leaf))
    return out


def _cast(old: Any, new: Any) -> jax.Array:
    """``old`` in ``new``'s dtype, and on its devices."""
    x = jnp.asarray(old).astype(jnp.result_type(new))
    sharding = getattr(new, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else x


def _count_path(n: _Node) -> KeyPath | None:
    leaves = jax.tree_util.tree_flatten_with_path(n.node)[0]
    return next((rel for rel, _ in leaves if len(rel) == 1 and _key_name(rel[0]) == "count"), None)


class _Carried(NamedTuple):
    """What :func:`adopt_state` takes over: new leaves by path, and the old leaves used."""

    replacements: dict[KeyPath, jax.Array]
    used: set[KeyPath]
    fresh: list[str]


def _old_table(nodes: list[_Node]) -> dict[tuple, tuple[int, Any, KeyPath]]:
    """``(field, parameter path, shape) -> (node index, leaf, path)`` of every old moment."""
    table: dict[tuple, tuple[int, Any, KeyPath]] = {}
    for i, n in enumerate(nodes):
        for rel, key, leaf in _moment_leaves(n):
            if key in table:
                first = _path_str(table[key][2])
                raise ValueError(
                    f"{_FN}: old_state holds two moments that fit the same new one: "
                    f"{first} and {_path_str(n.where + rel)} ({key[0]} of parameter "
                    f"{key[1] or '(root)'}, shape {key[2]}). Pass the part of old_state that "
                    "belongs to one optimizer."
                )
            table[key] = (i, leaf, n.where + rel)
    return table


def _source_count(old_nodes: list[_Node], sources: set[int], where: str) -> tuple[Any, KeyPath]:
    """The step count of the old states the moments of one new state came from."""
    found: list[tuple[_Node, KeyPath]] = []
    for i in sorted(sources):
        rel = _count_path(old_nodes[i])
        if rel is not None:
            found.append((old_nodes[i], rel))
    if not found:
        return None, ()
    values = {int(np.asarray(n.fields["count"])) for n, _ in found}
    if len(values) > 1:
        raise ValueError(
            f"{_FN}: the moments of the new state at {where} come from old states with "
            f"different step counts {sorted(values)}; there is no one count to give them. "
            "Adopt into an optimizer that keeps one state per old one."
        )
    n, rel = found[0]
    return n.fields["count"], n.where + rel


def _carry_moments(old_nodes: list[_Node], new_nodes: list[_Node]) -> _Carried:
    table = _old_table(old_nodes)
    out = _Carried({}, set(), [])
    for n in new_nodes:
        sources: set[int] = set()
        for rel, key, leaf in _moment_leaves(n):
            if key not in table:
                out.fresh.append(f"{_path_str(n.where + rel)} {key[2]}")
                continue
            i, old, old_path = table[key]
            out.replacements[n.where + rel] = _cast(old, leaf)
            out.used.add(old_path)
            sources.add(i)
        count_rel = _count_path(n)
        if sources and count_rel is not None:
            count, old_path = _source_count(old_nodes, sources, _path_str(n.where) or "(root)")
            if count is not None:
                out.replacements[n.where + count_rel] = _cast(count, n.fields["count"])
                out.used.add(old_path)
    return out


def _carry_counters(old_nodes: list[_Node], new_nodes: list[_Node], out: _Carried) -> None:
    """Schedule step counts: one count to every new counter when the old ones agree (an
    ``optax.inject_hyperparams`` state holds two), else paired in order when old and new
    hold as many."""
    olds = [(n, rel) for n in old_nodes if _is_counter(n) and (rel := _count_path(n))]
    news = [(n, rel) for n in new_nodes if _is_counter(n) and (rel := _count_path(n))]
    if not olds or not news:
        return
    if len({int(np.asarray(n.fields["count"])) for n, _ in olds}) == 1:
        sources = [olds[0][0]] * len(news)
    elif len(olds) == len(news):
        sources = [o for o, _ in olds]
    else:
        return
    out.used.update(o.where + rel for o, rel in olds)
    for o, (n, rel) in zip(sources, news, strict=True):
        out.replacements[n.where + rel] = _cast(o.fields["count"], n.fields["count"])


def _left_behind(old_nodes: list[_Node], used: set[KeyPath]) -> list[str]:
    """The old moments and schedule counts that no new leaf took over."""
    out = []
    for n in old_nodes:
        for rel, leaf in jax.tree_util.tree_flatten_with_path(n.node)[0]:
            name = _key_name(rel[0])
            counter = name == "count" and len(rel) == 1 and _is_counter(n)
            if (name in MOMENTS or counter) and n.where + rel not in used:
                out.append(f"{_path_str(n.where + rel)} {tuple(np.shape(leaf))}")
    return out


def _nothing_matched(old_nodes: list[_Node], new_nodes: list[_Node]) -> ValueError:
    def listing(nodes: list[_Node]) -> str:
        moments = [n for n in nodes if n.moments]
        if not moments:
            return f"no {', '.join(MOMENTS)} field"
        shown = "; ".join(n.describe() for n in moments[:4])
        return shown + (f"; and {len(moments) - 4} more" if len(moments) > 4 else "")

    return ValueError(
        f"{_FN}: no moment of old_state fits the new optimizer's state. old_state holds: "
        f"{listing(old_nodes)}. The new state holds: {listing(new_nodes)}. A moment is "
        "carried over when its field name (mu, nu, trace, ema, sum_of_squares), parameter "
        "path and shape are the same in both: pass the parameters the old state was built "
        "for, and an optimizer with the same kind of moments (Adam's mu and nu, momentum's "
        "trace)."
    )


def adopt_state(old_state: Any, tx: optax.GradientTransformation, params: Any) -> Any:
    """A fresh ``tx.init(params)`` that takes over the moments and step counts of ``old_state``.

    Switching a running job to another optimizer (optax's AdamW to
    :func:`adaptx.robust_adamw`, an unguarded chain to a guarded one) need not restart its
    moments from zero. ``old_state`` may be any optimizer state, optax's or adaptx's,
    nested in any way (``optax.chain`` tuples, :class:`adaptx.GuardState`'s
    ``inner_state``, ``optax.masked``, ``optax.inject_hyperparams``, ...), or the nested
    dicts and lists a checkpoint restores without a target.

    A moment is an array under a field named ``mu``, ``nu`` (Adam), ``trace`` (momentum:
    ``optax.trace``, :func:`adaptx.momentum`), ``ema`` or ``sum_of_squares``. Each moment
    of the new state takes the old one with the same field name, parameter path and
    shape, cast to the new state's dtype (and placed like it); the state holding it takes
    the old state's ``count``. The step counts of learning-rate schedules
    (``optax.scale_by_schedule``, ``optax.inject_hyperparams``) are taken over: when the
    old ones agree, by every new one; otherwise in order, when old and new hold as many.
    Everything else starts fresh: a guard's and a clipper's statistics warm up again
    (:func:`adaptx.robust_adamw` clips its first step to ``initial_max_norm``), and so do
    moments without a counterpart. A ``UserWarning`` lists
    what was left behind or started fresh, when some moments were matched and others not.

    .. code-block:: python

      # an optax run's checkpoint, restored without its optimizer (nested dicts)
      old = orbax.checkpoint.StandardCheckpointer().restore(path)
      opt_state = adaptx.adopt_state(old, adaptx.robust_adamw(1e-3), params)

    Args:
      old_state: the state to take over from.
      tx: the new optimizer.
      params: the parameters, as ``tx.init`` takes them.

    Returns:
      ``tx.init(params)`` with the old moments and counts in place.

    Raises:
      ValueError: if no moment matches (the message lists the moment states on both
        sides), if two old moments fit the same new one, if the moments of one new state
        come from old states with different counts, or if either state holds moments packed
        by ``pack_small_leaves``, which is not supported yet.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, adaptx
      >>> params = {"w": jnp.ones(3)}
      >>> old_tx = optax.adamw(1e-3)
      >>> old = old_tx.init(params)
      >>> _, old = old_tx.update({"w": jnp.full(3, 0.5)}, old, params)
      >>> new = adaptx.adopt_state(old, adaptx.robust_adamw(1e-3), params)
      >>> adam = new.inner_state[1]   # guard(chain(clip_spikes, scale_by_adam, ...))
      >>> int(adam.count), bool(np.array_equal(adam.mu["w"], old[0].mu["w"]))
      (1, True)
    """
    new_state = tx.init(params)
    old_nodes, new_nodes = _nodes(old_state), _nodes(new_state)
    _refuse_packed(old_nodes, "old_state")
    _refuse_packed(new_nodes, "the new state")
    carried = _carry_moments(old_nodes, new_nodes)
    if not carried.used:
        raise _nothing_matched(old_nodes, new_nodes)
    _carry_counters(old_nodes, new_nodes, carried)
    left = _left_behind(old_nodes, carried.used)
    if left or carried.fresh:
        warnings.warn(
            f"{_FN}: not every moment was carried over. Left behind in old_state (no "
            f"counterpart in the new state): {', '.join(left) or 'nothing'}. Started fresh in "
            f"the new state: {', '.join(carried.fresh) or 'nothing'}.",
            UserWarning,
            stacklevel=2,
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(new_state)
    treedef_: Any = treedef  # jaxlib's PyTreeDef has no type stubs
    return treedef_.unflatten([carried.replacements.get(path, x) for path, x in leaves])
