"""Faults injected into a recorded trace of (loss, gradient norm), one kind at a time."""

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


class Scenario(NamedTuple):
    """One replay's inputs: norms, losses, and where the faults are."""

    name: str
    norms: np.ndarray  # float32 [T]
    losses: np.ndarray  # float32 [T]
    fault_steps: np.ndarray  # int [K], empty for the clean and shift scenarios
    shift_from: int | None


def fault_steps(n_steps: int, seed: int, gap: int = AFTERSHOCK + 10) -> np.ndarray:
    """A random step among the first 30 (in every warm-up), then random steps >= ``gap`` apart."""
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 30))
    steps = [t]
    while True:
        t += gap + int(rng.integers(0, gap))
        if t >= n_steps - AFTERSHOCK:
            return np.array(steps)
        steps.append(t)


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
    """The clean run; each fault kind at the same random steps, and alone at the very first
    step (``"<kind> @0"``, before any statistics exist); and the lasting shift."""
    norms = np.asarray(norms, np.float32)
    losses = np.asarray(losses, np.float32)
    steps = fault_steps(len(norms), seed)
    out = [Scenario("clean", norms, losses, steps[:0], None)]
    for kind in KINDS:
        out.append(Scenario(kind, *_inject(kind, norms, losses, steps), steps, None))
        first = np.array([0])
        out.append(Scenario(f"{kind} @0", *_inject(kind, norms, losses, first), first, None))
    half = len(norms) // 2
    n = norms.copy()
    n[half:] *= SHIFT
    out.append(Scenario("shift 10x", n, losses, steps[:0], half))
    return out
