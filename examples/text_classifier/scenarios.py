"""What ``compare.py`` compares: the scenarios (model and training setup), the optimizers of
each family, and the scripted faults.

Every Adam variant has the same learning rate schedule and weight decay (matrices only),
every SGD variant the same momentum. With ``per_tensor``, the adaptx rows keep per-tensor
figures where their transforms take ``per_tensor`` (``adaptx.report`` then names the
tensor that led each event); optax's rows, and adaptx recipes without the option, are
built as they are, so that no row gains a defense it does not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optax
from config import Config
from optimizers import decay_mask

import adaptx

# --------------------------------------------------------------------------------------
# Scenarios: the model and training setup under test, as config.Config overrides. Both train
# from scratch (no IMDB pretraining): the point here is the optimizer, not the last point
# of accuracy.

SCENARIOS: dict[str, dict] = {
    # The main job's BiLSTM with the Adam family; faults are injected on top of it.
    "lstm": dict(config=dict(epochs=3, pretrain_epochs=0, ema=0.0), family="adam"),
    # The small transformer encoder from scratch, light dropout and no bigram table (which
    # would make the step mostly an update of 6.4 M embedding rows): learns in 3 epochs.
    "transformer": dict(
        config=dict(
            encoder="transformer",
            epochs=3,
            pretrain_epochs=0,
            ema=0.0,
            bigrams=0,
            dropout=0.1,
            embed_dropout=0.1,
        ),
        family="adam",
    ),
    # A plain tanh RNN over 200-token IMDB reviews whose recurrent matrix is orthogonal x 1.5,
    # SGD with momentum: the gradient explodes by itself (norm ~3e3 at the first step), no
    # injection needed.
    "rnn": dict(
        config=dict(
            encoder="rnn",
            recurrent_scale=1.5,
            dataset="imdb",
            max_len=200,
            hidden_dim=128,
            bigrams=0,
            lr=0.05,
            warmup_steps=0,
            buckets=1,
            embed_dropout=0.0,
            dropout=0.0,
            epochs=1,
            pretrain_epochs=0,
            ema=0.0,
        ),
        family="sgd",
        steps=300,
    ),
}


# --------------------------------------------------------------------------------------
# The optimizers under comparison, defined once: name -> factory(lr, config, per_tensor).

Factories = dict[str, Callable[[], optax.GradientTransformation]]


def _adam_family(lr, config: Config, per_tensor: bool = False) -> Factories:
    wd, c, mask = config.weight_decay, config.max_norm, decay_mask
    pt = {"per_tensor": True} if per_tensor else {}

    def adamw():
        return optax.adamw(lr, weight_decay=wd, mask=mask)

    def recipe(**kw):
        return adaptx.adamw(lr, weight_decay=wd, max_norm=c, mask=mask, **kw)

    return {
        "optax adamw (no clipping)": adamw,
        "optax apply_if_finite(clip+adamw)": lambda: optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(c), adamw()), max_consecutive_errors=20
        ),
        "adaptx.adamw (= clip+adamw)": lambda: recipe(**pt),
        "adaptx autoclip+adamw": lambda: optax.chain(adaptx.autoclip(**pt), adamw()),
        "adaptx guard(adamw)": lambda: adaptx.guard(recipe(), **pt),
        "adaptx.robust_adamw": lambda: adaptx.robust_adamw(lr, weight_decay=wd, mask=mask, **pt),
    }


def _sgd_family(lr, config: Config, per_tensor: bool = False) -> Factories:
    c = config.max_norm
    pt = {"per_tensor": True} if per_tensor else {}

    def sgd():
        return optax.sgd(lr, momentum=0.9)

    def recipe(**kw):
        return adaptx.sgd(lr, momentum=0.9, max_norm=c, **kw)

    return {
        "optax sgd (no clipping)": sgd,
        "adaptx.sgd (= clip+sgd)": lambda: recipe(**pt),
        "adaptx zclip+sgd": lambda: optax.chain(adaptx.zclip(max_norm=c, **pt), sgd()),
        "adaptx autoclip+sgd": lambda: optax.chain(adaptx.autoclip(**pt), sgd()),
        "adaptx guard(clip+sgd)": lambda: adaptx.guard(recipe(), **pt),
    }


FAMILIES = {"adam": _adam_family, "sgd": _sgd_family}


# --------------------------------------------------------------------------------------


def fault_schedule(total_steps: int, spikes: bool, nan: bool, spike_scale: float):
    """Steps and multipliers of the scripted faults (identical for every optimizer)."""
    faults: dict[int, float] = {}
    if spikes:
        for frac in (0.3, 0.5, 0.7):
            faults[int(frac * total_steps)] = spike_scale
    if nan:
        faults[int(0.4 * total_steps)] = math.nan
    return faults
