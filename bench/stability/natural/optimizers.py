"""The optimizers every workload runs: optax baselines, adaptx recipes and transforms.

Each entry builds a transformation from a learning rate. The Adam family runs at the
workload's ``learning_rate``, the SGD family at its ``sgd_learning_rate`` (only on the
workloads that have one: the recurrent ones). Everything else is each library's default,
except where a name says otherwise (``eps=1e-3``, ``b2=0.95``, ``clip c``).

``kind`` says whose it is: ``optax`` (a baseline), ``adaptx`` (a recipe or transform as
shipped), ``fp16`` (needs ``adaptx.loss_scale`` in the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax

import adaptx
from bench.stability.natural import mechanisms

CLIP_GRID = (0.1, 0.3, 1.0, 3.0)


class Entry(NamedTuple):
    name: str
    family: str  # "adam" or "sgd"
    kind: str  # "optax", "adaptx"
    make: Callable[[float], optax.GradientTransformation]
    loss_scaled: bool = False


def _clip_adamw(c):
    return lambda lr: optax.chain(optax.clip_by_global_norm(c), optax.adamw(lr))


def _clip_sgd(c):
    return lambda lr: optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr))


ADAPTIVE_CLIPS = {
    "clip_spikes": adaptx.clip_spikes,
    "zclip": adaptx.zclip,
    "autoclip": adaptx.autoclip,
    "adagc": adaptx.adagc,
}


def _adaptive_clips(base_name: str, family: str, base) -> list[Entry]:
    """adaptx's adaptive clips, each at its defaults, in front of optax's ``base(lr)``."""

    def make(clip):
        return lambda lr: optax.chain(clip(), base(lr))

    return [
        Entry(f"adaptx.{name} + {base_name}", family, "adaptx", make(clip))
        for name, clip in ADAPTIVE_CLIPS.items()
    ]


def adam_entries() -> list[Entry]:
    out = [
        Entry("optax adam", "adam", "optax", lambda lr: optax.adam(lr)),
        Entry("optax adamw", "adam", "optax", lambda lr: optax.adamw(lr)),
    ]
    out += [Entry(f"optax clip {c:g} + adamw", "adam", "optax", _clip_adamw(c)) for c in CLIP_GRID]
    out += [
        Entry("optax adam eps=1e-3", "adam", "optax", lambda lr: optax.adam(lr, eps=1e-3)),
        Entry("optax adam b2=0.95", "adam", "optax", lambda lr: optax.adam(lr, b2=0.95)),
        Entry("adaptx.adamw", "adam", "adaptx", lambda lr: adaptx.adamw(lr)),
        Entry("adaptx.robust_adamw", "adam", "adaptx", lambda lr: adaptx.robust_adamw(lr)),
        Entry("adaptx.stable_adamw", "adam", "adaptx", lambda lr: adaptx.stable_adamw(lr)),
        Entry("adaptx.spam", "adam", "adaptx", lambda lr: adaptx.spam(lr)),
        Entry("adaptx.adam_atan2", "adam", "adaptx", lambda lr: adaptx.adam_atan2(lr)),
    ]
    return out + _adaptive_clips("adamw", "adam", optax.adamw)


def sgd_entries() -> list[Entry]:
    out = [Entry("optax sgd", "sgd", "optax", lambda lr: optax.sgd(lr))]
    out += [Entry(f"optax clip {c:g} + sgd", "sgd", "optax", _clip_sgd(c)) for c in CLIP_GRID]
    out += [
        Entry(
            "adaptx.sgd (momentum=None)", "sgd", "adaptx", lambda lr: adaptx.sgd(lr, momentum=None)
        ),
    ]
    return out + _adaptive_clips("sgd", "sgd", optax.sgd)


def loss_scale_entries() -> list[Entry]:
    """float16 only: Adam behind adaptx's dynamic loss scaling."""
    return [
        Entry(
            "adaptx.dynamic_loss_scale(adamw)",
            "adam",
            "adaptx",
            lambda lr: adaptx.dynamic_loss_scale(inner=optax.adamw(lr)),
            loss_scaled=True,
        ),
        Entry(
            "adaptx.dynamic_loss_scale(robust_adamw)",
            "adam",
            "adaptx",
            lambda lr: adaptx.dynamic_loss_scale(inner=adaptx.robust_adamw(lr)),
            loss_scaled=True,
        ),
    ]


QUICK = ("optax clip 1 + adamw", "adaptx.robust_adamw", "optax clip 1 + sgd")


def mechanism_entries() -> list[Entry]:
    """Mechanisms under test: the prototypes of :mod:`bench.stability.natural.mechanisms`,
    optax's AMSGrad (the second moment never decreases) and RAdam (Liu et al. 2020's
    rectified early steps), a 100-step linear warm-up, and two configurations of adaptx's
    parts (robust_adamw without update clipping; robust_adamw with its second moment in the
    parameters' dtype, its default before it became float32; its parts with float32
    moments), and Adam on the gradient divided by its global norm (optax's
    ``normalize_by_update_norm``), alone and inside robust_adamw's guard with its update
    clip."""
    f32 = jnp.float32
    return [
        Entry("optax amsgrad", "adam", "mechanism", lambda lr: optax.amsgrad(lr)),
        Entry("optax radam", "adam", "mechanism", lambda lr: optax.radam(lr)),
        Entry(
            "optax adamw + warm-up 100",
            "adam",
            "mechanism",
            lambda lr: optax.adamw(optax.linear_schedule(0.0, lr, 100)),
        ),
        Entry("catch-up c=1", "adam", "mechanism", lambda lr: mechanisms.catchup_adamw(lr, 1.0)),
        Entry(
            "lag back-off d=1.2", "adam", "mechanism", lambda lr: mechanisms.lag_backoff_adamw(lr)
        ),
        Entry(
            "lag back-off d=1.2 + RAdam",
            "adam",
            "mechanism",
            lambda lr: mechanisms.lag_backoff_adamw(lr, rectify=True),
        ),
        Entry(
            "robust_adamw(update_rms_clip=None)",
            "adam",
            "mechanism",
            lambda lr: adaptx.robust_adamw(lr, update_rms_clip=None),
        ),
        Entry(
            "robust_adamw(nu_dtype=None)",
            "adam",
            "mechanism",
            lambda lr: adaptx.robust_adamw(lr, nu_dtype=None),
        ),
        Entry(
            "normalized gradient + adamw",
            "adam",
            "mechanism",
            lambda lr: optax.chain(optax.normalize_by_update_norm(), optax.adamw(lr)),
        ),
        Entry(
            "guard(normalized gradient + robust Adam)",
            "adam",
            "mechanism",
            lambda lr: adaptx.guard(
                adaptx.chain(
                    optax.normalize_by_update_norm(),
                    adaptx.scale_by_adam(nu_dtype=f32, update_rms_clip=5.0),
                    optax.add_decayed_weights(1e-4),
                    adaptx.scale_by_learning_rate(lr),
                )
            ),
        ),
        Entry(
            "robust parts with float32 moments",
            "adam",
            "mechanism",
            lambda lr: adaptx.guard(
                adaptx.chain(
                    adaptx.clip_spikes(initial_max_norm=1.0),
                    adaptx.scale_by_adam(mu_dtype=f32, nu_dtype=f32, update_rms_clip=5.0),
                    optax.add_decayed_weights(1e-4),
                    adaptx.scale_by_learning_rate(lr),
                )
            ),
        ),
    ]
