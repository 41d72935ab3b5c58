"""What each part of a defense did at one step, read from the optimizer's state.

A replayed optimizer is the whole thing (defense and AdamW), so every part that can act
is scored: a skip, a gradient clip (global norm or elements), an update clip (StableAdamW's
per-tensor RMS clip of Adam's update), a moment reset (SPAM). :class:`Step` holds the flags
and the norm that reached Adam's moments:

.. math::

    \\text{passed}_t = \\begin{cases}
      \\|g_t\\| \\cdot s_t & \\text{the step was taken, clipped by } s_t \\le 1 \\\\
      0 & \\text{skipped, and the update applied is finite} \\\\
      \\text{NaN} & \\text{skipped, but the update applied is not finite (} 0 \\cdot \\text{NaN)}
    \\end{cases}

For an ``optax.chain`` the norm that reached Adam is recorded by :func:`tap`, placed just
before it; adaptx's recipes report it (``guard/grad_norm`` times the clip's ``scale``).
Under OLMo-core's rule a skipped NaN step still writes ``old + 0 * NaN`` into the inner
state, the tap's included, so every later step of that replay reads as clipped: like the
run's moments, it never recovers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import adaptx
from bench.stability import peers


class Step(NamedTuple):
    """One step's observations (0-d arrays; booleans as bool)."""

    passed: jax.Array  # float32: the norm that reached Adam's moments (see above)
    skip: jax.Array
    grad_clip: jax.Array
    update_clip: jax.Array
    moment_reset: jax.Array


#: A gradient counts as clipped when less than this fraction of its norm gets through.
CLIPPED = 0.99


class TapState(NamedTuple):
    norm: jax.Array  # float32: global norm of what went through at the last step


def tap() -> optax.GradientTransformation:
    """An identity that keeps the global norm of what went through it in its state."""

    def init_fn(params):
        del params
        return TapState(jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del state, params
        return updates, TapState(optax.tree.norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def _find(state: Any, cls: type):
    """The first node of type ``cls`` in ``state`` (depth first), or None."""
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
    return next((x for x in leaves if isinstance(x, cls)), None)


def _adam_parts(figures: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Element clip, update clip and moment reset of adaptx's ``scale_by_adam``, if on."""
    no = jnp.zeros([], bool)
    spikes = figures.get("scale_by_adam/spikes")
    clipped = figures.get("scale_by_adam/tensors_clipped")
    warm = figures.get("scale_by_adam/momentum_scale")
    return (
        no if spikes is None else spikes > 0,
        no if clipped is None else clipped > 0,
        no if warm is None else warm < 1.0,
    )


def _step(norm, reached, skip, out_finite, figures) -> Step:
    """:class:`Step` from the incoming norm, the norm that reached Adam when taken, the skip."""
    elements, update_clip, reset = _adam_parts(figures)
    passed = jnp.where(skip, jnp.where(out_finite, 0.0, jnp.nan), reached)
    finite = jnp.isfinite(norm)
    scaled = finite & ~skip & ~(reached >= CLIPPED * jnp.where(finite, norm, 0.0))
    return Step(passed, skip, scaled | elements, update_clip & ~skip, reset & ~skip)


def chain_step(norm, out, state) -> Step:
    """A chain with a :func:`tap` before Adam, maybe inside a window rule or
    ``optax.apply_if_finite``."""
    out_finite = jnp.isfinite(optax.tree.norm(out))
    window = _find(state, peers.WindowSkipState)
    finite = _find(state, optax.ApplyIfFiniteState)
    skip = jnp.zeros([], bool)
    if window is not None:
        skip = window.skipped > 0
    if finite is not None:
        skip = ~finite.last_finite
    reached = _find(state, TapState).norm
    return _step(norm, reached, skip, out_finite, adaptx.telemetry(state))


def recipe_step(norm, out, state) -> Step:
    """An adaptx ``guard`` over a clip and Adam (``robust_adamw``, ``guard(zclip ...)``)."""
    figures = adaptx.telemetry(state)
    scale = jnp.ones([], jnp.float32)
    for key in ("clip_spikes/scale", "zclip/scale", "clip_by_global_norm/scale"):
        if key in figures:
            scale = figures[key]
    skip = figures["guard/last_reason"] > 0
    out_finite = jnp.isfinite(optax.tree.norm(out))
    return _step(norm, figures["guard/grad_norm"] * scale, skip, out_finite, figures)
