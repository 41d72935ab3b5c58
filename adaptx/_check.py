"""Stopping a run that diverged, from the figures :func:`adaptx.telemetry` returned."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from adaptx.report._keys import split_key
from adaptx.report._reasons import reason_words

_FN = "adaptx.check"


class DivergedError(RuntimeError):
    """A run diverged: raised by :func:`adaptx.check`.

    The message says what happened; the attributes hold the same facts for a program.

    Attributes:
      step: the step at which the guard declared the run diverged (``None`` if the
        figures do not say).
      reason: why the guard skipped the last step, in words (``"non-finite gradients"``),
        or ``None``.
      consecutive: non-finite steps in a row (``None`` if the figures do not say).
      tensor: the first parameter whose per-tensor figure is not finite, by its path
        (``None`` without per-tensor figures).

    Examples:
      >>> import adaptx
      >>> try:
      ...     adaptx.check({"guard/diverged": 1, "guard/steps": 812, "guard/last_reason": 1})
      ... except adaptx.DivergedError as e:
      ...     print(e.step, e.reason)
      812 non-finite gradients
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        reason: str | None = None,
        consecutive: int | None = None,
        tensor: str | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.reason = reason
        self.consecutive = consecutive
        self.tensor = tensor


def _is_param_norm(key: str) -> bool:
    return split_key(key).figure.endswith("param_norm")


def _guard_prefixes(keys: list[str]) -> list[str]:
    """The prefix of every guard in the figures (``"guard"``, ``"0/guard"``), in order."""
    out: dict[str, None] = {}
    for key in keys:
        k = split_key(key)
        if k.transform == "guard":
            out[k.prefix] = None
    return list(out)


def _as_float(key: str, value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{_FN}: figures[{key!r}] must be a real scalar, got {value!r}. Pass the dict that "
            "adaptx.telemetry(state) returned, e.g. check(jax.device_get(figures))."
        )
    return float(arr.reshape(()))


def _first_nonfinite(values: dict[str, float], prefix: str, figure: str) -> str | None:
    """The parameter path of the first non-finite ``<prefix>/<figure>/<path>`` figure."""
    for key, value in values.items():
        k = split_key(key)
        if k.prefix == prefix and k.figure == figure and k.tensor and not math.isfinite(value):
            return k.tensor
    return None


def _diverged(values: dict[str, float], prefix: str) -> DivergedError | None:
    """The error for the guard at ``prefix``, or ``None`` if it has not declared divergence."""

    def figure(name: str) -> float | None:
        return values.get(f"{prefix}/{name}")

    diverged = figure("diverged")
    if diverged is None or math.isnan(diverged) or diverged == 0:
        return None
    steps, consecutive = figure("steps"), figure("consecutive_nonfinite")
    step = int(steps) if steps is not None and math.isfinite(steps) else None
    reason = reason_words(figure("last_reason"))
    tensor = _first_nonfinite(values, prefix, "tensor_grad_norm")
    when = f"at step {step}" if step is not None else "(the figures hold no guard/steps)"
    parts = [f"{_FN}: the run diverged {when}, as {prefix} declared ({prefix}/diverged=1)"]
    if consecutive is not None and math.isfinite(consecutive):
        since = f" (since step {step - int(consecutive)})" if step is not None else ""
        parts.append(f"{int(consecutive)} non-finite steps in a row{since}")
    if reason is not None:
        parts.append(f"last step skipped for {reason}")
    skipped = figure("skipped")
    if skipped is not None and math.isfinite(skipped):
        parts.append(f"{int(skipped)} steps skipped in all")
    if tensor is not None:
        parts.append(f"first non-finite gradient in {tensor}")
    count = None if consecutive is None or not math.isfinite(consecutive) else int(consecutive)
    return DivergedError(
        "; ".join(parts) + ". Restore the last checkpoint saved before it, and lower the "
        "learning rate or skip the batches that led there.",
        step=step,
        reason=reason,
        consecutive=count,
        tensor=tensor,
    )


