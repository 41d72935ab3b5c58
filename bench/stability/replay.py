"""Replays a (loss, gradient norm) trace through a jitted transformation and scores it.

The gradient at step t is a fixed direction times the recorded norm (a NaN or inf norm
gives NaN or inf leaves), and the recorded loss is passed as ``value=``; every rule
compared here looks at the gradient only through its global norm, and at the loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.stability import faults as faults_lib
from bench.stability.defenses import Defense

_DIM = 8
#: A step counts as an intervention when less than this fraction of the norm gets through.
INTERVENED = 0.99
#: The first tenth of a run is its warm-up, left out of the healthy intervention rate.
WARMUP_FRACTION = 0.1


_COMPILED: dict[str, Any] = {}


def _compiled(defense: Defense):
    if defense.name not in _COMPILED:
        _COMPILED[defense.name] = _build(defense)
    return _COMPILED[defense.name]


def _build(defense: Defense):
    def run(hp: dict, norms: jax.Array, losses: jax.Array) -> jax.Array:
        tx = optax.with_extra_args_support(defense.build(**hp))
        params = {"w": jnp.zeros([_DIM], jnp.float32)}
        direction = jnp.full([_DIM], 1.0 / np.sqrt(_DIM), jnp.float32)

        def body(state, x):
            n, loss = x
            out, state = tx.update({"w": direction * n}, state, params, value=loss)
            return state, defense.passed(optax.tree.norm(out), state)

        return jax.lax.scan(body, tx.init(params), (norms, losses))[1]

    return jax.jit(run)


def passed_norms(defense: Defense, norms: np.ndarray, losses: np.ndarray, hp: dict | None = None):
    """The norm each step let through (0 for a skipped step), as a NumPy array."""
    hp = dict(defense.hp if hp is None else hp)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    out = _compiled(defense)(hp, jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
    return np.asarray(out, np.float64)


def interventions(norms: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """Steps whose finite norm was scaled below 0.99 of itself, or skipped."""
    finite = np.isfinite(norms)
    with np.errstate(invalid="ignore"):
        return finite & ~(passed >= INTERVENED * np.where(finite, norms, 0.0))


def _caught(passed: np.ndarray, median: float) -> np.ndarray:
    """A fault is caught when what got through is finite and at most 10x the run's median norm."""
    return np.isfinite(passed) & (passed <= 10 * median)


def score(defense: Defense, trace: dict[str, np.ndarray], seed: int, hp: dict | None = None):
    """Every figure of one defense on one trace: rates, recalls, aftershocks, adaptation."""
    scen = faults_lib.scenarios(trace["grad_norm"], trace["loss"], seed)
    runs = {s.name: (s, passed_norms(defense, s.norms, s.losses, hp)) for s in scen}
    clean_s, clean = runs["clean"]
    base = interventions(clean_s.norms, clean)
    n = len(clean)
    start = int(np.ceil(WARMUP_FRACTION * n))
    median = float(np.median(clean_s.norms[np.isfinite(clean_s.norms)]))
    out: dict[str, Any] = {
        "steps": n,
        "healthy_rate": float(base[start:].mean()),
        "warmup_rate": float(base[:start].mean()),
        "recall": {},
        "first_step_caught": {},
    }
    excess = []
    for kind in faults_lib.KINDS:
        s, passed = runs[f"{kind} @0"]
        out["first_step_caught"][kind] = bool(_caught(passed[0], median))
        s, passed = runs[kind]
        out["recall"][kind] = float(_caught(passed[s.fault_steps], median).mean())
        hit = interventions(s.norms, passed)
        for f in s.fault_steps:
            window = slice(f + 1, min(f + 1 + faults_lib.AFTERSHOCK, n))
            excess.append(int(hit[window].sum()) - int(base[window].sum()))
    out["aftershocks_mean"] = float(np.mean(excess))
    out["aftershocks_max"] = int(np.max(excess))
    s, passed = runs["shift 10x"]
    extra = interventions(s.norms, passed) & ~base
    after = np.flatnonzero(extra[s.shift_from :])
    out["shift_interventions"] = int(after.size)
    out["shift_adapt_steps"] = int(after[-1] + 1) if after.size else 0
    out["shift_steps_left"] = n - s.shift_from
    return out
