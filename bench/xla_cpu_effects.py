"""Small experiments behind the findings in ``bench/README.md`` (XLA:CPU behaviour).

Each experiment compares formulations of the same math inside one run (interleaved
rounds, medians with min/max) and prints the kernels' traffic from the optimized HLO:

* ``temporaries``: one elementwise pass over 16M float32 written in place into a donated
  buffer, into a fresh output buffer, and in place but through a temporary that a
  reduction also reads (XLA materialises it, and here also copies the input). On
  XLA:CPU a full-size buffer that is not a donated output is allocated (and its pages
  faulted in) on every call, which costs far more than the pass itself.
* ``rms``: StableAdamW's per-tensor RMS ``mean(g^2 / max(k2 * v, eps^2))`` (``k2`` the
  bias correction, a runtime scalar) against the identical
  ``mean(g^2 / max(v, eps^2 / k2)) / k2``. XLA:CPU does not fuse the multiply by a
  runtime scalar into the reduction, so the first form materialises ``k2 * v``.
* ``guard``: skipping a step with ``where(skip, old_state, new_state)`` around an Adam
  update, against the same select written inside the per-element update (the update
  computed from the selected moments). The first makes XLA copy both moments.
* ``norm``: the sum of squares of one large leaf as ``jnp.sum(x * x)`` (what optax and
  adaptx do), as ``jnp.vdot(x, x)`` and as row sums of a 2-D view; XLA:CPU runs the
  first as one (YNNPACK) reduction kernel.
* ``buffers``: ``p - lr * g`` on many small leaves, alone and with two more donated
  trees of the same shape passed through untouched (the moments of a per-leaf Adam
  state): what each argument buffer costs per call.
* ``neighbour``: two copies of the same in-place clip + AdamW step on one leaf, each
  timed right after optax's clip + AdamW step and right after its twin. Right after
  optax's it is slower, so a benchmark that runs its variants in one fixed (or only
  rotated) order penalises whichever always follows optax; ``update_step.py`` draws a
  fresh order every round.
* ``compile``: compile time on many small leaves of ``p - lr * g`` (the floor), of the
  same plus a global-norm clip with the norm summed leaf by leaf (as optax and adaptx
  do), and with the norm taken over one concatenation of the leaves.

    python bench/xla_cpu_effects.py --experiments temporaries,rms,guard --size 16777216
    python bench/xla_cpu_effects.py --experiments compile --leaves 2000

>>> sorted(EXPERIMENTS)
['buffers', 'compile', 'guard', 'neighbour', 'norm', 'rms', 'temporaries']
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
B1, B2, EPS, LR, WD = 0.9, 0.999, 1e-8, 1e-3, 1e-4


def _kernel_rows(hlo: str):
    spec = importlib.util.spec_from_file_location(
        "adaptx_bench_hlo_report_fx", HERE / "hlo_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.kernel_rows(hlo)


def _traffic(fn, args, n: int) -> dict:
    rows = _kernel_rows(fn.lower(*args).compile().as_text())
    return {
        "kernels": len(rows),
        "passes": sum(r["in_bytes"] + r["out_bytes"] for r in rows) / (4 * n),
        "copies": sum(r["op"] == "copy" and r["out_bytes"] >= 4 * n for r in rows),
    }


def _race(variants: dict, reps: int, warmup: int = 3) -> dict:
    """variants: name -> (callable(state) -> state, state). Interleaved rounds."""
    states = {k: s for k, (_, s) in variants.items()}
    times = {k: [] for k in variants}
    rng = random.Random(0)  # a fresh order every round: see the ``neighbour`` experiment
    for r in range(warmup + reps):
        for k in rng.sample(list(variants), len(variants)):
            f = variants[k][0]
            t0 = time.perf_counter()
            states[k] = f(states[k])
            jax.block_until_ready(states[k])
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
        for k, v in times.items()
    }, states


def temporaries(n: int, reps: int) -> dict:
    inplace = jax.jit(lambda x: x * 0.999 + 0.001, donate_argnums=0)
    fresh = jax.jit(lambda x: x * 0.999 + 0.001)

    def through_temp(x):
        # t feeds both the in-place update and a reduction, so XLA writes it to memory.
        t = x * 0.999 + 0.001
        return x + 1e-3 * t, jnp.sum(t)

    temp_fn = jax.jit(through_temp, donate_argnums=0)

    def temp(x):
        return temp_fn(x)[0]

    y = jnp.ones(n)
    variants = {
        "in place (donated)": (inplace, jnp.ones(n)),
        "fresh output": (lambda _: fresh(y), None),
        "in place via a temporary": (temp, jnp.ones(n)),
    }
    times, _ = _race(variants, reps)
    return {"elements": n, "times": times}


def norms(n: int, reps: int) -> dict:
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n, dtype=np.float32))
    rows = 4096 if n % 4096 == 0 else 1
    fns = {
        "sum(x * x)": jax.jit(lambda x: jnp.sum(x * x)),
        "vdot(x, x)": jax.jit(lambda x: jnp.vdot(x, x)),
        "row sums of a 2-D view": jax.jit(lambda x: jnp.sum(jnp.sum((x * x).reshape(rows, -1), 1))),
    }
    times, states = _race({k: ((lambda _, f=f: f(x)), None) for k, f in fns.items()}, reps)
    ref = float(states["sum(x * x)"])
    return {
        "elements": n,
        "times": times,
        "relative_diff": {k: abs(float(v) - ref) / ref for k, v in states.items()},
    }


def buffers(leaves: int, reps: int, size: int = 500) -> dict:
    params = [jnp.ones((size,)) for _ in range(leaves)]
    grads = [jnp.ones((size,)) for _ in range(leaves)]

    def floor(state, g):
        p, extra = state
        return [a - LR * b for a, b in zip(p, g, strict=True)], extra

    fn = jax.jit(floor, donate_argnums=0)
    variants = {
        f"{leaves} params + {leaves} grads": (
            (lambda s: fn(s, grads)),
            ([jnp.array(x) for x in params], ()),
        ),
        f"... + {2 * leaves} donated pass-through": (
            (lambda s: fn(s, grads)),
            (
                [jnp.array(x) for x in params],
                ([jnp.zeros_like(x) for x in params], [jnp.zeros_like(x) for x in params]),
            ),
        ),
    }
    for _, (f, st) in variants.items():
        jax.block_until_ready(f(jax.tree.map(jnp.array, st)))  # compile outside the clock
    times, _ = _race(variants, reps)
    return {"leaves": leaves, "size": size, "times": times}


def _rms_step(mode: str):
    def step(state, g):
        p, c, m, v = state
        c = c + 1
        t = c.astype(jnp.float32)
        k1, k2 = 1 / (1 - B1**t), 1 / (1 - B2**t)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        if mode == "k2 inside the reduction":
            ms = jnp.mean(g * g / jnp.maximum(v * k2, EPS**2))
        else:
            ms = jnp.mean(g * g / jnp.maximum(v, EPS**2 / k2)) / k2
        s = 1 / jnp.maximum(1.0, jnp.sqrt(ms))
        p = p - LR * (s * (k1 * m) / (jnp.sqrt(k2 * v) + EPS) + WD * p)
        return p, c, m, v

    return jax.jit(step, donate_argnums=0)


def _guard_step(mode: str):
    def adam(p, c, m, v, g):
        c = c + 1
        t = c.astype(jnp.float32)
        k1, k2 = 1 / (1 - B1**t), 1 / (1 - B2**t)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        return -LR * ((k1 * m) / (jnp.sqrt(k2 * v) + EPS) + WD * p), (c, m, v)

    def step(state, g):
        p, c, m, v = state
        skip = ~jnp.isfinite(jnp.sqrt(jnp.sum(g * g)))
        if mode == "no guard":
            u, (c, m, v) = adam(p, c, m, v, g)
        elif mode == "where(skip, old, new) outside":
            u, new = adam(p, c, m, v, g)
            c, m, v = (jnp.where(skip, o, x) for o, x in zip((c, m, v), new, strict=True))
            u = jnp.where(skip, 0.0, u)
        else:  # the select inside the per-element update
            c = jnp.where(skip, c, c + 1)
            t = c.astype(jnp.float32)
            k1, k2 = 1 / (1 - B1**t), 1 / (1 - B2**t)
            m = jnp.where(skip, m, B1 * m + (1 - B1) * g)
            v = jnp.where(skip, v, B2 * v + (1 - B2) * g * g)
            u = jnp.where(skip, 0.0, -LR * ((k1 * m) / (jnp.sqrt(k2 * v) + EPS) + WD * p))
        return p + u, c, m, v

    return jax.jit(step, donate_argnums=0)


def _adam_race(make, modes, n: int, reps: int) -> dict:
    g = jnp.asarray(np.random.default_rng(0).standard_normal(n, dtype=np.float32) * 0.01)

    def state():
        return (jnp.zeros(n), jnp.zeros([], jnp.int32), jnp.zeros(n), jnp.zeros(n))

    fns = {m: make(m) for m in modes}
    traffic = {m: _traffic(f, (state(), g), n) for m, f in fns.items()}
    variants = {m: ((lambda s, f=f: f(s, g)), state()) for m, f in fns.items()}
    times, states = _race(variants, reps)
    ref = states[modes[0]][0]
    diff = {m: float(jnp.max(jnp.abs(states[m][0] - ref))) for m in modes}
    return {"elements": n, "times": times, "hlo": traffic, "max_abs_diff_vs_first": diff}


def neighbour(n: int, reps: int, warmup: int = 3) -> dict:
    """Clip + AdamW on one leaf, timed right after optax's step and right after its twin."""
    import optax  # the bench extra

    g = jnp.asarray(np.random.default_rng(0).standard_normal(n, dtype=np.float32) * 1e-3)

    def adamw(state, g):
        p, c, m, v = state
        c = c + 1
        t = c.astype(jnp.float32)
        g = g * jnp.minimum(1.0, 1.0 / jnp.sqrt(jnp.sum(g * g)))
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        u = (m / (1 - B1**t)) / (jnp.sqrt(v / (1 - B2**t)) + EPS)
        return p - LR * (u + WD * p), c, m, v

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, B1, B2, EPS, weight_decay=WD))

    def optax_step(state, g):
        p, s = state
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    fns = {
        "optax": jax.jit(optax_step, donate_argnums=0),
        "A": jax.jit(adamw, donate_argnums=0),
        "B": jax.jit(adamw, donate_argnums=0),
    }
    p0 = jnp.ones(n)
    states = {
        "optax": (p0, tx.init(p0)),
        "A": (jnp.ones(n), jnp.zeros([], jnp.int32), jnp.zeros(n), jnp.zeros(n)),
        "B": (jnp.ones(n), jnp.zeros([], jnp.int32), jnp.zeros(n), jnp.zeros(n)),
    }
    after = {f"{k} after {w}": [] for k in ("A", "B") for w in ("optax", "its twin")}
    for r in range(warmup + reps):
        order = ["optax", "A", "B"] if r % 2 else ["optax", "B", "A"]
        for i, k in enumerate(order):
            t0 = time.perf_counter()
            states[k] = fns[k](states[k], g)
            jax.block_until_ready(states[k])
            if r >= warmup and k != "optax":
                after[f"{k} after {'optax' if i == 1 else 'its twin'}"].append(
                    time.perf_counter() - t0
                )
    times = {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
        for k, v in after.items()
    }
    return {"elements": n, "times": times}


