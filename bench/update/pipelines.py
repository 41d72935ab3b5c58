"""Each pipeline as a JAX step: optax, adaptx and the hand-written reference.

A *factory* returns ``(init, step)``: ``init(params) -> state`` and
``step(params, state, grads) -> (params, state)``, the function that is jitted with
params and state donated. :func:`jax_variants` lists them per pipeline.

>>> sorted(jax_variants("clip+adamw", 1, ("optax", "adaptx", "jax", "adaptx-packed")))
['adaptx', 'jax', 'optax']
>>> sorted(jax_variants("adam_atan2", 2, ("optax", "adaptx", "adaptx-packed", "adaptx-adamw")))
['adaptx', 'adaptx-adamw', 'adaptx-packed', 'optax']
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import adaptx
from bench.update.config import B1, B2, EPS, LR, MAX_NORM, PACK, RECIPES, WD

#: Each recipe's adaptx function, looked up when this module is imported: a recipe the
#: library lacks fails here, loudly, rather than as a missing row in the tables.
RECIPE_FNS = {name: getattr(adaptx, name) for name in RECIPES}
#: The recipes that also run with ``pack_small_leaves`` on trees of more than one leaf.
PACKED_RECIPES = ("robust_adamw", "stable_adamw", "spam", "adam_atan2")
#: Options a recipe is called with besides the learning rate and weight decay.
RECIPE_OPTIONS = {"adam_atan2": "max_norm=1"}


def hand_written(pipeline: str):
    """The same math written directly in JAX, one jitted function: the reference."""

    def init(params):
        if pipeline not in ("clip+adamw", "adamw"):
            return ()  # stateless: no moments to carry through the call
        z = jax.tree.map(jnp.zeros_like, params)
        return (jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.zeros_like, params))

    def clip_scale(g):
        sq = sum(jnp.sum(x * x) for x in jax.tree.leaves(g))
        norm = jnp.sqrt(sq)
        return jnp.where(norm > MAX_NORM, MAX_NORM / jnp.where(norm > MAX_NORM, norm, 1.0), 1.0)

    def step(p, s, g):
        if pipeline == "sgd-floor":
            return jax.tree.map(lambda p_, g_: p_ - LR * g_, p, g), s
        if pipeline == "clip":
            sc = clip_scale(g)
            return jax.tree.map(lambda p_, g_: p_ + sc * g_, p, g), s
        count, m, v = s
        sc = clip_scale(g) if pipeline == "clip+adamw" else 1.0
        count = count + 1
        t = count.astype(jnp.float32)
        k1, k2 = 1.0 / (1.0 - B1**t), 1.0 / (1.0 - B2**t)

        def leaf(p_, g_, m_, v_):
            g_ = g_ * sc
            m_ = B1 * m_ + (1 - B1) * g_
            v_ = B2 * v_ + (1 - B2) * g_ * g_
            return p_ - LR * (k1 * m_ / (jnp.sqrt(k2 * v_) + EPS) + WD * p_), m_, v_

        out = jax.tree.map(leaf, p, g, m, v)
        td = jax.tree.structure(p)
        p2, m2, v2 = (td.unflatten([o[i] for o in td.flatten_up_to(out)]) for i in range(3))
        return p2, (count, m2, v2)

    return init, step


def optax_step(tx):
    """A gradient transformation as ``(init, step)``: update, then apply the updates."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return tx.init, step


def optax_clip_adamw():
    return optax.chain(
        optax.clip_by_global_norm(MAX_NORM), optax.adamw(LR, B1, B2, EPS, weight_decay=WD)
    )


def adaptx_adamw(max_norm, **kwargs):
    return adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=max_norm, **kwargs)


def recipe(name: str, **kwargs):
    """The adaptx recipe ``name`` with the benchmark's hyperparameters."""
    fn = RECIPE_FNS[name]
    if name == "guard":
        return fn(adaptx_adamw(MAX_NORM))
    if name == "zclip":
        return optax.chain(fn(), adaptx_adamw(None))
    if name == "adam_atan2":  # clipped, like the optax chain it is compared with
        return fn(LR, B1, B2, weight_decay=WD, max_norm=MAX_NORM, **kwargs)
    return fn(LR, weight_decay=WD, **kwargs)


def robust_unguarded():
    """``robust_adamw``'s inner chain (its defaults) without the ``guard`` wrapper.

    A plain ``optax.chain``: clip_spikes announces its output as ``s * g`` on the array
    itself, so Adam's update-RMS reduction reads ``g`` here as it does inside the recipe.
    """
    return optax.chain(
        adaptx.clip_spikes(initial_max_norm=1.0),
        adaptx.scale_by_adam(B1, B2, EPS, update_rms_clip=5.0),
        optax.add_decayed_weights(WD),
        optax.scale_by_learning_rate(LR),
    )


