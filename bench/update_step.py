"""Benchmark of the optimizer step: adaptx vs optax (vs PyTorch, vs a C floor).

Times the jitted, donated step ``params, state <- apply_updates(params, update(grads,
state, params))`` of equivalent pipelines on several parameter trees:

* pipelines: ``clip+adamw`` (global-norm clip 1.0 then AdamW), ``adamw`` alone,
  ``clip`` alone (applied as ``p + clip(g)``), ``sgd-floor`` (``p - lr * g``: the
  cheapest step a tree can take, a compile/dispatch floor), and every adaptx defense
  recipe that exists (``robust_adamw``, ``stable_adamw``, ``spam``, ``guard``,
  ``zclip``) against the nearest optax chain;
* implementations: ``optax``, ``adaptx``, ``jax`` (a hand-written jitted step),
  ``adaptx-packed`` (``adaptx.adamw(..., pack_small_leaves=65536)``, trees of more than
  one leaf), ``torch``
  (``torch.optim.AdamW(fused=True)`` + ``clip_grad_norm_(foreach=True)``) and ``c``
  (``c_floor.py``, compiled with gcc at run time);
* trees: one 16M leaf, one 64M leaf, a transformer-like tree (~200 leaves, ~16M
  params) and 2000 leaves of 500 params (``--quick``: tiny versions of each).

For every cell: the variants of one (tree, pipeline) are compiled, then run in
interleaved rounds (each round runs every variant once, in a fresh random order), so machine
noise hits all of them alike; ``block_until_ready`` stops each clock. Reported: median,
min and max step time, the paired per-round ratio to optax, compile time measured
apart (trace + lowering + XLA compile, from JAX's own monitoring events, and the
first-call time), peak memory, the bytes the step must move (from the math), achieved
GB/s and its ratio to a bandwidth ceiling measured in the same run (a donated in-place
``x * a + b`` over as many float32 as the tree holds).

Run ``python bench/update_step.py --help`` for the flags; ``bench/README.md`` explains
the output.

>>> sorted(TREE_KINDS)
['many_small', 'single16', 'single64', 'transformer']
>>> sum(PASSES[p] for p in ("clip+adamw", "adamw"))
15
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptx

HERE = Path(__file__).resolve().parent

LR, B1, B2, EPS, WD, MAX_NORM = 1e-3, 0.9, 0.999, 1e-8, 1e-4, 1.0
RECIPES = ("robust_adamw", "stable_adamw", "spam", "guard", "zclip")
CORE_PIPELINES = ("clip+adamw", "adamw", "clip", "sgd-floor")
IMPLS = (
    "optax",
    "adaptx",
    "adaptx-packed",
    "adaptx-base",
    "adaptx-adamw",
    "jax",
    "torch",
    "c",
)
#: Leaves of at most this many elements share flat moment buffers in ``adaptx-packed``.
PACK = 1 << 16

# Float32 passes over the whole tree that the math requires (one pass = 4 bytes/param):
#   clip+adamw: read g for the norm, then read g, p, m, v and write p, m, v  -> 8
#   adamw: read g, p, m, v, write p, m, v                                    -> 7
#   clip: read g for the norm, then read g, p and write p                    -> 4
#   sgd-floor: read g, p, write p                                            -> 3
# Defense recipes are counted as clip+adamw (their checks fuse with the norm's read).
PASSES = {"clip+adamw": 8, "adamw": 7, "clip": 4, "sgd-floor": 3}
CEILING_PASSES = 2  # x = a * x + b: one read, one write
MEMORY_SLACK = 4096  # bytes: adaptx keeps scalar telemetry (norms, scales) in its state

TREE_KINDS = {
    "single16": "one 16M float32 leaf",
    "single64": "one 64M float32 leaf",
    "transformer": "transformer-like: ~200 leaves, ~16M params (matrices, biases, LayerNorms)",
    "many_small": "2000 leaves of 500 params",
}


# --------------------------------------------------------------------------------------
# Trees


def transformer_shapes(d: int, layers: int, vocab: int, max_len: int, classes: int = 2):
    """Shapes of a pre-norm transformer encoder classifier, as a nested dict."""
    layer = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "attn": {n: {"kernel": (d, d), "bias": (d,)} for n in ("query", "key", "value", "out")},
        "ln2": {"scale": (d,), "bias": (d,)},
        "mlp1": {"kernel": (d, 4 * d), "bias": (4 * d,)},
        "mlp2": {"kernel": (4 * d, d), "bias": (d,)},
    }
    return {
        "embed": (vocab, d),
        "pos": (max_len, d),
        "layers": {f"{i:02d}": layer for i in range(layers)},
        "norm": {"scale": (d,), "bias": (d,)},
        "head": {"kernel": (d, classes), "bias": (classes,)},
    }


def tree_shapes(kind: str, quick: bool):
    if kind == "single16":
        return {"w": (1 << 16,) if quick else (1 << 24,)}
    if kind == "single64":
        return {"w": (1 << 18,) if quick else (1 << 26,)}
    if kind == "transformer":
        if quick:
            return transformer_shapes(d=32, layers=1, vocab=256, max_len=32)
        return transformer_shapes(d=320, layers=12, vocab=4096, max_len=256)
    if kind == "many_small":
        n = 10 if quick else 2000
        return {f"l{i:04d}": (500,) for i in range(n)}
    raise ValueError(f"unknown tree {kind!r}; choose from {sorted(TREE_KINDS)}")


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def tree_name(kind: str, shapes) -> str:
    leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
    n = sum(math.prod(s) for s in leaves)
    size = f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n / 2**10:.3g}K"
    if kind.startswith("single"):
        return f"1x{size}"
    if kind == "many_small":
        return f"{len(leaves)}x{leaves[0][0]}"
    return f"transformer-{len(leaves)}leaves-{size}"


def make_numpy_tree(shapes, seed: int, scale: float):
    rng = np.random.default_rng(seed)

    def leaf(shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    return jax.tree.map(leaf, shapes, is_leaf=_is_shape)


# --------------------------------------------------------------------------------------
# Optimizer definitions (JAX)


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


_MODULES: dict = {}


def _hlo_report():
    if "hlo" not in _MODULES:
        spec = importlib.util.spec_from_file_location(
            "adaptx_bench_hlo_report", HERE / "hlo_report.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES["hlo"] = mod
    return _MODULES["hlo"]


def _optax_step(tx):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return tx.init, step


def _optax_clip_adamw():
    return optax.chain(
        optax.clip_by_global_norm(MAX_NORM), optax.adamw(LR, B1, B2, EPS, weight_decay=WD)
    )


def _call_recipe(name: str, **kwargs):
    fn = getattr(adaptx, name)
    if kwargs:
        return fn(LR, weight_decay=WD, **kwargs)
    if name == "guard":
        return fn(adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=MAX_NORM))
    if name == "zclip":
        return optax.chain(fn(), adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=None))
    try:
        return fn(LR, weight_decay=WD)
    except TypeError:
        return fn(LR)


def _robust_unguarded():
    """``robust_adamw``'s inner chain (defaults) without the ``guard`` wrapper.

    Built as the recipe builds it (``hinted_chain``: zclip tells Adam its output is
    ``s * g``, so the update-RMS reduction reads ``g``), where the adaptx version has it.
    """
    try:
        from adaptx._core.hints import hinted_chain as chain
    except ImportError:  # an adaptx from before the hints
        chain = optax.chain
    return chain(
        adaptx.zclip(),
        adaptx.scale_by_adam(B1, B2, EPS, update_rms_clip=1.0),
        optax.add_decayed_weights(WD),
        optax.scale_by_learning_rate(LR),
    )


NEAREST_OPTAX = {
    # recipe -> (description, factory)
    "robust_adamw": (
        "apply_if_finite(chain(clip_by_global_norm(1), adamw), 10)",
        lambda: optax.apply_if_finite(_optax_clip_adamw(), 10),
    ),
    "guard": (
        "apply_if_finite(chain(clip_by_global_norm(1), adamw), 10)",
        lambda: optax.apply_if_finite(_optax_clip_adamw(), 10),
    ),
    "stable_adamw": ("chain(clip_by_global_norm(1), adamw)", _optax_clip_adamw),
    "spam": ("chain(clip_by_global_norm(1), adamw)", _optax_clip_adamw),
    "zclip": ("chain(clip_by_global_norm(1), adamw)", _optax_clip_adamw),
}


def jax_variants(pipeline: str, n_leaves: int, impls) -> dict[str, tuple[str, Callable]]:
    """impl -> (description, factory returning (init_fn, step_fn))."""
    out: dict[str, tuple[str, Callable]] = {}
    if pipeline == "clip+adamw":
        out["optax"] = (
            "chain(clip_by_global_norm(1), adamw)",
            lambda: _optax_step(_optax_clip_adamw()),
        )
        out["adaptx"] = (
            "adamw(max_norm=1)",
            lambda: _optax_step(adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=MAX_NORM)),
        )
        out["jax"] = ("hand-written", lambda: hand_written(pipeline))
        if n_leaves > 1:
            out["adaptx-packed"] = (
                f"adamw(max_norm=1, pack_small_leaves={PACK})",
                lambda: _optax_step(
                    adaptx.adamw(
                        LR, B1, B2, EPS, weight_decay=WD, max_norm=MAX_NORM, pack_small_leaves=PACK
                    )
                ),
            )
    elif pipeline == "adamw":
        out["optax"] = ("adamw", lambda: _optax_step(optax.adamw(LR, B1, B2, EPS, weight_decay=WD)))
        out["adaptx"] = (
            "adamw(max_norm=None)",
            lambda: _optax_step(adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=None)),
        )
        out["jax"] = ("hand-written", lambda: hand_written(pipeline))
    elif pipeline == "clip":
        out["optax"] = (
            "clip_by_global_norm(1)",
            lambda: _optax_step(optax.clip_by_global_norm(MAX_NORM)),
        )
        out["adaptx"] = (
            "clip_by_global_norm(1)",
            lambda: _optax_step(adaptx.clip_by_global_norm(MAX_NORM)),
        )
        out["jax"] = ("hand-written", lambda: hand_written(pipeline))
    elif pipeline == "sgd-floor":
        out["optax"] = ("sgd(lr)", lambda: _optax_step(optax.sgd(LR)))
        out["jax"] = ("hand-written p - lr*g", lambda: hand_written(pipeline))
    elif pipeline in RECIPES:
        desc, factory = NEAREST_OPTAX[pipeline]
        out["optax"] = (desc, lambda: _optax_step(factory()))
        out["adaptx"] = (pipeline, lambda: _optax_step(_call_recipe(pipeline)))
        if n_leaves > 1 and pipeline in ("robust_adamw", "stable_adamw", "spam"):
            out["adaptx-packed"] = (
                f"{pipeline}(pack_small_leaves={PACK})",
                lambda: _optax_step(_call_recipe(pipeline, pack_small_leaves=PACK)),
            )
        plain = (
            "adamw(max_norm=1): clip + AdamW, no defenses",
            lambda: _optax_step(adaptx.adamw(LR, B1, B2, EPS, weight_decay=WD, max_norm=MAX_NORM)),
        )
        if pipeline == "robust_adamw":
            out["adaptx-base"] = (
                "robust_adamw's chain without guard: chain(zclip(), "
                "scale_by_adam(update_rms_clip=1), decay, lr)",
                lambda: _optax_step(_robust_unguarded()),
            )
            out["adaptx-adamw"] = plain
        elif pipeline == "guard":
            out["adaptx-base"] = ("the guarded chain alone: " + plain[0], plain[1])
        else:
            out["adaptx-adamw"] = plain
    return {k: v for k, v in out.items() if k in impls}


# --------------------------------------------------------------------------------------
# Measurement helpers


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


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class RssPeak:
    """Samples the process RSS every ~0.2 ms while active; ``delta`` = peak - start."""

    def __init__(self):
        self.start = self.peak = None
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            r = rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            r = rss_bytes()
            if r is not None:
                self.peak = max(self.peak, r)

    @property
    def delta(self) -> int | None:
        return None if self.start is None else self.peak - self.start


def device_memory() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    return stats or None


def shared_buffers(tree) -> int:
    """How many leaves of ``tree`` share their device buffer with an earlier leaf.

    >>> z = jnp.zeros([])
    >>> shared_buffers({"a": z, "b": z, "c": jnp.ones([])})
    1
    """
    seen: set = set()
    n = 0
    for x in jax.tree.leaves(tree):
        try:
            key = x.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - not a single-device array
            continue
        n += key in seen
        seen.add(key)
    return n


def count_fusions(hlo: str) -> dict[str, int]:
    """Kernel-level counts in the ENTRY computation of optimized HLO text.

    >>> count_fusions("HloModule m\\n\\nENTRY %main (a: f32[2]) -> f32[2] {\\n"
    ...               "  %a = f32[2]{0} parameter(0)\\n"
    ...               "  ROOT %f = f32[2]{0} fusion(%a), kind=kLoop\\n}\\n")
    {'fusions': 1, 'entry_ops': 1}
    """
    start = hlo.find("\nENTRY")
    entry = hlo[start:] if start >= 0 else hlo
    end = entry.find("\n}")
    entry = entry[:end] if end >= 0 else entry
    instrs = [ln.split(" = ", 1)[1] for ln in entry.splitlines()[1:] if " = " in ln]
    skip = (" parameter(", " constant(", " tuple(", " get-tuple-element(", " bitcast(")
    ops = [i for i in instrs if not any(k in " " + i.split("{", 1)[-1] for k in skip)]
    return {"fusions": sum(" fusion(" in i for i in instrs), "entry_ops": len(ops)}


_DONATION_MSG = "Some donated buffers were not usable"


@contextlib.contextmanager
def quiet():
    """Silences the expected donation notice (scalar state leaves cannot alias on CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DONATION_MSG)
        yield


