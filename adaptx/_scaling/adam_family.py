"""An optax transform from an Adam-family :class:`~adaptx._scaling.adam_engine.Method`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._scaling import adam_pass
from adaptx._scaling.adam_engine import Method, Moments, Step, init

MakeState = Callable[[Moments, Step | None, Any], Any]


@dataclasses.dataclass(frozen=True)
class EngineUpdate:
    """The ``update`` of an Adam-family transform: a method and its moment decays.

    A plain callable with optax's ``update`` signature, and also :meth:`scaled`, the
    same step with a clip's scale folded into the fused pass (what :func:`adaptx.chain`
    calls). Its fields say which method it runs, so a fused program is built from them
    explicitly.
    """

    method: Method
    b1: Any
    b2: Any
    make_state: MakeState

    def __call__(
        self, updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        return self.scaled(updates, state, None, params, **extra_args)

    def scaled(
        self,
        updates: Any,
        state: Any,
        scale: jax.Array | None,
        params: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        """The step on ``scale * updates`` (``None``: on ``updates``), fused in one pass."""
        del params
        moments = Moments(state.count, state.mu, state.nu)
        step = adam_pass.update(self.method, self.b1, self.b2, updates, moments, extra_args, scale)
        new = self.make_state(step.moments, step, state)
        # The moments (and the count) were held inside the pass; the figures are held here.
        skip = skip_lib.decision(extra_args)
        return step.updates, skip_lib.hold_fields(skip, state, new, held=("count", "mu", "nu"))


def transformation(
    method: Method,
    b1: Any,
    b2: Any,
    *,
    mu_dtype: jax.typing.DTypeLike | None,
    nu_dtype: jax.typing.DTypeLike | None,
    pack_small_leaves: int | None,
    make_state: MakeState,
) -> skip_lib.Honouring:
    """An optax transform running ``method`` on the engine; it honours the skip protocol.

    ``make_state(moments, step, context)`` builds the public transform's own state: from
    the initial moments (``step`` is ``None``, ``context`` the params) and after each
    update (``context`` the previous state). Checks the storage options every method
    shares (``mu_dtype``, ``nu_dtype``, ``pack_small_leaves``), naming ``method.name``.
    """
    fn = method.name
    validate.check_dtype(fn, "mu_dtype", mu_dtype)
    validate.check_dtype(fn, "nu_dtype", nu_dtype)
    # A concrete integer array is accepted (optax.inject_hyperparams passes numbers as
    # arrays); the value sizes buffers, so it cannot be traced.
    pack = validate.static_int(
        fn, "pack_small_leaves", pack_small_leaves, low=1, allow_none=True, example="65536"
    )
    mu_dt, nu_dt = tu.canonical_dtype(mu_dtype), tu.canonical_dtype(nu_dtype)

    def init_fn(params: optax.Params) -> Any:
        return make_state(init(params, mu_dt, nu_dt, pack), None, params)

    return skip_lib.Honouring(init_fn, EngineUpdate(method, b1, b2, make_state))


def engine_update(tx: Any) -> EngineUpdate | None:
    """The :class:`EngineUpdate` of an Adam-family transform, or ``None`` for any other."""
    update = getattr(tx, "update", None)
    return update if isinstance(update, EngineUpdate) else None
