"""Variants: one implementation of one pipeline on one tree, ready to step.

:class:`JaxVariant` holds a jitted, donated JAX step with its params and state;
:class:`CeilingVariant` the bandwidth ceiling that runs in every cell's rounds. The
PyTorch and C variants are in :mod:`bench.update.external`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from bench.update.compiled import program_info
from bench.update.donation import own_buffers, quiet, shared_buffers
from bench.update.memory import probe_step
from bench.update.timing import CompileEvents, compile_events, recompile_times


class Variant:
    impl = ""
    desc = ""

    def __init__(self):
        self.times: list[float] = []
        self.info: dict[str, Any] = {}

    def step(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JaxVariant(Variant):
    def __init__(self, impl, desc, factory, np_params, grads_dev):
        super().__init__()
        self.impl, self.desc = impl, desc
        init, step = factory()
        self.p = jax.tree.map(jnp.asarray, np_params)
        self.g = grads_dev
        self.s = init(self.p)
        # A state whose leaves share one buffer cannot be donated ("donate the same buffer
        # twice"); count such leaves, then give each its own copy so the step can run.
        self.info["state_shared_buffers"] = shared_buffers(self.s)
        if self.info["state_shared_buffers"]:
            self.s = own_buffers(self.s)
        self.step_fn = step
        self.fn = jax.jit(step, donate_argnums=(0, 1))
        self.spec = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (self.p, self.s, self.g)
        )

    def compile(self, reps: int = 1, reps_below_s: float = 20.0):
        """The first call, timed phase by phase; then ``reps - 1`` more compiles when the
        first took under ``reps_below_s`` (the median is reported); then the program."""
        with quiet(), compile_events().collect() as ev:
            t0 = time.perf_counter()
            self.p, self.s = self.fn(self.p, self.s, self.g)
            jax.block_until_ready((self.p, self.s))
            first = time.perf_counter() - t0
        info = {k: ev.get(k, 0.0) for k in CompileEvents.NAMES.values()}
        runs = [sum(info.values())]
        if runs[0] < reps_below_s:
            runs += recompile_times(self.step_fn, self.spec, reps - 1)
        info["compile_s_runs"] = runs
        info["compile_s"] = statistics.median(runs)
        info["first_call_s"] = first
        with quiet():
            compiled = self.fn.lower(*self.spec).compile()  # served from the jit caches
        unit = 4 * sum(x.size for x in jax.tree.leaves(self.p))
        info.update(program_info(compiled, unit))
        self.info.update(info)

    def step(self):
        self.p, self.s = self.fn(self.p, self.s, self.g)
        jax.block_until_ready((self.p, self.s))

    def memory_probe(self):
        with quiet():
            self.info.update(probe_step(self.step))

    def close(self):
        self.p = self.s = None


class CeilingVariant(Variant):
    """The bandwidth ceiling, run inside every cell's rounds: donated x = a*x + b."""

    impl = "ceiling"
    desc = "donated in-place x * a + b (JAX)"

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.x = jnp.full((n,), 1.0, jnp.float32)
        self.fn = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
        self.step()

    def step(self):
        self.x = self.fn(self.x)
        self.x.block_until_ready()

    def close(self):
        self.x = None
