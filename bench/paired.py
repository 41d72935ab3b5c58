"""Two builds of one recipe, paired in one run on the four trees: what does a change cost?

Three questions are asked this way:

- ``chain``: what does a recipe's program buy over a user's ``optax.chain`` of its
  documented parts (``bench/recipe_parts.py``)? The recipe (A) is an ``adaptx.chain``: a
  global clip folded into Adam's pass, and, under a guard, Adam's moments held inside
  that pass. The user's chain (B) gives the same numbers; the clip's output is a
  separate array and the guard selects the whole chain's state.
- ``per-tensor``: what do the per-tensor figures cost? Each recipe is built without
  (A) and with ``per_tensor=True`` (B).
- ``monitor``: what does ``adaptx.monitor`` cost? Each recipe is built alone (A) and
  inside ``adaptx.monitor`` (B); ``bench/monitor_cost.py`` shows where its passes go.
- ``engine``: did a change of the library cost anything? Each recipe is built by the
  ``adaptx`` of an earlier revision (A, ``--before REV``, default the last commit before
  the Adam engine) and by the working tree's (B). The earlier package is exported from
  git into a temporary folder under a private name (``bench/before.py``), so both run in
  one process, in the same interleaved rounds.

For each tree and recipe it reports:

- step time of the jitted, donated step (``update`` + ``apply_updates``), interleaved
  rounds, as the ratio B / A: median, min and max;
- full-size passes (kernels of the optimized HLO reading or writing a full-size array,
  ``bench/hlo_report.py``), summed bytes in units of one float32 pass over the tree;
- the number of kernels in the compiled step;
- peak temporary memory of the compiled step (``memory_analysis``);
- compile time.

    python -m bench.paired chain                  # the four trees, ~10 min on 2 CPU cores
    python -m bench.paired per-tensor --trees transformer,many_small
    python -m bench.paired chain --quick          # tiny trees, seconds
    python -m bench.paired engine --before 0824b51 --out bench/measured/engine
    python -m bench.paired monitor --recipes adamw,robust_adamw --out bench/measured/monitor_paired
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
from bench import before as before_lib
from bench.hlo_report import kernel_rows
from bench.recipe_parts import PARTS
from bench.update_step import make_numpy_tree, tree_shapes

TREES = ("single16", "single64", "transformer", "many_small")

# recipe -> (the adaptx package to build it from, its keyword arguments) -> transform.
RECIPES = {
    "robust_adamw": lambda ax, **kw: ax.robust_adamw(1e-3, **kw),
    "robust_adamw packed": lambda ax, **kw: ax.robust_adamw(1e-3, pack_small_leaves=65536, **kw),
    "adamw packed": lambda ax, **kw: ax.adamw(1e-3, pack_small_leaves=65536, **kw),
}
# The engine and chain questions also ask about the per-leaf recipes.
ENGINE_RECIPES = {
    "adamw": lambda ax: ax.adamw(1e-3),
    "adam_atan2": lambda ax: ax.adam_atan2(1e-3),
    "spam": lambda ax: ax.spam(1e-3),
    "stable_adamw": lambda ax: ax.stable_adamw(1e-3),
    "sgd": lambda ax: ax.sgd(1e-3),
    **RECIPES,
}


def user_chain(recipe: str):
    """The ``optax.chain`` of ``recipe``'s parts (``bench/recipe_parts.py``)."""
    name, _, packed = recipe.partition(" ")
    return PARTS[name](1e-3, **({"pack_small_leaves": 65536} if packed else {}))


DEFAULT_BEFORE = "0824b51"  # the last commit before scale_by_adam moved onto the engine


def build(question: str, recipe: str, label: str, before=None):
    """The transform for variant ``label`` ("A" or "B")."""
    if question == "per-tensor":
        kw = {"per_tensor": True} if label == "B" else {}
        return RECIPES[recipe](adaptx, **kw)
    if question == "engine":
        return ENGINE_RECIPES[recipe](before if label == "A" else adaptx)
    if question == "monitor":
        tx = ENGINE_RECIPES[recipe](adaptx)
        return adaptx.monitor(tx) if label == "B" else tx
    return ENGINE_RECIPES[recipe](adaptx) if label == "A" else user_chain(recipe)


def compiled_step(tx, params, grads):
    """The jitted, donated step, compiled, with its compile time in seconds."""

    def step(p, s, g):
        u, s = tx.update(g, s, p, value=jnp.float32(1.0))
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    return compiled, state, time.perf_counter() - t