def compile_times(leaves: int, size: int = 500) -> dict:
    params = [jnp.ones((size,)) for _ in range(leaves)]
    grads = [jnp.ones((size,)) for _ in range(leaves)]

    def floor(p, g):
        return [a - LR * b for a, b in zip(p, g, strict=True)]

    def clip(norm_sq):
        def f(p, g):
            s = jnp.minimum(1.0, 1.0 / jnp.sqrt(norm_sq(g)))
            return [a - LR * s * b for a, b in zip(p, g, strict=True)]

        return f

    per_leaf = clip(lambda g: sum(jnp.sum(x * x) for x in g))
    concat = clip(lambda g: jnp.sum(jnp.square(jnp.concatenate(g))))
    out = {}
    for name, f in (
        ("p - lr*g (floor)", floor),
        ("clip, norm summed per leaf", per_leaf),
        ("clip, norm over one concatenation", concat),
    ):
        fn = jax.jit(f, donate_argnums=0)
        t0 = time.perf_counter()
        lowered = fn.lower(params, grads)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        rows = _kernel_rows(compiled.as_text())
        out[name] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "kernels": len(rows)}
    return {"leaves": leaves, "size": size, "results": out}


EXPERIMENTS = {
    "temporaries": lambda a: temporaries(a.size, a.reps),
    "rms": lambda a: _adam_race(
        _rms_step, ["k2 inside the reduction", "k2 folded out of the reduction"], a.size, a.reps
    ),
    "guard": lambda a: _adam_race(
        _guard_step,
        ["no guard", "where(skip, old, new) outside", "select inside the update"],
        a.size,
        a.reps,
    ),
    "norm": lambda a: norms(a.size, a.reps),
    "buffers": lambda a: buffers(a.leaves, a.reps),
    "compile": lambda a: compile_times(a.leaves),
    "neighbour": lambda a: neighbour(a.size, a.reps),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default="temporaries,rms,guard,norm")
    p.add_argument("--size", type=int, default=1 << 24, help="elements (float32)")
    p.add_argument("--leaves", type=int, default=500, help="leaves for 'compile'")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    for name in a.experiments.split(","):
        r = EXPERIMENTS[name.strip()](a)
        results[name] = r
        print(f"== {name}")
        for k, v in r.get("times", {}).items():
            extra = r.get("hlo", {}).get(k)
            hlo = (
                (
                    f"  {extra['kernels']} kernels, {extra['passes']:.1f} passes, "
                    f"{extra['copies']} full-size copies"
                )
                if extra
                else ""
            )
            print(f"  {k:<34} {v['median_ms']:8.1f} ms [{v['min_ms']:.1f}-{v['max_ms']:.1f}]{hlo}")
        for k, v in r.get("results", {}).items():
            print(
                f"  {k:<34} lower {v['lower_s']:.2f} s, XLA compile {v['compile_s']:.2f} s, "
                f"{v['kernels']} kernels"
            )
        if "relative_diff" in r:
            print(f"  relative difference vs sum(x * x): {r['relative_diff']}")
        if "max_abs_diff_vs_first" in r:
            print(f"  max |param difference| vs the first: {r['max_abs_diff_vs_first']}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