def _nonfinite_params(values: dict[str, float]) -> DivergedError | None:
    """The error for a non-finite parameter norm, or ``None`` if every one is finite."""
    bad = [k for k, v in values.items() if _is_param_norm(k) and not math.isfinite(v)]
    if not bad:
        return None
    tensors = [split_key(k).tensor for k in bad if split_key(k).tensor is not None]
    where = f"; first non-finite tensor: {tensors[0]}" if tensors else ""
    shown = ", ".join(f"{k}={values[k]}" for k in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return DivergedError(
        f"{_FN}: the parameters are not finite ({shown}){where}. Do not save this state; "
        "restore the last checkpoint saved before it.",
        tensor=tensors[0] if tensors else None,
    )


def check(figures: Mapping[str, Any]) -> None:
    """Raises :class:`DivergedError` when the figures of a step show that the run diverged.

    Call it on the figures :func:`adaptx.telemetry` returned, once they are on the host
    (``jax.device_get``, as a logger fetches them), for instance before saving a
    checkpoint. It reads:

    * each guard's ``guard/diverged``: nonzero once the guard saw
      ``max_consecutive_nonfinite`` non-finite steps in a row. The message then gives the
      step (``guard/steps``), why the last step was skipped (``guard/last_reason``), the
      non-finite steps in a row (``guard/consecutive_nonfinite``), the steps skipped in all
      (``guard/skipped``) and, with ``per_tensor=True`` figures
      (``guard/tensor_grad_norm/<param path>``), the first tensor whose gradient was not
      finite. A guard without a ``diverged`` figure never declares divergence.
    * every parameter norm: a figure named ``param_norm`` or ending in it (``monitor/
      param_norm``, ``monitor/tensor_param_norm/<param path>``) that is NaN or infinite.

    Keys may carry a state path (``"0/guard/diverged"`` when a state holds two guards);
    each guard is read on its own. Values may be Python or NumPy numbers or 0-d arrays;
    device arrays are fetched with one ``jax.device_get``, but pass host values to keep
    the check free of any sync with the device.

    Args:
      figures: ``{key: scalar}`` as :func:`adaptx.telemetry` returns it (optionally with
        ``per_tensor=True``), fetched to the host.

    Returns:
      ``None`` when nothing shows a divergence.

    Raises:
      DivergedError: when a guard declared divergence, or a parameter norm is not finite.
      ValueError: when ``figures`` holds neither guard figures nor parameter norms, so
        there is nothing to check, or a value that is not a real scalar.
      TypeError: when ``figures`` is not a mapping.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.guard(optax.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> adaptx.check(jax.device_get(adaptx.telemetry(state)))  # a skip is no divergence
      >>> figures = {"guard/diverged": 1, "guard/steps": 812, "guard/last_reason": 1,
      ...            "guard/consecutive_nonfinite": 5, "guard/skipped": 9}
      >>> try:
      ...     adaptx.check(figures)
      ... except adaptx.DivergedError as e:
      ...     print(e)
      adaptx.check: the run diverged at step 812, as guard declared (guard/diverged=1); 5
      non-finite steps in a row (since step 807); last step skipped for non-finite
      gradients; 9 steps skipped in all. Restore the last checkpoint saved before it, and
      lower the learning rate or skip the batches that led there.
    """
    if not isinstance(figures, Mapping):
        raise TypeError(
            f"{_FN}: `figures` must be the dict adaptx.telemetry(state) returned, got "
            f"figures={figures!r}. Pass e.g. figures=jax.device_get(adaptx.telemetry(state))."
        )
    keys = [k for k in figures if isinstance(k, str)]
    guards = _guard_prefixes(keys)
    wanted = [k for k in keys if _is_param_norm(k) or split_key(k).prefix in guards]
    if not wanted:
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise ValueError(
            f"{_FN}: `figures` holds no guard figures (such as 'guard/diverged') and no "
            f"parameter norms (such as 'monitor/param_norm'), so there is nothing to check; "
            f"got keys [{shown}]. Wrap the optimizer in "
            "adaptx.guard(tx, max_consecutive_nonfinite=N), or use a recipe that has a guard "
            "(adaptx.robust_adamw), and pass jax.device_get(adaptx.telemetry(state))."
        )
    fetched = jax.device_get({k: figures[k] for k in wanted})
    values = {k: _as_float(k, fetched[k]) for k in wanted}
    for prefix in guards:
        error = _diverged(values, prefix)
        if error is not None:
            raise error
    error = _nonfinite_params(values)
    if error is not None:
        raise error