def passes(hlo: str, params) -> float:
    """Bytes of the kernels touching a full-size array, in passes over the whole tree."""
    tree_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    biggest = max(x.nbytes for x in jax.tree.leaves(params))
    rows = [r for r in kernel_rows(hlo) if max(r["in_bytes"], r["out_bytes"]) >= biggest]
    return sum(r["in_bytes"] + r["out_bytes"] for r in rows) / tree_bytes


def compiled_cell(tx, np_params, grads) -> dict:
    """``tx``'s step compiled on fresh parameters, with its carry and static figures."""
    params = jax.tree.map(jnp.asarray, np_params)
    compiled, state, seconds = compiled_step(tx, params, grads)
    mem = compiled.memory_analysis()
    return {
        "compiled": compiled,
        "carry": [params, state],
        "compile_s": seconds,
        "passes": passes(compiled.as_text(), np_params),
        "kernels": len(kernel_rows(compiled.as_text())),
        "temp_mb": None if mem is None else mem.temp_size_in_bytes / 2**20,
    }


def measure(question: str, tree: str, recipe: str, quick: bool, reps: int, before=None) -> dict:
    shapes = tree_shapes(tree, quick)
    np_params = make_numpy_tree(shapes, 0, 1.0)
    grads = jax.tree.map(jnp.asarray, make_numpy_tree(shapes, 1, 1e-3))
    cells = {
        label: compiled_cell(build(question, recipe, label, before), np_params, grads)
        for label in ("A", "B")
    }
    times = {"A": [], "B": []}
    for r in range(reps + 2):  # two warm-up rounds, then interleaved timed rounds
        for label in ("A", "B") if r % 2 == 0 else ("B", "A"):
            c = cells[label]
            t = time.perf_counter()
            c["carry"] = list(c["compiled"](*c["carry"], grads))
            jax.block_until_ready(c["carry"])
            if r >= 2:
                times[label].append(time.perf_counter() - t)
    ratios = [b / a for a, b in zip(times["A"], times["B"], strict=True)]
    out = {"question": question, "tree": tree, "recipe": recipe}
    for label in ("A", "B"):
        c = cells[label]
        out[label] = {
            "step_ms": 1e3 * statistics.median(times[label]),
            "passes": round(c["passes"], 2),
            "kernels": c["kernels"],
            "temp_mb": c["temp_mb"],
            "compile_s": round(c["compile_s"], 2),
        }
    out["ratio_b_over_a"] = {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }
    return out


LABELS = {
    "chain": ("recipe", "chain"),
    "per-tensor": ("off", "on"),
    "engine": ("before", "after"),
    "monitor": ("alone", "monitored"),
}


def markdown(rows: list[dict]) -> str:
    a, b = LABELS[rows[0]["question"]]
    head = (
        f"| tree | recipe | step {a} (ms) | {b} / {a}: median (min-max) | passes {a} / {b} "
        f"| kernels {a} / {b} | temp MB {a} / {b} | compile s {a} / {b} |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        on, off, q = r["A"], r["B"], r["ratio_b_over_a"]
        mem = "n/a" if on["temp_mb"] is None else f"{on['temp_mb']:.1f} / {off['temp_mb']:.1f}"
        lines.append(
            f"| {r['tree']} | {r['recipe']} | {on['step_ms']:.2f} | {q['median']:.3f} "
            f"({q['min']:.3f}-{q['max']:.3f}) | {on['passes']:.1f} / {off['passes']:.1f} "
            f"| {on['kernels']} / {off['kernels']} | {mem} "
            f"| {on['compile_s']:.1f} / {off['compile_s']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question", choices=sorted(LABELS), help="what to compare")
    p.add_argument("--trees", default=",".join(TREES), help="comma-separated trees")
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all)")
    p.add_argument(
        "--before",
        default=DEFAULT_BEFORE,
        help=f"engine: the earlier git revision (default {DEFAULT_BEFORE})",
    )
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny trees, few rounds")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 15)
    every = args.question in ("engine", "chain")
    recipes = args.recipes or ",".join(ENGINE_RECIPES if every else RECIPES)
    before = before_lib.load(args.before) if args.question == "engine" else None
    rows = []
    for tree in args.trees.split(","):
        for recipe in recipes.split(","):
            if tree.startswith("single") and "packed" in recipe:
                continue  # one leaf: nothing to pack
            rows.append(measure(args.question, tree, recipe, args.quick, reps, before))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "numpy": np.__version__}
        if before is not None:
            meta["before"] = args.before
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
