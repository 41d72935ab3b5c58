"""Faults injected into a recorded trace of (loss, gradient norm), one kind at a time, in
two regimes that are scored apart.

* **Warm-up**: one fault alone, at step 0 or at a random step before :data:`WARMUP_END`,
  where no rule that learns from history has its history yet (the window rules of
  levanter, OLMo-core and MaxText start skipping once 63-64 values are in their window).
* **Steady state**: the first fault at a random step in ``[STEADY_START, STEADY_START +
  64)``, after every peer's 128-step window is full, then faults ``GAP`` to ``2 GAP - 1``
  steps apart, so that each fault has left every window (128 steps) before the next one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: name -> multiplier of the recorded norm at a fault step.
SPIKES = {"spike 10x": 10.0, "spike 100x": 100.0, "spike 1e4x": 1e4, "spike 1e8x": 1e8}
KINDS = (*SPIKES, "nan", "inf")
#: A lasting change of scale: every norm from the middle of the run on, times this.
SHIFT = 10.0
#: Steps after a fault in which interventions count as its aftershocks.
AFTERSHOCK = 50
#: The longest window of the peers' rules, in steps.
LONGEST_WINDOW = 128
#: Warm-up faults fall before this step (the window rules skip from step 63-64 on).
WARMUP_END = 64
#: Random warm-up fault steps per kind and trace, besides step 0.
WARMUP_DRAWS = 3
#: The first steady-state fault falls at this step or up to 63 after it.
STEADY_START = LONGEST_WINDOW + 22
#: Steady-state faults are at least this far apart (and less than twice as far).
GAP = LONGEST_WINDOW + 2


class Scenario(NamedTuple):
    """One replay's inputs: norms, losses, and where the faults are."""

    name: str
    regime: str  # "clean", "warm-up", "steady" or "shift"
    kind: str | None
    norms: np.ndarray  # float32 [T]
    losses: np.ndarray  # float32 [T]
    fault_steps: np.ndarray  # int [K], empty for the clean and shift scenarios
    shift_from: int | None


def steady_steps(n_steps: int, seed: int) -> np.ndarray:
    """Steady-state fault steps: the first in ``[STEADY_START, STEADY_START + 64)``, then
    ``GAP + U[0, GAP)`` apart, each at least :data:`AFTERSHOCK` steps before the end."""
    rng = np.random.default_rng(seed)
    t = STEADY_START + int(rng.integers(0, 64))
    steps = []
    while t < n_steps - AFTERSHOCK:
        steps.append(t)
        t += GAP + int(rng.integers(0, GAP))
    return np.array(steps, dtype=np.int64)


def warmup_steps(seed: int) -> np.ndarray:
    """Step 0 and :data:`WARMUP_DRAWS` distinct random steps in ``[1, WARMUP_END)``."""
    rng = np.random.default_rng(seed + 10_000)
    drawn = rng.choice(np.arange(1, WARMUP_END), size=WARMUP_DRAWS, replace=False)
    return np.concatenate([[0], np.sort(drawn)]).astype(np.int64)


def _inject(kind: str, norms: np.ndarray, losses: np.ndarray, steps) -> tuple:
    n, loss = norms.copy(), losses.copy()
    if kind in SPIKES:
        n[steps] *= SPIKES[kind]
    elif kind == "nan":  # a NaN loss gives NaN gradients
        n[steps], loss[steps] = np.nan, np.nan
    else:  # an overflow in the backward pass: the loss itself is finite
        n[steps] = np.inf
    return n, loss


def scenarios(norms: np.ndarray, losses: np.ndarray, seed: int) -> list[Scenario]:
    """The clean run; each fault kind at the steady-state steps (one replay) and alone at
    each warm-up step (one replay each); and the lasting shift."""
    norms = np.asarray(norms, np.float32)
    losses = np.asarray(losses, np.float32)
    steady = steady_steps(len(norms), seed)
    none = steady[:0]
    out = [Scenario("clean", "clean", None, norms, losses, none, None)]
    for kind in KINDS:
        if steady.size:
            out.append(
                Scenario(kind, "steady", kind, *_inject(kind, norms, losses, steady), steady, None)
            )
        for t in warmup_steps(seed):
            at = np.array([t])
            n, loss = _inject(kind, norms, losses, at)
            out.append(Scenario(f"{kind} @{t}", "warm-up", kind, n, loss, at, None))
    half = len(norms) // 2
    n = norms.copy()
    n[half:] *= SHIFT
    out.append(Scenario("shift 10x", "shift", None, n, losses, none, half))
    return out
