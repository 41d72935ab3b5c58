"""Every defense the benchmark compares, defined once.

A :class:`Defense` builds the transformation that is replayed (``build(**hp)``; the
hyperparameters ``hp`` may be tracers, so one compilation serves a whole calibration
grid), says how much of the incoming gradient norm it let through at each step
(``passed``), and builds the full optimizer whose step time is measured (``recipe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import adaptx
from bench.stability import peers

LR = 1e-3


class Defense(NamedTuple):
    name: str
    build: Callable[..., optax.GradientTransformation]
    hp: dict
    passed: Callable[
        [jax.Array, Any], jax.Array
    ]  # (norm of the output, new state) -> norm let through
    recipe: Callable[[], optax.GradientTransformation] | None
    source: str


def _out(out_norm, state):
    del state
    return out_norm


def _adaptx_recipe(out_norm, state):
    """The norm adaptx's recipe let into Adam: 0 when its guard skipped, else ``n * scale``."""
    del out_norm
    figures = adaptx.telemetry(state)
    scale = jnp.ones([])
    for key in ("clip_spikes/scale", "zclip/scale", "clip_by_global_norm/scale"):
        if key in figures:
            scale = figures[key]
    n = figures["guard/grad_norm"]
    return jnp.where(figures["guard/last_reason"] > 0, 0.0, n * scale)


def _adamw():
    return optax.adamw(LR, weight_decay=1e-4)


def _clip_adamw():
    return optax.chain(optax.clip_by_global_norm(1.0), _adamw())


def _window(rule, on):
    return lambda **hp: rule(optax.identity(), on=on)


def _window_recipe(rule, on):
    return lambda: rule(_clip_adamw(), on=on)


def robust_front(**hp) -> optax.GradientTransformation:
    """``adaptx.robust_adamw`` with these keyword overrides, replayed as it is."""
    return adaptx.robust_adamw(LR, **hp)


DEFENSES: tuple[Defense, ...] = (
    Defense("none", lambda: optax.identity(), {}, _out, _adamw, "optax.adamw, nothing else"),
    Defense(
        "optax clip 1.0",
        lambda: optax.clip_by_global_norm(1.0),
        {},
        _out,
        _clip_adamw,
        "optax.clip_by_global_norm(1.0) + adamw",
    ),
    Defense(
        "optax apply_if_finite(clip 1.0)",
        lambda: optax.apply_if_finite(optax.clip_by_global_norm(1.0), max_consecutive_errors=20),
        {},
        _out,
        lambda: optax.apply_if_finite(_clip_adamw(), max_consecutive_errors=20),
        "optax.apply_if_finite(clip + adamw, max_consecutive_errors=20)",
    ),
    Defense(
        "window 6σ/128 loss+norm, ×0 (levanter)",
        _window(peers.levanter, ("loss", "grad_norm")),
        {},
        _out,
        _window_recipe(peers.levanter, ("loss", "grad_norm")),
        "levanter skipstep.py; OLMo-core the same with N-1 std",
    ),
    Defense(
        "window 6σ/128 norm, select (MaxText)",
        _window(peers.maxtext, ("grad_norm",)),
        {},
        _out,
        _window_recipe(peers.maxtext, ("grad_norm",)),
        "MaxText skip_step_on_spikes, gradient norm only",
    ),
    Defense(
        "window 6σ/128 loss, select (MaxText)",
        _window(peers.maxtext, ("loss",)),
        {},
        _out,
        _window_recipe(peers.maxtext, ("loss",)),
        "MaxText skip_step_on_spikes, loss only (OLMo-core without max_grad_norm)",
    ),
    Defense(
        "zclip (paper defaults)",
        lambda: adaptx.zclip(),
        {},
        _out,
        lambda: optax.chain(adaptx.zclip(), _adamw()),
        "Kumar et al. 2025: alpha 0.97, z 2.5, 25 warm-up steps",
    ),
    Defense(
        "autoclip (paper defaults)",
        lambda: adaptx.autoclip(),
        {},
        _out,
        lambda: optax.chain(adaptx.autoclip(), _adamw()),
        "Seetharaman et al. 2020: 10th percentile, history 1000",
    ),
    Defense(
        "guard + zclip 2.5 (robust_adamw's previous rule)",
        lambda: adaptx.guard(adaptx.zclip()),
        {},
        _out,
        lambda: adaptx.guard(
            optax.chain(
                adaptx.zclip(),
                adaptx.scale_by_adam(update_rms_clip=1.0),
                optax.add_decayed_weights(1e-4),
                optax.scale(-LR),
            )
        ),
        "the recipe's previous rule, guard(zclip() + update-clipped AdamW), as a plain optax.chain",
    ),
    Defense(
        "adaptx.robust_adamw",
        robust_front,
        {},
        _adaptx_recipe,
        lambda: adaptx.robust_adamw(LR),
        "guard(clip_spikes + update-clipped AdamW), the recipe's defaults",
    ),
    Defense(
        "adaptx.robust_adamw(update_rms_clip=None)",
        lambda: robust_front(update_rms_clip=None),
        {},
        _adaptx_recipe,
        lambda: adaptx.robust_adamw(LR, update_rms_clip=None),
        "the recipe without StableAdamW's update clipping: detector and guard only",
    ),
    Defense(
        "adaptx.robust_adamw(loss_z=6)",
        lambda: robust_front(loss_z=6.0),
        {},
        _adaptx_recipe,
        lambda: adaptx.robust_adamw(LR, loss_z=6.0),
        "the recipe, also skipping a loss 6 standard deviations above its running mean",
    ),
)


def by_name(name: str) -> Defense:
    for d in DEFENSES:
        if d.name == name:
            return d
    raise KeyError(f"no defense named {name!r}; known: {[d.name for d in DEFENSES]}")
