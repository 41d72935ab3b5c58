"""How should a guard keep the state of an inner transform it knows nothing of?

A guard that skips a step must return its inner state unchanged. An adaptx transform
(or ``adaptx.chain``) keeps its own state inside its fused pass (``adaptx._core.skip``).
For any other inner transform (here a user's ``optax.chain`` of adamw's parts) the
guard must select the state itself, in one of two ways:

- ``where``: run the inner update, then ``jnp.where(skip, old, new)`` on every leaf
  (what ``adaptx.guard`` does);
- ``cond``: ``lax.cond(skip, keep the old state, run the inner update)``, MaxText's way.

Both are measured on the four bench trees, beside the recipe (the inner is an
``adaptx.chain``, which honours the skip itself): full-size passes, temporary memory,
compile time and step time as paired ratios to ``where``.

    python -m bench.skip_select                       # the four trees, a few minutes
    python -m bench.skip_select --quick               # tiny trees, seconds
    python -m bench.skip_select --out bench/measured/skip_select
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptx
from bench.paired import TREES, compiled_cell
from bench.recipe_parts import PARTS
from bench.update_step import make_numpy_tree, tree_shapes


def cond_guard(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """A guard on non-finite gradients that keeps the inner state with ``lax.cond``."""
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra):
        del extra
        skip = ~jnp.isfinite(optax.tree.norm(updates))

        def keep(_):
            return jax.tree.map(jnp.zeros_like, updates), state

        def step(_):
            return inner.update(updates, state, params)

        return jax.lax.cond(skip, keep, step, None)

    return optax.GradientTransformationExtraArgs(inner.init, update)


VARIANTS = {
    "where": lambda: adaptx.guard(PARTS["adamw"](1e-3)),
    "cond": lambda: cond_guard(PARTS["adamw"](1e-3)),
    "honoured (adaptx.chain)": lambda: adaptx.guard(adaptx.adamw(1e-3)),
}


def measure(tree: str, quick: bool, reps: int) -> list[dict]:
    shapes = tree_shapes(tree, quick)
    np_params = make_numpy_tree(shapes, 0, 1.0)
    grads = jax.tree.map(jnp.asarray, make_numpy_tree(shapes, 1, 1e-3))
    cells = {name: compiled_cell(make(), np_params, grads) for name, make in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in cells}
    names = list(cells)
    for r in range(reps + 2):  # two warm-up rounds, then rounds in rotating order
        for name in names[r % len(names) :] + names[: r % len(names)]:
            c = cells[name]
            t = time.perf_counter()
            c["carry"] = list(c["compiled"](*c["carry"], grads))
            jax.block_until_ready(c["carry"])
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    rows = []
    for name, c in cells.items():
        ratios = [t / w for t, w in zip(times[name], times["where"], strict=True)]
        rows.append(
            {
                "tree": tree,
                "variant": name,
                "step_ms": 1e3 * statistics.median(times[name]),
                "ratio_to_where": {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                },
                "passes": round(c["passes"], 2),
                "kernels": c["kernels"],
                "temp_mb": c["temp_mb"],
                "compile_s": round(c["compile_s"], 2),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| tree | selection | step (ms) | / where: median (min-max) | passes | kernels "
        "| temp MB | compile s |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        q = r["ratio_to_where"]
        mem = "n/a" if r["temp_mb"] is None else f"{r['temp_mb']:.1f}"
        lines.append(
            f"| {r['tree']} | {r['variant']} | {r['step_ms']:.2f} | {q['median']:.3f} "
            f"({q['min']:.3f}-{q['max']:.3f}) | {r['passes']:.1f} | {r['kernels']} | {mem} "
            f"| {r['compile_s']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=",".join(TREES), help="comma-separated trees")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 9; quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny trees, few rounds")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    rows = []
    for tree in args.trees.split(","):
        rows += measure(tree, args.quick, reps)
        print(markdown(rows[-len(VARIANTS) :]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "numpy": np.__version__}
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
