"""Registration of the state fields that :func:`adaptx.telemetry` reports."""

from __future__ import annotations

from collections.abc import Callable

# state class -> (readable name, field names)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}
# state class -> its per-tensor fields (``adaptx._core.per_tensor.TensorFigures`` or a
# leading-leaf index), reported only by ``telemetry(state, per_tensor=True)``
_PER_TENSOR: dict[type, tuple[str, ...]] = {}


def reports(name: str, *fields: str, per_tensor: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: ``adaptx.telemetry`` reports ``fields`` of this state as ``name/field``.

    A field holding a non-scalar array is reported by its mean, so every figure is a scalar.
    A field that is ``None`` (a figure the transform was not asked to keep) is left out.
    ``per_tensor`` fields are reported only when asked for, one key per leaf.
    """

    def register(cls: type) -> type:
        _REGISTRY[cls] = (name, tuple(fields))
        _PER_TENSOR[cls] = tuple(per_tensor)
        return cls

    return register


def per_tensor_fields(obj: object) -> tuple[str, ...]:
    return _PER_TENSOR.get(type(obj), ())


def registered(obj: object) -> tuple[str, tuple[str, ...]] | None:
    return _REGISTRY.get(type(obj))