def summarize(times: list[float]) -> dict:
    ms = [t * 1e3 for t in times]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "reps": len(ms),
    }


# --------------------------------------------------------------------------------------
# Variants: one implementation of one pipeline on one tree, ready to step.


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
            self.s = jax.tree.map(lambda x: jnp.array(x, copy=True), self.s)
        self.step_fn = step
        self.fn = jax.jit(step, donate_argnums=(0, 1))
        self.spec = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (self.p, self.s, self.g)
        )

    def compile(self, reps: int = 1, reps_below_s: float = 20.0):
        with quiet(), compile_events().collect() as ev:
            t0 = time.perf_counter()
            self.p, self.s = self.fn(self.p, self.s, self.g)
            jax.block_until_ready((self.p, self.s))
            first = time.perf_counter() - t0
        info = {k: ev.get(k, 0.0) for k in CompileEvents.NAMES.values()}
        runs = [sum(info.values())]
        # More compiles of the same step (a fresh wrapper each time, so neither the trace
        # nor the executable comes from a cache), when the first one was short enough.
        if runs[0] < reps_below_s:
            for _ in range(reps - 1):
                fresh = jax.jit(lambda *a, f=self.step_fn: f(*a), donate_argnums=(0, 1))
                with quiet():
                    t0 = time.perf_counter()
                    fresh.trace(*self.spec).lower().compile()
                    runs.append(time.perf_counter() - t0)
        info["compile_s_runs"] = runs
        info["compile_s"] = statistics.median(runs)
        info["first_call_s"] = first
        with quiet():
            compiled = self.fn.lower(*self.spec).compile()  # served from the jit caches
        hlo = compiled.as_text()
        info.update(count_fusions(hlo))
        rows = _hlo_report().kernel_rows(hlo)
        unit = 4 * sum(x.size for x in jax.tree.leaves(self.p))
        info["hlo_passes"] = sum(r["in_bytes"] + r["out_bytes"] for r in rows) / unit
        info["hlo_kernels"] = len(rows)
        try:
            ma = compiled.memory_analysis()
            info["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
            info["xla_peak_bytes"] = int(
                ma.argument_size_in_bytes
                + ma.output_size_in_bytes
                - ma.alias_size_in_bytes
                + ma.temp_size_in_bytes
            )
        except Exception:  # noqa: BLE001 - not every backend implements it
            pass
        try:
            ca = compiled.cost_analysis()
            ca = ca[0] if isinstance(ca, list | tuple) else ca
            info["xla_bytes_accessed"] = float(ca["bytes accessed"])
        except Exception:  # noqa: BLE001
            pass
        self.info.update(info)

    def step(self):
        self.p, self.s = self.fn(self.p, self.s, self.g)
        jax.block_until_ready((self.p, self.s))

    def memory_probe(self):
        with quiet(), RssPeak() as r:
            self.step()
        self.info["rss_peak_delta_bytes"] = r.delta
        dm = device_memory()
        if dm and "peak_bytes_in_use" in dm:
            self.info["device_peak_bytes_in_use"] = int(dm["peak_bytes_in_use"])

    def close(self):
        self.p = self.s = None


class TorchVariant(Variant):
    impl = "torch"

    def __init__(self, torch, pipeline, np_params, np_grads):
        super().__init__()
        self.torch, self.pipeline = torch, pipeline
        leaves_p = jax.tree.leaves(np_params)
        leaves_g = jax.tree.leaves(np_grads)
        # Same device as JAX: CUDA when JAX runs on a GPU and torch sees one, else CPU.
        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.params = [
            torch.nn.Parameter(torch.from_numpy(np.array(p)).to(self.device)) for p in leaves_p
        ]
        for p, g in zip(self.params, leaves_g, strict=True):
            p.grad = torch.from_numpy(np.array(g)).to(self.device)
        self.grads = [p.grad for p in self.params]
        self.opt = None
        if pipeline in ("clip+adamw", "adamw"):
            self.opt, mode = self._adamw()
            clip = "clip_grad_norm_(foreach=True) + " if pipeline == "clip+adamw" else ""
            self.desc = f"{clip}AdamW({mode}) on {self.device.type}"
        elif pipeline == "clip":
            self.desc = "clip_grad_norm_(foreach=True) + _foreach_add_"
        else:
            self.desc = "_foreach_add_(alpha=-lr)"

    def _adamw(self):
        torch = self.torch
        for kw in ({"fused": True}, {"foreach": True}):
            opt = torch.optim.AdamW(
                self.params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **kw
            )
            try:
                opt.step()  # probe support; also the first step (warm-up)
                return opt, ", ".join(f"{k}=True" for k in kw)
            except (RuntimeError, TypeError):
                continue
        return torch.optim.AdamW(
            self.params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD
        ), "default"

    def compile(self):
        t0 = time.perf_counter()
        self.step()
        self.info.update({"first_call_s": time.perf_counter() - t0})

    def step(self):
        torch = self.torch
        with torch.no_grad():
            if self.pipeline in ("clip+adamw", "clip"):
                torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
            if self.opt is not None:
                self.opt.step()
            elif self.pipeline == "clip":
                torch._foreach_add_([p.data for p in self.params], self.grads)
            else:
                torch._foreach_add_([p.data for p in self.params], self.grads, alpha=-LR)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory_probe(self):
        with RssPeak() as r:
            self.step()
        self.info["rss_peak_delta_bytes"] = r.delta

    def close(self):
        self.params = self.grads = self.opt = None


class CVariant(Variant):
    impl = "c"

    def __init__(self, cmod, lib, pipeline, np_params, np_grads):
        super().__init__()
        self.pipeline = pipeline
        leaves_p = [np.array(x) for x in jax.tree.leaves(np_params)]
        leaves_g = [np.array(x) for x in jax.tree.leaves(np_grads)]
        arrays = {"p": leaves_p, "g": leaves_g}
        if pipeline in ("clip+adamw", "adamw"):
            arrays["m"] = [np.zeros_like(x) for x in leaves_p]
            arrays["v"] = [np.zeros_like(x) for x in leaves_p]
        self.tree = cmod.Tree(lib, arrays)
        self.t = 0
        omp = f"OpenMP x{lib.threads}" if lib.openmp else "1 thread"
        self.desc = f"gcc {' '.join(lib.flags[:3])}, {omp}"

    def compile(self):
        t0 = time.perf_counter()
        self.step()
        self.info.update({"first_call_s": time.perf_counter() - t0})

    def step(self):
        if self.pipeline in ("clip+adamw", "adamw"):
            self.t += 1
            self.tree.adamw(LR, B1, B2, EPS, WD, MAX_NORM, self.t, self.pipeline == "clip+adamw")
        elif self.pipeline == "clip":
            self.tree.axpy(1.0, MAX_NORM, True)
        else:
            self.tree.axpy(-LR, MAX_NORM, False)

    def memory_probe(self):
        with RssPeak() as r:
            self.step()
        self.info["rss_peak_delta_bytes"] = r.delta

    def close(self):
        self.tree = None


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


def run_rounds(variants: list[Variant], reps: int, warmup: int) -> list[dict[str, float]]:
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


# --------------------------------------------------------------------------------------
# The run


def versions() -> dict[str, str | None]:
    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "adaptx": adaptx.__version__,
        "numpy": np.__version__,
    }
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        out["jaxlib"] = None
    out["torch"] = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
    return out


