r"""The skip protocol: how a guard tells the transforms inside it that a step is skipped.

A guard that skips a step must hand back its inner state unchanged. Two facts shape how:

- Selecting ``where(skip, old, new)`` around a finished Adam update defeats XLA's
  in-place update of the moments. The step is computed from the *unselected* new
  moments, so XLA recomputes them from the old ones inside the parameter kernel after
  the state kernel has overwritten those in place, and copies both moments first: on
  one 16M-parameter leaf, 16 full-size passes and a 64 MiB temporary against 11 and none
  (``python -m bench.skip_select``). ``lax.cond`` around the inner update is worse on
  XLA:CPU (it copies the whole state).
- A transform that selects inside its own fused pass (the moments are
  ``where(skip, old, new)`` and the step is read off the selected moments) costs nothing.

So the decision travels down as a value, and each transform that can select inside its
own pass does. The protocol:

1. The decision is a boolean scalar ``jax.Array`` under the extra-argument name
   :data:`KEY`: a pytree leaf like any other, so it crosses ``jit``, ``scan``, ``vmap``,
   ``optax.MultiSteps`` and any wrapper that forwards extra arguments.
2. A transform *honours* the skip when, given ``KEY=True``, it returns zero updates and a
   state bit-identical to the one it was given. It says so statically by being a
   :class:`Honouring` transformation (a subtype of ``optax.GradientTransformationExtraArgs``
   with no fields of its own). Every stateful adaptx transform is one.
3. Whoever runs an inner transform under a skip (:func:`run`: the guard, ``rewind``,
   ``dynamic_loss_scale``, :func:`adaptx.chain`) passes the decision down; if the
   inner transform is :class:`Honouring` its state is taken as it comes back, otherwise
   every leaf of it is selected with :func:`select_state`. A foreign transform (optax's,
   a user's, ``optax.chain`` of adaptx parts) is therefore always correct, and only the
   transforms whose honouring is known by type are trusted.

Nothing here depends on where an array came from: the decision is an argument, and
whether a transform honours it is a fact about its type.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

#: The extra-argument name under which a skip decision (a boolean scalar array) travels.
KEY = "adaptx_skip"


class Honouring(optax.GradientTransformationExtraArgs):
    """An optax transform that honours the skip decision passed as :data:`KEY`.

    Given ``KEY=True`` it returns zero updates and its state bit-identical. A type with
    no fields of its own, so it is an ``optax.GradientTransformationExtraArgs`` in
    every respect (``optax.chain`` and ``flax.nnx.Optimizer`` take it as one).
    """

    __slots__ = ()


def honours(tx: Any) -> bool:
    """Whether ``tx`` is known (by its type) to honour the skip decision."""
    return isinstance(tx, Honouring)


def decision(extra_args: dict[str, Any]) -> jax.Array | None:
    """The skip decision passed down in ``extra_args``, or ``None`` outside a guard."""
    flag = extra_args.get(KEY)
    if flag is None:
        return None
    flag = jnp.asarray(flag)
    if flag.shape != () or flag.dtype != jnp.bool_:
        raise TypeError(
            f"the extra argument {KEY}= must be a boolean scalar (the skip decision), got "
            f"shape {flag.shape} and dtype {flag.dtype}. Pass e.g. {KEY}=jnp.bool_(False)."
        )
    return flag


def combine(own: jax.Array, extra_args: dict[str, Any]) -> jax.Array:
    """``own``, or'ed with a decision already passed down (a guard inside a guard)."""
    outer = decision(extra_args)
    return own if outer is None else own | outer


def with_decision(extra_args: dict[str, Any], skip: jax.Array) -> dict[str, Any]:
    """``extra_args`` with ``skip`` as the decision for the transforms inside."""
    return {**extra_args, KEY: skip}


# Helpers for a transform's fused per-leaf function; each is the identity outside a guard.


def hold(skip: jax.Array | None, old: jax.Array, new: jax.Array) -> jax.Array:
    """``new``, or ``old`` (cast to ``new``'s dtype) when the step is skipped."""
    if skip is None:
        return new
    return jnp.where(skip, old.astype(new.dtype), new)


def silence(skip: jax.Array | None, update: jax.Array) -> jax.Array:
    """``update``, or zero when the step is skipped (selected, never multiplied: 0 * NaN)."""
    if skip is None:
        return update
    return jnp.where(skip, jnp.zeros([], update.dtype), update)


def select_state(skip: jax.Array | None, old: Any, new: Any) -> Any:
    """Every leaf of ``new``, or of ``old`` when the step is skipped."""
    if skip is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)


def hold_fields(skip: jax.Array | None, old: Any, new: Any, *, held: tuple[str, ...]) -> Any:
    """The ``NamedTuple`` state ``new`` with every field but ``held`` selected against ``old``.

    For a transform whose full-size fields (``held``: its moments, an inner state) were
    already kept inside its own pass or by the transform it wraps; the rest (counters,
    figures, scalars) is selected here.
    """
    if skip is None:
        return new
    kept = {
        f: select_state(skip, getattr(old, f), getattr(new, f))
        for f in new._fields
        if f not in held
    }
    return new._replace(**kept)


def zeros_if(skip: jax.Array | None, updates: Any) -> Any:
    """The updates, or zeros shaped like them when the step is skipped."""
    if skip is None:
        return updates
    return jax.tree.map(lambda u: silence(skip, u), updates)


def run(
    inner: optax.GradientTransformationExtraArgs,
    skip: jax.Array,
    updates: Any,
    state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """``inner.update`` under the decision ``skip``: zero updates and the old state where it holds.

    The decision is passed down; an :class:`Honouring` inner transform selects its own
    state, any other has every leaf of its state selected here.
    """
    new_updates, new_state = held(inner, skip, updates, state, params, extra_args)
    return zeros_if(skip, new_updates), new_state


def held(
    inner: optax.GradientTransformationExtraArgs,
    skip: jax.Array,
    updates: Any,
    state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """:func:`run` without zeroing the updates (a chain zeroes once, at its end)."""
    new_updates, new_state = inner.update(updates, state, params, **with_decision(extra_args, skip))
    if not honours(inner):
        new_state = select_state(skip, state, new_state)
    return new_updates, new_state


def by_selection(tx: optax.GradientTransformation) -> Honouring:
    """``tx`` made to honour the decision by selecting its whole state.

    For transforms with small state (a clip's running statistics, a few scalars): the
    selection is a handful of scalar selects, and every adaptx transform then honours
    the protocol in one way. A transform with full-size state selects inside its own
    fused pass instead (see :func:`hold`).
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        skip = decision(extra_args)
        new_updates, new_state = tx.update(updates, state, params, **extra_args)
        return zeros_if(skip, new_updates), select_state(skip, state, new_state)

    return Honouring(tx.init, update_fn)
