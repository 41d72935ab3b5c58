"""Replays a (loss, gradient norm) trace through a defense's whole optimizer and scores it.

The gradient at step t is a fixed direction times the recorded norm (a NaN or inf norm
gives NaN or inf leaves), and the recorded loss is passed as ``value=``; every rule
compared here looks at the gradient only through its global norm, and at the loss. The
optimizer is the defense with AdamW, stepped on the parameters, so that every part that
can act is counted (:mod:`bench.stability.observe`). A fixed direction is Adam's worst
case for update clipping: every element's ``m / sqrt(v)`` moves together.

All scenarios of a trace are replayed at once (``vmap`` over them, ``scan`` over steps).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.stability import faults as faults_lib
from bench.stability import observe
from bench.stability.defenses import Defense

_DIM = 8
#: Traces are padded (with their last values) to a multiple of this many steps, so that
#: runs of different lengths share one compilation; the padding is not scored.
_PAD = 400
#: The first tenth of a run is its warm-up; its intervention rate is reported apart.
WARMUP_FRACTION = 0.1
#: The parts whose interventions are counted, as :class:`observe.Step` names them.
PARTS = ("skip", "grad_clip", "update_clip", "moment_reset")

_COMPILED: dict[str, Any] = {}


def _compiled(defense: Defense):
    if defense.name not in _COMPILED:
        _COMPILED[defense.name] = _build(defense)
    return _COMPILED[defense.name]


def _build(defense: Defense):
    def one(hp: dict, norms: jax.Array, losses: jax.Array) -> observe.Step:
        tx = optax.with_extra_args_support(defense.build(**hp))
        params = {"w": jnp.zeros([_DIM], jnp.float32)}
        direction = jnp.full([_DIM], 1.0 / np.sqrt(_DIM), jnp.float32)

        def body(carry, x):
            p, state = carry
            n, loss = x
            out, state = tx.update({"w": direction * n}, state, p, value=loss)
            return (optax.apply_updates(p, out), state), defense.observe(n, out, state)

        return jax.lax.scan(body, (params, tx.init(params)), (norms, losses))[1]

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def observe_all(defense: Defense, norms: np.ndarray, losses: np.ndarray, hp: dict | None = None):
    """:class:`observe.Step` of NumPy arrays ``[scenarios, steps]`` for stacked inputs."""
    hp = dict(defense.hp if hp is None else hp)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    out = _compiled(defense)(hp, jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
    return observe.Step(*(np.asarray(x) for x in out))


def observe_one(defense: Defense, norms: np.ndarray, losses: np.ndarray, hp: dict | None = None):
    """:class:`observe.Step` of one replay (arrays ``[steps]``)."""
    out = observe_all(defense, np.asarray(norms)[None], np.asarray(losses)[None], hp)
    return observe.Step(*(x[0] for x in out))


def intervened(step: observe.Step) -> np.ndarray:
    """Steps on which any part acted."""
    return step.skip | step.grad_clip | step.update_clip | step.moment_reset


def _caught(passed: np.ndarray, median: float) -> np.ndarray:
    """A fault is caught when what reached Adam is finite and at most 10x the run's median."""
    return np.isfinite(passed) & (passed <= 10 * median)


def _rates(clean: observe.Step, start: int) -> dict:
    """Intervention rates of the clean replay, any part and each, warm-up and after it."""
    out = {}
    for label, sl in (("warmup", slice(None, start)), ("steady", slice(start, None))):
        out[f"{label}_rate"] = float(intervened(clean)[sl].mean())
        out[f"{label}_parts"] = {p: float(getattr(clean, p)[sl].mean()) for p in PARTS}
    return out


def score(defense: Defense, trace: dict[str, np.ndarray], seed: int, hp: dict | None = None):
    """Every figure of one defense on one trace: rates, recalls by regime, aftershocks,
    adaptation to a lasting rise."""
    scen = faults_lib.scenarios(trace["grad_norm"], trace["loss"], seed)
    n = len(trace["grad_norm"])
    pad = (0, -n % _PAD)
    norms = np.stack([np.pad(s.norms, pad, mode="edge") for s in scen])
    losses = np.stack([np.pad(s.losses, pad, mode="edge") for s in scen])
    obs = observe_all(defense, norms, losses, hp)
    runs = {s.name: (s, observe.Step(*(x[i, :n] for x in obs))) for i, s in enumerate(scen)}
    clean_s, clean = runs["clean"]
    base = intervened(clean)
    median = float(np.median(clean_s.norms[np.isfinite(clean_s.norms)]))
    out: dict[str, Any] = {"steps": n, **_rates(clean, int(np.ceil(WARMUP_FRACTION * n)))}
    out["warmup_recall"] = {k: [] for k in faults_lib.KINDS}
    out["steady_recall"] = {}
    excess = []
    for s, step in runs.values():
        if s.regime == "warm-up":
            out["warmup_recall"][s.kind].append(
                bool(_caught(step.passed[s.fault_steps[0]], median))
            )
        elif s.regime == "steady":
            out["steady_recall"][s.kind] = float(_caught(step.passed[s.fault_steps], median).mean())
            hit = intervened(step)
            for f in s.fault_steps:
                window = slice(f + 1, min(f + 1 + faults_lib.AFTERSHOCK, n))
                excess.append(int(hit[window].sum()) - int(base[window].sum()))
    out["warmup_recall"] = {k: float(np.mean(v)) for k, v in out["warmup_recall"].items()}
    out["aftershocks_mean"] = float(np.mean(excess)) if excess else 0.0
    out["aftershocks_max"] = int(np.max(excess)) if excess else 0
    s, step = runs["shift 10x"]
    extra = intervened(step) & ~base
    after = np.flatnonzero(extra[s.shift_from :])
    out["shift_interventions"] = int(after.size)
    out["shift_adapt_steps"] = int(after[-1] + 1) if after.size else 0
    out["shift_steps_left"] = n - s.shift_from
    return out