def git_info() -> dict | None:
    """The commit the library was measured at, and whether adaptx/ had local changes."""
    import subprocess

    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "adaptx"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "adaptx_local_changes": bool(dirty)}


def device_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "jax_device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def estimate_compile(factory, shapes, n_probe: int) -> float:
    """Compile time of the same step on the first ``n_probe`` leaves, scaled to the tree.

    XLA:CPU compile time of these per-leaf programs grows about as n**1.5 (measured:
    200 -> 500 -> 2000 leaves), so the estimate is ``t_probe * (n / n_probe) ** 1.5``.
    """
    leaves, td = jax.tree.flatten(shapes, is_leaf=_is_shape)
    probe = {f"l{i}": leaves[i] for i in range(n_probe)}
    np_p = make_numpy_tree(probe, 0, 0.02)
    v = JaxVariant("probe", "", factory, np_p, jax.tree.map(jnp.asarray, np_p))
    v.compile()
    t = v.info["compile_s"]
    return t * (len(leaves) / n_probe) ** 1.5


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
    out = {"elements": n, "bytes": nbytes, "jax": summarize(tj)}
    out["jax"]["gbps"] = nbytes / (out["jax"]["median_ms"] * 1e-3) / 1e9
    if tc:
        out["c"] = summarize(tc)
        out["c"]["gbps"] = nbytes / (out["c"]["median_ms"] * 1e-3) / 1e9
    del x, xs
    return out


