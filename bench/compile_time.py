"""Compile time of one optimizer step on trees of many leaves, against the trivial step.

Compiles the jitted, donated step (``update`` + ``apply_updates``) of each pipeline on
one tree, ``--rounds`` times in alternation (so that a busy machine slows every variant
alike), and reports the median and the spread of the compile time (trace, lower and XLA
compile), and its ratio to the trivial ``p - lr * g`` step on the same tree.

It also compiles two probes that bound what any packed optimizer can reach on XLA:CPU:
cutting ``n`` leaves out of one flat buffer with ``dynamic_slice`` and applying them
(what a packed state's update must do), and the same with static slices.

    python -m bench.compile_time                          # 2000 x 500 leaves, ~10 min
    python -m bench.compile_time --tree transformer --rounds 3
    python -m bench.compile_time --quick                  # 50 leaves, seconds

To measure another version, copy this file into that checkout's ``bench/`` and run it
there (the ``adaptx`` next to ``bench/`` is the one imported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import adaptx
from bench.update_step import tree_shapes

PIPELINES = {
    "optax clip+adamw": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4)
    ),
    "adaptx.adamw": lambda: adaptx.adamw(1e-3),
    "adaptx.adamw packed": lambda: adaptx.adamw(1e-3, pack_small_leaves=65536),
    "robust_adamw": lambda: adaptx.robust_adamw(1e-3),
    "robust_adamw packed": lambda: adaptx.robust_adamw(1e-3, pack_small_leaves=65536),
    "robust_adamw per_tensor": lambda: adaptx.robust_adamw(1e-3, per_tensor=True),
    "robust_adamw packed per_tensor": lambda: adaptx.robust_adamw(
        1e-3, pack_small_leaves=65536, per_tensor=True
    ),
}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compile_step(tx, params, grads) -> float:
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    return _time(lambda: jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile())


def compile_trivial(params, grads) -> float:
    def step(p, g):
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

    return _time(lambda: jax.jit(step, donate_argnums=(0,)).lower(params, grads).compile())


def compile_slices(params, dynamic: bool) -> float:
    """Cut every leaf out of one flat buffer and apply it: the packed update's floor."""
    leaves, treedef = jax.tree.flatten(params)
    sizes = [x.size for x in leaves]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    flat = jnp.zeros(sum(sizes))
    offsets = [jnp.asarray([s], jnp.int32) for s in starts]

    def step(ps, f, offs):
        out = []
        for p, o, s, n in zip(ps, offs, starts, sizes, strict=True):
            piece = jax.lax.dynamic_slice(f, (o[0],), (n,)) if dynamic else f[s : s + n]
            out.append(p - 1e-3 * piece.reshape(p.shape))
        return out

    return _time(lambda: jax.jit(step).lower(leaves, flat, offsets).compile())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default="many_small", help="many_small or transformer")
    p.add_argument("--rounds", type=int, default=3, help="compiles per variant (median)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated")
    p.add_argument("--static-slices", action="store_true", help="also the static-slice probe")
    p.add_argument("--quick", action="store_true", help="a tiny tree")
    p.add_argument("--out", default=None, help="write PREFIX.json")
    args = p.parse_args(argv)
    shapes = tree_shapes(args.tree, args.quick)
    params = jax.tree.map(lambda s: jnp.zeros(s), shapes, is_leaf=lambda x: isinstance(x, tuple))
    grads = jax.tree.map(lambda x: x + 1e-3, params)
    variants = {"trivial p - lr*g": lambda: compile_trivial(params, grads)}
    variants["probe: dynamic slices of a flat buffer"] = lambda: compile_slices(params, True)
    if args.static_slices:
        variants["probe: static slices of a flat buffer"] = lambda: compile_slices(params, False)
    for name in args.pipelines.split(","):
        variants[name] = lambda name=name: compile_step(PIPELINES[name](), params, grads)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            jax.clear_caches()
            times[name].append(fn())
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["trivial p - lr*g"])
    rows = {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "x_trivial": statistics.median(v) / base,
        }
        for k, v in times.items()
    }
    leaves = len(jax.tree.leaves(params))
    print(f"\n{args.tree}: {leaves} leaves; compile time, median of {args.rounds} (min-max)")
    for k, r in rows.items():
        print(
            f"| {k} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
            f"| {r['x_trivial']:.2f}x |"
        )
    out = {"tree": args.tree, "leaves": leaves, "jax": jax.__version__, "rows": rows}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
