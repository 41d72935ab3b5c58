"""Every defense the benchmark compares, defined once, as the whole optimizer.

A :class:`Defense` builds the full optimizer, defense and AdamW together (``build(**hp)``;
the hyperparameters ``hp`` may be tracers, so one compilation serves a whole calibration
grid). The same object is replayed on the traces and timed by ``cost.py``. ``observe``
reads what each of its parts did at a step (:mod:`bench.stability.observe`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

import adaptx
from bench.stability import observe, peers

LR = 1e-3
WEIGHT_DECAY = 1e-4


class Defense(NamedTuple):
    name: str
    build: Callable[..., optax.GradientTransformation]  # replayed (hp may be tracers)
    hp: dict
    observe: Callable[[jax.Array, Any, Any], observe.Step]  # (norm in, update out, state)
    timed: Callable[[], optax.GradientTransformation]  # what cost.py times
    source: str


def _adamw():
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def _chain(name: str, source: str, *front: Callable, wrap: Callable = lambda tx: tx) -> Defense:
    """``wrap(chain(front..., adamw))``: replayed with :func:`observe.tap` before AdamW,
    timed without it."""

    def build(tap: bool = True):
        taps = (observe.tap(),) if tap else ()
        return wrap(optax.chain(*(f() for f in front), *taps, _adamw()))

    return Defense(name, build, {}, observe.chain_step, lambda: build(tap=False), source)


def robust(**hp) -> optax.GradientTransformation:
    """``adaptx.robust_adamw`` with these keyword overrides, replayed as it is."""
    return adaptx.robust_adamw(LR, weight_decay=WEIGHT_DECAY, **hp)


def _recipe(name: str, source: str, build: Callable) -> Defense:
    return Defense(name, build, {}, observe.recipe_step, build, source)


def _previous_rule():
    return adaptx.guard(
        optax.chain(
            adaptx.zclip(),
            adaptx.scale_by_adam(update_rms_clip=1.0),
            optax.add_decayed_weights(WEIGHT_DECAY),
            optax.scale(-LR),
        )
    )


def _clip():
    return optax.clip_by_global_norm(1.0)


DEFENSES: tuple[Defense, ...] = (
    _chain("none", "optax.adamw, nothing else"),
    _chain("optax clip 1.0", "optax.clip_by_global_norm(1.0) + adamw", _clip),
    _chain(
        "optax apply_if_finite(clip 1.0)",
        "optax.apply_if_finite(clip + adamw, max_consecutive_errors=20)",
        _clip,
        wrap=lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=20),
    ),
    _chain(
        "levanter skip step",
        "marin-community/marin src/levanter/optim/skipstep.py (c877ddb): loss and norm, "
        "update x 0, inner state selected with where; around adamw",
        wrap=peers.levanter,
    ),
    _chain(
        "OLMo-core skip step",
        "allenai/OLMo-core src/olmo_core/optim/skip_step_optimizer.py (067267c): two-sided "
        "z-score, update and moment updates x 0; around adamw",
        wrap=peers.olmo_core,
    ),
    _chain(
        "MaxText (clip 1.0, then skip)",
        "AI-Hypercomputer/maxtext src/maxtext/optimizers/optimizers.py skip_step_on_spikes "
        "(a90f992) as trainers/pre_train/train.py (000e6d8) calls it: clip 1.0, loss and "
        "clipped norm, lax.cond; around adamw",
        wrap=peers.maxtext,
    ),
    _chain(
        "MaxText (no clip, skip)",
        "the same with gradient_clipping_threshold=0",
        wrap=lambda tx: peers.maxtext(tx, clip=None),
    ),
    _chain(
        "zclip (paper defaults)",
        "Kumar et al. 2025: alpha 0.97, z 2.5, 25 warm-up steps",
        adaptx.zclip,
    ),
    _chain(
        "autoclip (paper defaults)",
        "Seetharaman et al. 2020: 10th percentile, history 1000",
        adaptx.autoclip,
    ),
    _recipe(
        "guard + zclip 2.5 (robust_adamw's previous rule)",
        "the recipe's previous rule, guard(zclip() + update-clipped AdamW), as a plain optax.chain",
        _previous_rule,
    ),
    _recipe(
        "adaptx.robust_adamw",
        "guard(clip_spikes + update-clipped AdamW), the recipe's defaults",
        robust,
    ),
    _recipe(
        "adaptx.robust_adamw(update_rms_clip=None)",
        "the recipe without StableAdamW's update clipping: detector and guard only",
        lambda **hp: robust(update_rms_clip=None, **hp),
    ),
    _recipe(
        "adaptx.robust_adamw(loss_z=6)",
        "the recipe, also skipping a loss 6 standard deviations above its running mean",
        lambda **hp: robust(loss_z=6.0, **hp),
    ),
)


def by_name(name: str) -> Defense:
    for d in DEFENSES:
        if d.name == name:
            return d
    raise KeyError(f"no defense named {name!r}; known: {[d.name for d in DEFENSES]}")