def bench_cell(kind, shapes, np_params, np_grads, g_dev, pipeline, args, ctx) -> list[dict]:
    leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
    n_params = sum(math.prod(s) for s in leaves)
    impls = ctx["impls"]
    cells: list[dict] = []
    variants: list[Variant] = []

    def record(impl, desc, status, reason=None, info=None):
        cells.append(
            {
                "tree": ctx["tree"],
                "tree_kind": kind,
                "pipeline": pipeline,
                "impl": impl,
                "desc": desc,
                "status": status,
                "reason": reason,
                **(info or {}),
            }
        )

    for impl, (desc, factory) in jax_variants(pipeline, len(leaves), impls).items():
        if args.max_compile_seconds is not None and len(leaves) > 2 * args.probe_leaves:
            est = estimate_compile(factory, shapes, args.probe_leaves)
            if est > args.max_compile_seconds:
                record(
                    impl,
                    desc,
                    "skipped",
                    f"estimated compile {est:.0f} s > --max-compile-seconds "
                    f"{args.max_compile_seconds:g}",
                    {"compile_estimate_s": est},
                )
                continue
        try:
            v = JaxVariant(impl, desc, factory, np_params, g_dev)
            v.compile(args.compile_reps)
            v.memory_probe()
            variants.append(v)
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. a recipe's signature)
            record(impl, desc, "error", f"{type(e).__name__}: {e}"[:300])
    if pipeline in CORE_PIPELINES:
        if "torch" in impls and ctx["torch"] is not None:
            v = TorchVariant(ctx["torch"], pipeline, np_params, np_grads)
            v.compile()
            v.memory_probe()
            variants.append(v)
        if "c" in impls and ctx["clib"] is not None and jax.devices()[0].platform == "cpu":
            v = CVariant(ctx["cmod"], ctx["clib"], pipeline, np_params, np_grads)
            v.compile()
            v.memory_probe()
            variants.append(v)
    gc.collect()
    if variants:
        ceil = CeilingVariant(n_params)
        rounds = run_rounds(variants + [ceil], args.reps, args.warmup)
        nbytes = PASSES.get(pipeline, PASSES["clip+adamw"]) * 4 * n_params
        ceil_bytes = CEILING_PASSES * 4 * n_params
        cs = summarize(ceil.times)
        cs["gbps"] = ceil_bytes / (cs["median_ms"] * 1e-3) / 1e9
        ceil.close()
        for v in variants:
            s = summarize(v.times)
            gbps = nbytes / (s["median_ms"] * 1e-3) / 1e9
            # Per round: achieved GB/s over the ceiling's GB/s in the same round.
            ratios = [(nbytes / r[v.impl]) / (ceil_bytes / r["ceiling"]) for r in rounds]
            info = {
                **s,
                **v.info,
                "model_bytes": nbytes,
                "gbps": gbps,
                "ceiling_ratio": statistics.median(ratios),
                "ceiling_ratio_range": [min(ratios), max(ratios)],
                "ceiling_in_cell": cs,
            }
            for ref in ("optax", "c", "adaptx-base", "adaptx-adamw"):
                if ref != v.impl and all(ref in r for r in rounds):
                    ratios = [r[v.impl] / r[ref] for r in rounds]
                    info[f"vs_{ref}"] = {
                        "median": statistics.median(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                        "of_medians": s["median_ms"]
                        / statistics.median([r[ref] * 1e3 for r in rounds]),
                    }
            record(v.impl, v.desc, "ok", None, info)
            v.close()
    order = {k: i for i, k in enumerate(IMPLS)}
    cells.sort(key=lambda c: order.get(c["impl"], 99))
    gc.collect()
    return cells


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--trees",
        default=",".join(TREE_KINDS),
        help=f"comma-separated subset of {','.join(TREE_KINDS)}",
    )
    p.add_argument(
        "--pipelines",
        default="all",
        help="comma-separated subset of "
        + ",".join(CORE_PIPELINES + RECIPES)
        + " ('all': the core ones plus every recipe adaptx has)",
    )
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 20; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; quick 1)")
    p.add_argument(
        "--out",
        default=str(HERE / "results" / "update_step"),
        help="output path prefix: writes PREFIX.json and PREFIX.md",
    )
    p.add_argument("--quick", action="store_true", help="tiny trees, few reps: seconds")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--no-c", action="store_true", help="leave the C floor out")
    p.add_argument(
        "--compile-reps",
        type=int,
        default=3,
        help="compile each JAX step this many times (the median is reported) when the "
        "first compile took under 20 s",
    )
    p.add_argument(
        "--max-compile-seconds",
        type=float,
        default=None,
        help="skip a JAX cell whose compile time, estimated from a probe on "
        "--probe-leaves leaves, exceeds this (many-leaf trees only)",
    )
    p.add_argument("--probe-leaves", type=int, default=200)
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: merge these result files (e.g. runs of different "
        "trees), re-check the targets and write --out",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "default"),
        default="passive",
        help="OMP_WAIT_POLICY for PyTorch and the C floor",
    )
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def merge(paths: list[str]) -> dict:
    """Results of several runs as one; a later file's cell replaces an earlier one's.

    Lets a re-run of some cells (``--trees``/``--pipelines`` subsets) update a full run.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {"meta": dict(runs[0]["meta"]), "trees": {}, "ceilings": {}, "cells": []}
    out["meta"]["merged_from"] = [
        {
            "path": Path(p).name,
            "date": r["meta"]["date"],
            "argv": r["meta"]["argv"],
            "git": r["meta"].get("git"),
            "loadavg_start": r["meta"].get("loadavg_start"),
            "loadavg_end": r["meta"].get("loadavg_end"),
        }
        for p, r in zip(paths, runs, strict=True)
    ]
    out["meta"]["loadavg_end"] = runs[-1]["meta"].get("loadavg_end")
    cells: dict[tuple, dict] = {}
    for r in runs:
        for name, t in r["trees"].items():
            out["trees"].setdefault(name, t)
        for name, c in r["ceilings"].items():
            out["ceilings"].setdefault(name, c)
        for c in r["cells"]:
            cells[(c["tree"], c["pipeline"], c["impl"])] = c
    order = {k: i for i, k in enumerate(IMPLS)}
    trees = list(out["trees"])
    pipelines = list(CORE_PIPELINES + RECIPES)
    out["cells"] = sorted(
        cells.values(),
        key=lambda c: (
            trees.index(c["tree"]),
            pipelines.index(c["pipeline"]) if c["pipeline"] in pipelines else 99,
            order.get(c["impl"], 99),
        ),
    )
    return out


def write(results: dict, out: Path) -> str:
    results["targets"] = evaluate_targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=_json_default))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    return md


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        results = merge(args.from_json)
        md = write(results, Path(args.out))
        print(md)
        print(
            f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}"
        )
        return results
    # Three thread pools (XLA's, PyTorch's OpenMP, the C floor's OpenMP) take turns on
    # the same cores; OpenMP workers that spin after a parallel region steal the cores
    # from whichever runs next. Passive waiting keeps the interleaved rounds fair. It
    # only takes effect for OpenMP runtimes not yet started (set before importing torch).
    if args.omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy.upper())
    kinds = [k.strip() for k in args.trees.split(",") if k.strip()]
    for k in kinds:
        if k not in TREE_KINDS:
            raise SystemExit(f"unknown tree {k!r}; choose from {','.join(TREE_KINDS)}")
    available_recipes = [r for r in RECIPES if hasattr(adaptx, r)]
    if args.pipelines == "all":
        pipelines = list(CORE_PIPELINES) + available_recipes
    else:
        pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
        for p in pipelines:
            if p not in CORE_PIPELINES + RECIPES:
                raise SystemExit(f"unknown pipeline {p!r}")
        pipelines = [p for p in pipelines if p in CORE_PIPELINES or p in available_recipes]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]

    torch = None
    if "torch" in impls and not args.no_torch and importlib.util.find_spec("torch"):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        platform_ = jax.devices()[0].platform
        if platform_ != "cpu" and not (platform_ == "gpu" and torch.cuda.is_available()):
            # PyTorch on the host CPU against JAX on an accelerator compares nothing.
            print(f"PyTorch cannot use the {platform_} JAX runs on: PyTorch column skipped")
            torch = None
    clib = cmod = None
    if "c" in impls and not args.no_c:
        spec = importlib.util.spec_from_file_location("adaptx_bench_c_floor", HERE / "c_floor.py")
        cmod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cmod)
        clib = cmod.load()

    meta = {
        "script": "bench/update_step.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        "device": device_info(),
        "versions": versions(),
        "git": git_info(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "c_floor": (
            None
            if clib is None
            else {"flags": clib.flags, "openmp": clib.openmp, "threads": clib.threads}
        ),
        "recipes_available": available_recipes,
        "loadavg_start": _loadavg(),
        "hyperparameters": {
            "lr": LR,
            "b1": B1,
            "b2": B2,
            "eps": EPS,
            "weight_decay": WD,
            "max_norm": MAX_NORM,
        },
        "memory_method": (
            "xla_peak_bytes: XLA's static memory analysis of the compiled step (arguments + "
            "outputs - donated aliases + temporaries); rss_peak_delta_bytes: process RSS "
            "sampled every ~0.2 ms during one isolated step, minus RSS before it (CPU); "
            "device_peak_bytes_in_use: the accelerator allocator's running peak when the "
            "backend reports one"
        ),
        "bytes_method": "float32 passes over the tree required by the math (see PASSES) "
        "x 4 bytes x params",
        "ceiling_method": "donated in-place x = a*x + b over as many float32 as the tree "
        "holds: 2 passes",
    }
    print(f"device: {meta['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"torch threads: {meta['torch_threads']}; C floor: {meta['c_floor']}")
    print(f"recipes available in adaptx: {available_recipes or 'none'}")
    sys.stdout.flush()

    results = {"meta": meta, "trees": {}, "ceilings": {}, "cells": []}
    for kind in kinds:
        shapes = tree_shapes(kind, args.quick)
        name = tree_name(kind, shapes)
        leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
        n_params = sum(math.prod(s) for s in leaves)
        results["trees"][name] = {
            "kind": kind,
            "leaves": len(leaves),
            "params": n_params,
            "description": TREE_KINDS[kind],
        }
        np_params = make_numpy_tree(shapes, 0, 0.02)
        np_grads = make_numpy_tree(shapes, 1, 0.01)
        g_dev = jax.tree.map(jnp.asarray, np_grads)
        ceil = ceiling(n_params, args.reps, args.warmup, clib)
        results["ceilings"][name] = ceil
        print(
            f"\n== {name}: {len(leaves)} leaves, {n_params:,} params; ceiling "
            f"{ceil['jax']['gbps']:.1f} GB/s (JAX)"
            + (f", {ceil['c']['gbps']:.1f} GB/s (C)" if "c" in ceil else "")
        )
        ctx = {
            "tree": name,
            "impls": impls,
            "torch": torch,
            "clib": clib,
            "cmod": cmod,
            "ceiling": ceil,
        }
        for pipeline in pipelines:
            cells = bench_cell(kind, shapes, np_params, np_grads, g_dev, pipeline, args, ctx)
            results["cells"].extend(cells)
            for c in cells:
                print("  " + format_line(c))
            sys.stdout.flush()
            # Partial results after every cell, so a long run that is stopped keeps them.
            partial = Path(args.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(results, indent=1, default=_json_default))
        del np_params, np_grads, g_dev
        gc.collect()
    meta["loadavg_end"] = _loadavg()
    out = Path(args.out)
    md = write(results, out)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print("\n" + md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return results


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


# --------------------------------------------------------------------------------------
# Reporting


def format_line(c: dict) -> str:
    head = f"{c['pipeline']:<13} {c['impl']:<12}"
    if c["status"] != "ok":
        return f"{head} {c['status']}: {c['reason']}"
    s = (
        f"{head} {c['median_ms']:9.3f} ms [{c['min_ms']:.3f}-{c['max_ms']:.3f}]"
        f" {c['gbps']:6.1f} GB/s ({100 * c['ceiling_ratio']:.0f}% ceil)"
    )
    if "vs_optax" in c:
        s += f"  x{c['vs_optax']['median']:.2f} optax"
    if "compile_s" in c:
        s += f"  compile {c['compile_s']:.2f}s, {c['fusions']} fusions"
    return s


def _ratio(c: dict, key: str) -> str:
    r = c.get(key)
    return "" if r is None else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def _mb(x):
    if x is None:
        return ""
    return f"{x / 2**20:.0f}" if abs(x) >= 10 * 2**20 else f"{x / 2**20:.2f}"


def markdown(results: dict) -> str:
    m = results["meta"]
    d = m["device"]
    lines = [
        f"Device: {d.get('cpu_model', d['device_kind'])} ({d['platform']}, "
        f"{d['cpu_count']} cores); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f"; {m['date']}; load average "
        f"{m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end.",
        "",
        f"{m['reps']} timed interleaved rounds after {m['warmup']} warm-up rounds"
        + (" (--quick)" if m["quick"] else "")
        + ". **step ms**: median [min-max]. **x optax**, "
        "**x C**: median [min-max] of the per-round paired ratios. **compile s**: trace + "
        "lowering + XLA compile. **HLO passes**: bytes the compiled kernels read and write, in "
        "float32 passes over the tree (the math needs the number after the slash). **GB/s**: "
        "bytes the math needs / median time; **% ceil**: median per-round ratio to a donated "
        "in-place x*a+b over the same number of floats, run in the same rounds. **peak MB**: "
        "XLA static peak (arguments + outputs - donated + temporaries) / sampled RSS delta.",
    ]
    cells_by_tree: dict[str, list] = {}
    for c in results["cells"]:
        cells_by_tree.setdefault(c["tree"], []).append(c)
    for tree, cells in cells_by_tree.items():
        t = results["trees"][tree]
        ceil = results["ceilings"].get(tree, {})
        cj = ceil.get("jax", {}).get("gbps")
        cc = ceil.get("c", {}).get("gbps")
        lines += [
            "",
            f"### {tree}: {t['leaves']} leaves, {t['params']:,} params",
            "",
            f"Ceiling measured before the cells: {cj:.1f} GB/s (JAX)"
            + (f", {cc:.1f} GB/s (C)" if cc else "")
            + ".",
            "",
            "| pipeline | impl | step ms | x optax | x C | compile s | first call s "
            "| fusions | HLO passes | GB/s | % ceil | peak MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in cells:
            if c["status"] != "ok":
                lines.append(
                    f"| {c['pipeline']} | {c['impl']} | {c['status']}: "
                    f"{c['reason']} | | | | | | | | | |"
                )
                continue
            comp = f"{c['compile_s']:.2f}" if "compile_s" in c else ""
            need = PASSES.get(c["pipeline"], PASSES["clip+adamw"])
            hp = f"{c['hlo_passes']:.1f} / {need}" if "hlo_passes" in c else f"- / {need}"
            lines.append(
                f"| {c['pipeline']} | {c['impl']} | {c['median_ms']:.2f} "
                f"[{c['min_ms']:.2f}-{c['max_ms']:.2f}] | {_ratio(c, 'vs_optax')} | "
                f"{_ratio(c, 'vs_c')} | {comp} | {c['first_call_s']:.2f} | "
                f"{c.get('fusions', '')} | {hp} | {c['gbps']:.1f} | "
                f"{100 * c['ceiling_ratio']:.0f} | {_mb(c.get('xla_peak_bytes'))} / "
                f"{_mb(c.get('rss_peak_delta_bytes'))} |"
            )
    if results.get("targets"):
        lines += ["", "### Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            # (memory targets allow MEMORY_SLACK bytes: adaptx's scalar telemetry state)
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def _cell(results, tree, pipeline, impl):
    for c in results["cells"]:
        if (c["tree"], c["pipeline"], c["impl"]) == (tree, pipeline, impl) and c["status"] == "ok":
            return c
    return None


def speed_targets(add, tree, kind, limit, impl, cell, o):
    """The step and compile targets for one implementation's clip + AdamW cell."""
    if o:
        r = cell["vs_optax"]
        add(
            f"{tree}: {impl} step <= {limit}x optax",
            f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}] "
            f"({cell['median_ms']:.2f} vs {o['median_ms']:.2f} ms)",
            r["median"] <= limit,
        )
    if kind == "transformer" and o:
        rc = cell["compile_s"] / o["compile_s"]
        add(
            f"{tree}: {impl} compile <= 0.1x optax",
            f"{rc:.2f}x ({cell['compile_s']:.2f} vs {o['compile_s']:.2f} s)",
            rc <= 0.1,
        )
    if kind == "many_small":
        add(
            f"{tree}: {impl} compile <= 2 s",
            f"{cell['compile_s']:.2f} s",
            cell["compile_s"] <= 2.0,
        )


