"""Registration of the state fields that :func:`adaptx.telemetry` reports, and the counters'
vocabulary."""

from __future__ import annotations

from collections.abc import Callable

#: The counters of :func:`adaptx.telemetry`: the int32 figures that count steps, tensors or
#: elements, or flag a step, ``{name: meaning}``. A name means the same thing in every state
#: that reports it, so that a log can be read by figure name alone (``adaptx.report`` reads
#: it so, never by transform). A state's docstring names the counter and adds only what is
#: particular to its transform. "So far" counters are cumulative and saturate at the int32
#: maximum: a step at which one went up is a step at which that happened. "At the last step"
#: counters start again at every step.
COUNTERS: dict[str, str] = {
    "num_clipped": "steps so far whose gradients a clip scaled down (cumulative)",
    "num_skipped": "steps so far whose gradients were zeroed as a norm spike (cumulative)",
    "skipped": (
        "steps skipped so far, for any reason (cumulative); a transform that knows why "
        "reports the last step's reason as last_reason"
    ),
    "nonfinite_skipped": (
        "steps skipped so far because their gradients were not finite (cumulative)"
    ),
    "forced": (
        "spikes let through so far because a limit on skips in a row was reached (cumulative)"
    ),
    "rewinds": "rewinds to a snapshot so far (cumulative)",
    "steps": "steps seen so far, skipped or not (cumulative)",
    "tensors_clipped": (
        "tensors (parameter leaves, or blocks) whose gradient or update was scaled down at "
        "the last step"
    ),
    "spikes": "gradient elements clipped by a spike rule at the last step",
    "spike": "1 if the last step's gradient norm was a spike, else 0",
    "consecutive": "steps skipped in a row, up to the last one",
    "consecutive_nonfinite": (
        "steps in a row, up to the last one, whose gradients or loss were not finite"
    ),
    "good_steps": "finite steps since the loss scale last changed",
    "diverged": "1 once the run was declared diverged, and from then on; else 0",
}

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
    A field that counts is named from :data:`COUNTERS` and means what it says there.
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
