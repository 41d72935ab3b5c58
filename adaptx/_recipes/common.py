"""Pieces shared by the recipes."""

from __future__ import annotations

from typing import Any

import optax

from adaptx._clipping.global_norm import clip_by_global_norm
from adaptx._core import validate


def check_learning_rate(fn: str, learning_rate: Any) -> None:
    if not callable(learning_rate):
        validate.check_nonnegative(fn, "learning_rate", learning_rate, example="1e-3")


def optional_clip(max_norm: Any) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_norm)``, or the identity when ``max_norm is None``."""
    return optax.identity() if max_norm is None else clip_by_global_norm(max_norm)
