"""What does ``adaptx.monitor`` add to a compiled step? Passes, kernels and temporaries.

``adaptx.adamw(1e-3)`` is compiled alone and inside ``adaptx.monitor`` (without and with
``per_tensor=True``), as the jitted, donated step ``update`` + ``apply_updates`` of
``bench/paired.py``, on a tree of ``bench/update_step.py`` (default ``transformer``, the
full size). From each compiled program (no timing; the step is not run):

- ``passes``: ``bench/paired.py``'s ``passes()``, the bytes of the kernels that read or
  write an array as large as the tree's largest leaf, in passes over the whole tree;
- ``traffic``: the bytes of every kernel, in passes over the whole tree (on a tree of many
  leaves, most kernels touch arrays smaller than the largest);
- ``copies``: the bytes of the ``copy`` kernels among them;
- ``kernels``: kernels in the optimized HLO;
- ``temp MB``: XLA's temporary memory (``memory_analysis``);

and, for the tree's largest leaf, each kernel that reads or writes it, with what it reads
and writes in units of that leaf: where the added passes go.

    python -m bench.monitor_cost                  # the transformer tree, ~1 min
    python -m bench.monitor_cost --quick          # tiny tree, seconds
    python -m bench.monitor_cost --out bench/measured/monitor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import adaptx
from bench.hlo_report import kernel_rows
from bench.paired import compiled_step, passes
from bench.update_step import make_numpy_tree, tree_name, tree_shapes

VARIANTS = {
    "adamw": lambda: adaptx.adamw(1e-3),
    "monitor(adamw)": lambda: adaptx.monitor(adaptx.adamw(1e-3)),
    "monitor(adamw, per_tensor=True)": lambda: adaptx.monitor(adaptx.adamw(1e-3), per_tensor=True),
}


def measure(tree: str, quick: bool) -> list[dict]:
    shapes = tree_shapes(tree, quick)
    np_params = make_numpy_tree(shapes, 0, 1.0)
    grads = jax.tree.map(jnp.asarray, make_numpy_tree(shapes, 1, 1e-3))
    tree_bytes = sum(x.nbytes for x in jax.tree.leaves(np_params))
    rows = []
    for name, make in VARIANTS.items():
        params = jax.tree.map(jnp.asarray, np_params)
        compiled, _, _ = compiled_step(make(), params, grads)
        hlo = compiled.as_text()
        kernels = kernel_rows(hlo)
        mem = compiled.memory_analysis()
        rows.append(
            {
                "tree": tree_name(tree, shapes),
                "variant": name,
                "passes": round(passes(hlo, np_params), 3),
                "traffic": round(
                    sum(r["in_bytes"] + r["out_bytes"] for r in kernels) / tree_bytes, 3
                ),
                "copies": round(
                    sum(r["in_bytes"] + r["out_bytes"] for r in kernels if r["op"] == "copy")
                    / tree_bytes,
                    3,
                ),
                "kernels": len(kernels),
                "temp_mb": None if mem is None else round(mem.temp_size_in_bytes / 2**20, 2),
                "largest_leaf": _on_largest_leaf(kernels, np_params),
            }
        )
    return rows


def _on_largest_leaf(kernels: list[dict], params) -> list[str]:
    """``"name (op): in R, out W"`` for each kernel reading or writing the largest leaf."""
    leaf = max(x.nbytes for x in jax.tree.leaves(params))
    return [
        f"{r['name']} ({r['op']}): in {r['in_bytes'] / leaf:.1f}, out {r['out_bytes'] / leaf:.1f}"
        for r in kernels
        if max(r["in_bytes"], r["out_bytes"]) >= leaf
    ]


def markdown(rows: list[dict]) -> str:
    base = {r["tree"]: r for r in rows if r["variant"] == "adamw"}
    head = (
        "| tree | step | passes (+ over adamw) | traffic (+ over adamw) | copies | kernels "
        "| temp MB |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        b = base[r["tree"]]
        mem = "n/a" if r["temp_mb"] is None else f"{r['temp_mb']:.2f}"
        more = {k: r[k] - b[k] for k in ("passes", "traffic")}
        lines.append(
            f"| {r['tree']} | {r['variant']} | {r['passes']:.2f} ({more['passes']:+.2f}) "
            f"| {r['traffic']:.2f} ({more['traffic']:+.2f}) | {r['copies']:.2f} "
            f"| {r['kernels']} | {mem} |"
        )
    out = head + "\n".join(lines) + "\n"
    for r in rows:
        out += f"\nKernels on the largest leaf of {r['tree']}, {r['variant']} (in leaf units):\n\n"
        out += "".join(f"- {k}\n" for k in r["largest_leaf"])
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default="transformer", help="comma-separated trees")
    p.add_argument("--quick", action="store_true", help="tiny trees")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    rows = []
    for tree in args.trees.split(","):
        rows += measure(tree, args.quick)
    table = markdown(rows)
    print(table)
    if args.out:
        meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "numpy": np.__version__}
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        intro = (
            "`python -m bench.monitor_cost`: `adaptx.adamw(1e-3)`'s compiled, donated step "
            "(`update` + `apply_updates`) alone and inside `adaptx.monitor`; bytes in passes "
            f"over the whole tree (see the script's docstring). {meta['device']}, "
            f"jax {meta['jax']}.\n\n"
        )
        Path(args.out + ".md").write_text(intro + table)
    return rows


if __name__ == "__main__":
    main()
