"""Construction-time validation of hyperparameters.

Hyperparameters may be tracers (under :func:`optax.inject_hyperparams` or inside a
jitted factory call). Only concrete values are checked; a tracer passes through
untouched, so injected schedules keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


def concrete_scalar(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is a concrete real scalar, else ``None``."""
    if isinstance(value, jax.core.Tracer):
        return None
    if callable(value):  # a schedule
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything not array-like is not checkable
        return None
    if arr.ndim != 0 or arr.dtype.kind not in "biuf":
        return None
    return float(arr)


def _fail(fn: str, name: str, value: Any, requirement: str, example: str) -> None:
    raise ValueError(
        f"{fn}: `{name}` must be {requirement}, got {name}={value!r}. Pass e.g. {name}={example}."
    )


def check_range(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    example: str = "1.0",
) -> None:
    """Raises ``ValueError`` naming ``name`` and ``value`` if a concrete value is out of range.

    A concrete value that is not a real number (a string, a list) also raises.
    NaN is always out of range.
    """
    if isinstance(value, str | bytes | list | tuple | dict) or value is None:
        _fail(fn, name, value, "a real number", example)
    x = concrete_scalar(value)
    if x is None:
        if isinstance(value, jax.core.Tracer) or callable(value):
            return
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001
            arr = None
        if arr is not None and arr.ndim != 0:
            _fail(fn, name, value, "a scalar", example)
        if arr is not None and arr.dtype.kind not in "biuf":
            _fail(fn, name, value, "a real number", example)
        return
    parts = []
    ok = not np.isnan(x)
    if low is not None:
        ok &= x >= low if low_inclusive else x > low
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        ok &= x <= high if high_inclusive else x < high
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    if not ok:
        _fail(fn, name, value, " and ".join(parts) or "a finite number", example)


def check_nonnegative(fn: str, name: str, value: Any, example: str = "1.0") -> None:
    check_range(fn, name, value, low=0.0, example=example)


def check_positive(fn: str, name: str, value: Any, example: str = "1.0") -> None:
    check_range(fn, name, value, low=0.0, low_inclusive=False, example=example)


def check_decay(fn: str, name: str, value: Any, example: str = "0.9") -> None:
    """A decay rate must lie in [0, 1)."""
    check_range(fn, name, value, low=0.0, high=1.0, high_inclusive=False, example=example)


def static_int(
    fn: str, name: str, value: Any, *, low: int = 0, allow_none: bool = False, example: str = "1"
) -> int | None:
    """An integer hyperparameter that shapes arrays, as a Python ``int`` (or ``None``).

    A concrete integer array is converted (``optax.inject_hyperparams`` passes numbers
    as arrays); a traced one cannot size a buffer and is refused with a hint.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{fn}: `{name}` sizes the state's buffers and cannot be traced, got {name}={value!r}. "
            f"Pass a Python integer (with optax.inject_hyperparams, list it in static_args)."
        )
    if isinstance(value, jax.Array | np.ndarray | np.integer):
        arr = np.asarray(value)
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            value = int(arr)
    check_int(fn, name, value, low=low, allow_none=allow_none, example=example)
    return value


def check_int(
    fn: str,
    name: str,
    value: Any,
    *,
    low: int = 0,
    allow_none: bool = False,
    traced_ok: bool = False,
    example: str = "1",
) -> None:
    """Checks an integer hyperparameter.

    With ``traced_ok`` (a count used only in arithmetic, not in shapes), integer
    arrays and tracers are accepted, as ``optax.inject_hyperparams`` passes them;
    otherwise the value must be a concrete Python integer (it sizes an array or
    steers tracing).
    """
    if value is None and allow_none:
        return
    if traced_ok and isinstance(value, jax.core.Tracer):
        return
    if traced_ok and isinstance(value, jax.Array | np.ndarray | np.integer):
        arr = np.asarray(value)
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            value = int(arr)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        _fail(fn, name, value, f"an integer >= {low}", example)
    if value < low:
        _fail(fn, name, value, f"an integer >= {low}", example)


def check_choice(fn: str, name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"{fn}: `{name}` must be one of {options}, got {name}={value!r}. "
            f"Pass e.g. {name}={choices[0]!r}."
        )


def check_dtype(fn: str, name: str, value: Any) -> None:
    """A state dtype must be ``None`` or a floating dtype."""
    if value is None:
        return
    try:
        dt = np.dtype(jax.dtypes.canonicalize_dtype(value))
    except TypeError:
        dt = None
    if dt is None or not jax.dtypes.issubdtype(dt, np.floating):
        raise ValueError(
            f"{fn}: `{name}` must be None or a floating dtype, got {name}={value!r}. "
            f"Pass e.g. {name}=jnp.float32."
        )


NO_PARAMS_MSG = (
    "{fn}: this transformation needs the current parameters, but `params` is None. "
    "Call `tx.update(grads, opt_state, params)`."
)


def require_params(fn: str, params: Any) -> None:
    if params is None:
        raise ValueError(NO_PARAMS_MSG.format(fn=fn))


def concrete_int(fn: str, name: str, value: Any) -> int:
    """``value`` as a Python ``int``; raises if it is a tracer (it must size an array)."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{fn}: `{name}` sizes the optimizer state, so `init` needs a concrete value, "
            f"got a tracer. Call `init` outside `jax.jit`, or pass {name} as a Python int "
            f"(under `optax.inject_hyperparams`, `static_args=({name!r},)`)."
        )
    return int(value)