def _apply_if_finite_clip_adamw():
    return optax.apply_if_finite(optax_clip_adamw(), 10)


NEAREST_OPTAX = {
    # recipe -> (description, factory)
    "robust_adamw": (
        "apply_if_finite(chain(clip_by_global_norm(1), adamw), 10)",
        _apply_if_finite_clip_adamw,
    ),
    "guard": (
        "apply_if_finite(chain(clip_by_global_norm(1), adamw), 10)",
        _apply_if_finite_clip_adamw,
    ),
    "stable_adamw": ("chain(clip_by_global_norm(1), adamw)", optax_clip_adamw),
    "spam": ("chain(clip_by_global_norm(1), adamw)", optax_clip_adamw),
    "zclip": ("chain(clip_by_global_norm(1), adamw)", optax_clip_adamw),
    "adam_atan2": ("chain(clip_by_global_norm(1), adamw)", optax_clip_adamw),
}

Variants = dict[str, tuple[str, Callable]]


def _core_variants(pipeline: str, n_leaves: int) -> Variants:
    hand = ("hand-written", lambda: hand_written(pipeline))
    if pipeline == "clip+adamw":
        out = {
            "optax": (
                "chain(clip_by_global_norm(1), adamw)",
                lambda: optax_step(optax_clip_adamw()),
            ),
            "adaptx": ("adamw(max_norm=1)", lambda: optax_step(adaptx_adamw(MAX_NORM))),
            "jax": hand,
        }
        if n_leaves > 1:
            out["adaptx-packed"] = (
                f"adamw(max_norm=1, pack_small_leaves={PACK})",
                lambda: optax_step(adaptx_adamw(MAX_NORM, pack_small_leaves=PACK)),
            )
        return out
    if pipeline == "adamw":
        return {
            "optax": ("adamw", lambda: optax_step(optax.adamw(LR, B1, B2, EPS, weight_decay=WD))),
            "adaptx": ("adamw(max_norm=None)", lambda: optax_step(adaptx_adamw(None))),
            "jax": hand,
        }
    if pipeline == "clip":
        return {
            "optax": (
                "clip_by_global_norm(1)",
                lambda: optax_step(optax.clip_by_global_norm(MAX_NORM)),
            ),
            "adaptx": (
                "clip_by_global_norm(1)",
                lambda: optax_step(adaptx.clip_by_global_norm(MAX_NORM)),
            ),
            "jax": hand,
        }
    if pipeline == "sgd-floor":
        return {
            "optax": ("sgd(lr)", lambda: optax_step(optax.sgd(LR))),
            "jax": ("hand-written p - lr*g", lambda: hand_written(pipeline)),
        }
    return {}


def _recipe_variants(pipeline: str, n_leaves: int) -> Variants:
    desc, factory = NEAREST_OPTAX[pipeline]
    options = RECIPE_OPTIONS.get(pipeline)
    out = {
        "optax": (desc, lambda: optax_step(factory())),
        "adaptx": (
            f"{pipeline}({options})" if options else pipeline,
            lambda: optax_step(recipe(pipeline)),
        ),
    }
    if n_leaves > 1 and pipeline in PACKED_RECIPES:
        packed = ", ".join(filter(None, (options, f"pack_small_leaves={PACK}")))
        out["adaptx-packed"] = (
            f"{pipeline}({packed})",
            lambda: optax_step(recipe(pipeline, pack_small_leaves=PACK)),
        )
    plain = (
        "adamw(max_norm=1): clip + AdamW, no defenses",
        lambda: optax_step(adaptx_adamw(MAX_NORM)),
    )
    if pipeline == "robust_adamw":
        out["adaptx-base"] = (
            "robust_adamw's chain without guard: chain(clip_spikes(initial_max_norm=1), "
            "scale_by_adam(update_rms_clip=5), decay, lr)",
            lambda: optax_step(robust_unguarded()),
        )
        out["adaptx-adamw"] = plain
    elif pipeline == "guard":
        out["adaptx-base"] = ("the guarded chain alone: " + plain[0], plain[1])
    else:
        out["adaptx-adamw"] = plain
    return out


def jax_variants(pipeline: str, n_leaves: int, impls) -> Variants:
    """impl -> (description, factory returning (init_fn, step_fn))."""
    build = _recipe_variants if pipeline in RECIPES else _core_variants
    return {k: v for k, v in build(pipeline, n_leaves).items() if k in impls}
