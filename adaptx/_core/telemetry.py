"""Registration of the state fields that :func:`adaptx.telemetry` reports."""

from __future__ import annotations

from collections.abc import Callable

# state class -> (readable name, field names)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}


def reports(name: str, *fields: str) -> Callable[[type], type]:
    """Class decorator: ``adaptx.telemetry`` reports ``fields`` of this state as ``name/field``.

    A field holding a non-scalar array is reported by its mean, so every figure is a scalar.
    """

    def register(cls: type) -> type:
        _REGISTRY[cls] = (name, tuple(fields))
        return cls

    return register


def registered(obj: object) -> tuple[str, tuple[str, ...]] | None:
    return _REGISTRY.get(type(obj))
