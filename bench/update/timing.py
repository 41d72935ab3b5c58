"""Clocks: compile phases, interleaved rounds, paired ratios and the bandwidth ceiling.

>>> summarize([0.001, 0.003, 0.002])
{'median_ms': 2.0, 'min_ms': 1.0, 'max_ms': 3.0, 'reps': 3}
>>> paired([{"a": 2.0, "b": 1.0}, {"a": 3.0, "b": 1.0}], "a", "b", 2500.0)
{'median': 2.5, 'min': 2.0, 'max': 3.0, 'of_medians': 2.5}
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.update.config import CEILING_PASSES
from bench.update.donation import quiet


class CompileEvents:
    """Collects JAX's own compile-phase durations (trace, lowering, XLA compile)."""

    NAMES = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "xla_compile_s",
    }

    def __init__(self):
        self.current: dict[str, float] | None = None
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if self.current is not None and name in self.NAMES:
            key = self.NAMES[name]
            self.current[key] = self.current.get(key, 0.0) + float(duration)

    @contextlib.contextmanager
    def collect(self):
        self.current = {}
        try:
            yield self.current
        finally:
            self.current = None


_EVENTS: CompileEvents | None = None


def compile_events() -> CompileEvents:
    global _EVENTS
    if _EVENTS is None:
        _EVENTS = CompileEvents()
    return _EVENTS


def recompile_times(step_fn, spec, reps: int) -> list[float]:
    """Seconds for each of ``reps`` more compiles of ``step_fn`` on the shapes ``spec``.

    A fresh wrapper each time, so neither the trace nor the executable comes from a cache.
    """
    runs = []
    for _ in range(reps):
        fresh = jax.jit(lambda *a, f=step_fn: f(*a), donate_argnums=(0, 1))
        with quiet():
            t0 = time.perf_counter()
            fresh.trace(*spec).lower().compile()
            runs.append(time.perf_counter() - t0)
    return runs


def summarize(times: list[float]) -> dict:
    ms = [t * 1e3 for t in times]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "reps": len(ms),
    }


def run_rounds(variants, reps: int, warmup: int) -> list[dict[str, float]]:
    """Interleaved rounds; returns the per-round times {impl: seconds} after warm-up."""
    rounds = []
    # A fresh random order every round (seeded: runs are repeatable). Rotating one fixed
    # order would keep each variant behind the same neighbour in every round, and a step
    # runs slower right after one that allocated and freed a large buffer (optax's).
    rng = random.Random(0)
    for r in range(warmup + reps):
        order = rng.sample(variants, len(variants))
        times = {}
        with quiet():
            for v in order:
                t0 = time.perf_counter()
                v.step()
                times[v.impl] = time.perf_counter() - t0
        if r >= warmup:
            rounds.append(times)
            for v in variants:
                v.times.append(times[v.impl])
    return rounds


def paired(rounds: list[dict[str, float]], impl: str, ref: str, median_ms: float) -> dict:
    """``impl``'s time over ``ref``'s, round by round; and the ratio of their medians."""
    ratios = [r[impl] / r[ref] for r in rounds]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "of_medians": median_ms / statistics.median([r[ref] * 1e3 for r in rounds]),
    }


def with_gbps(times: list[float], nbytes: int) -> dict:
    """:func:`summarize`, plus the GB/s that moving ``nbytes`` in the median time makes."""
    s = summarize(times)
    s["gbps"] = nbytes / (s["median_ms"] * 1e-3) / 1e9
    return s


def ceiling(n: int, reps: int, warmup: int, clib) -> dict:
    """Bandwidth ceiling: donated in-place x = a*x + b on n float32 (JAX; and C if built)."""
    x = jnp.full((n,), 1.0, jnp.float32)
    f = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
    xs = np.ones(n, np.float32) if clib is not None else None
    tj, tc = [], []
    for r in range(warmup + reps):
        t0 = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        dt = time.perf_counter() - t0
        if r >= warmup:
            tj.append(dt)
        if xs is not None:
            t0 = time.perf_counter()
            clib.triad(xs, 0.999, 0.001)
            dt = time.perf_counter() - t0
            if r >= warmup:
                tc.append(dt)
    nbytes = CEILING_PASSES * 4 * n
    out = {"elements": n, "bytes": nbytes, "jax": with_gbps(tj, nbytes)}
    if tc:
        out["c"] = with_gbps(tc, nbytes)
    del x, xs
    return out
