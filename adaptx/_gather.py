"""Device scalars gathered into a few vectors, so that fetching many steps is a few copies.

A logger that fetches its figures with ``jax.device_get`` pays one device-to-host copy per
array. On a GPU each copy costs tens of microseconds however small the array, so fetching
25 steps of 20 scalar figures one by one (500 copies) can cost more than the 25 steps
themselves (``bench/writer_cost.py``). Gathering them on the device first turns those
copies into one per dtype:

- :func:`pack` (once per step, asynchronous): a step's device scalars are stacked into one
  vector per (sharding, dtype) by a jitted function, dispatched like any other step of the
  loop, so nothing waits for the device;
- :func:`fetch` (once per flush): each (sharding, dtype) group's vectors of all the steps
  are concatenated on the device by a second jitted function, fetched with one
  ``jax.device_get`` and cut back into rows.

Values come back with their own dtype and value: nothing is cast, so a ``bool`` stays a
``bool`` and an ``int32`` count is exact. Values that are not ``jax.Array`` (Python
numbers, NumPy scalars, strings) never leave the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Group(NamedTuple):
    """The positions in a row of the device scalars that share a sharding and a dtype."""

    key: tuple[Any, Any]  # (sharding, or None with one device; dtype)
    positions: tuple[int, ...]


class Row(NamedTuple):
    """One step's values: host values in place, device scalars stacked by group."""

    host: list[Any]  # None where a value lives in a vector
    groups: tuple[Group, ...]
    vectors: tuple[jax.Array, ...]  # vectors[i] holds groups[i]'s values, in order


@jax.jit
def _stack(groups: tuple[tuple[jax.Array, ...], ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.stack(g) for g in groups)


@jax.jit
def _concatenate(groups: tuple[tuple[jax.Array, ...], ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.concatenate(g) for g in groups)


def _by_sharding(keys: list[tuple[Any, Any]]) -> dict[Any, list[int]]:
    """Indices of ``keys`` per sharding: one jitted call may not mix devices."""
    out: dict[Any, list[int]] = {}
    for i, (sharding, _) in enumerate(keys):
        out.setdefault(sharding, []).append(i)
    return out


def _call(fn, members: list[tuple[jax.Array, ...]], keys: list[tuple[Any, Any]]) -> list:
    """``fn`` over ``members`` (one tuple per key), one call per sharding, in key order."""
    out: list[Any] = [None] * len(keys)
    for indices in _by_sharding(keys).values():
        results = fn(tuple(members[i] for i in indices))
        for i, result in zip(indices, results, strict=True):
            out[i] = result
    return out


def pack(values: list[Any]) -> Row:
    """Stacks the 0-d ``jax.Array`` values of one row on the device; the rest stay as they are.

    With one device every array is on it, so only the dtype groups them: reading and hashing
    each array's sharding is skipped (about 4 of the call's 50 microseconds of host time).
    """
    positions: dict[tuple[Any, Any], list[int]] = {}
    host = list(values)
    by_sharding = jax.device_count() > 1
    for i, v in enumerate(values):
        if isinstance(v, jax.Array):
            key = (v.sharding if by_sharding else None, v.dtype)
            positions.setdefault(key, []).append(i)
            host[i] = None
    groups = tuple(Group(k, tuple(p)) for k, p in positions.items())
    members = [tuple(values[i] for i in g.positions) for g in groups]
    vectors = tuple(_call(_stack, members, [g.key for g in groups]))
    return Row(host, groups, vectors)


def fetch(rows: list[Row]) -> list[list[Any]]:
    """Every row's values on the host, fetched with one ``jax.device_get``.

    Device values come back as NumPy scalars of their own dtype.
    """
    keys: list[tuple[Any, Any]] = []
    members: dict[tuple[Any, Any], list[jax.Array]] = {}
    for row in rows:
        for group, vector in zip(row.groups, row.vectors, strict=True):
            if group.key not in members:
                keys.append(group.key)
                members[group.key] = []
            members[group.key].append(vector)
    joined = _call(_concatenate, [tuple(members[k]) for k in keys], keys)
    fetched = dict(zip(keys, jax.device_get(joined), strict=True))
    offsets = dict.fromkeys(keys, 0)
    out = []
    for row in rows:
        values = list(row.host)
        for group in row.groups:
            start, flat = offsets[group.key], fetched[group.key]
            for j, position in enumerate(group.positions):
                values[position] = flat[start + j]
            offsets[group.key] = start + len(group.positions)
        out.append(values)
    return out