def evaluate_targets(results: dict) -> list[dict]:
    """The speed targets, checked on the clip+adamw pipeline (and the recipes)."""
    out = []

    def add(target, measured, met):
        out.append({"target": target, "measured": measured, "met": met})

    for tree, t in results["trees"].items():
        kind = t["kind"]
        limit = {"single16": 0.5, "single64": 0.5, "transformer": 0.65, "many_small": 1.0}[kind]
        a = _cell(results, tree, "clip+adamw", "adaptx")
        o = _cell(results, tree, "clip+adamw", "optax")
        c = _cell(results, tree, "clip+adamw", "c")
        if a:
            speed_targets(add, tree, kind, limit, "adaptx", a, o)
        if a and o and a.get("xla_peak_bytes") is not None and o.get("xla_peak_bytes") is not None:
            d = a["xla_peak_bytes"] - o["xla_peak_bytes"]
            add(
                f"{tree}: clip+adamw: adaptx peak memory <= optax's (XLA static)",
                f"{a['xla_peak_bytes']:,} vs {o['xla_peak_bytes']:,} bytes ({d:+,})",
                d <= MEMORY_SLACK,
            )
        ap = _cell(results, tree, "clip+adamw", "adaptx-packed")
        if ap and o and kind in ("transformer", "many_small"):
            speed_targets(add, tree, kind, limit, "adaptx-packed", ap, o)
        if a and kind in ("single16", "single64"):
            if c:
                r = a["vs_c"]["median"]
                add(
                    f"{tree}: adaptx step <= 1.5x C floor",
                    f"{r:.2f}x ({a['median_ms']:.2f} vs {c['median_ms']:.2f} ms)",
                    r <= 1.5,
                )
            else:
                add(f"{tree}: adaptx step <= 1.5x C floor", "C floor not measured", None)
        for recipe in ("robust_adamw",):
            ra = _cell(results, tree, recipe, "adaptx")
            rb = _cell(results, tree, recipe, "adaptx-base")
            if ra and rb:
                r = ra["vs_adaptx-base"]
                add(
                    f"{tree}: {recipe} <= 1.10x the chain without guard/telemetry",
                    f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}] "
                    f"({ra['median_ms']:.2f} vs {rb['median_ms']:.2f} ms)",
                    r["median"] <= 1.10,
                )
        for pipeline in sorted({c["pipeline"] for c in results["cells"]} - {"clip+adamw"}):
            pa = _cell(results, tree, pipeline, "adaptx")
            po = _cell(results, tree, pipeline, "optax")
            if pa and po and pa.get("xla_peak_bytes") is not None:
                d = pa["xla_peak_bytes"] - po["xla_peak_bytes"]
                add(
                    f"{tree}: {pipeline}: adaptx peak memory <= optax's (XLA static)",
                    f"{pa['xla_peak_bytes']:,} vs {po['xla_peak_bytes']:,} bytes ({d:+,})",
                    d <= MEMORY_SLACK,
                )
    return out


if __name__ == "__main__":
    main()
