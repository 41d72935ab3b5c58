"""A measuring run: every pipeline on every tree, with partial results after each cell."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.update.cell import bench_cell
from bench.update.metadata import loadavg
from bench.update.report import dump_json, format_line, write
from bench.update.timing import ceiling
from bench.update.trees import (
    TREE_KINDS,
    make_numpy_tree,
    param_count,
    shape_leaves,
    tree_name,
    tree_shapes,
)


def _tree(kind, args, pipelines, ctx, results) -> None:
    """Every pipeline on the tree ``kind``; its cells go into ``results`` as they finish."""
    shapes = tree_shapes(kind, args.quick)
    name = tree_name(kind, shapes)
    n_leaves, n_params = len(shape_leaves(shapes)), param_count(shapes)
    results["trees"][name] = {
        "kind": kind,
        "leaves": n_leaves,
        "params": n_params,
        "description": TREE_KINDS[kind],
    }
    np_params = make_numpy_tree(shapes, 0, 0.02)
    np_grads = make_numpy_tree(shapes, 1, 0.01)
    g_dev = jax.tree.map(jnp.asarray, np_grads)
    ceil = ceiling(n_params, args.reps, args.warmup, ctx["clib"])
    results["ceilings"][name] = ceil
    print(
        f"\n== {name}: {n_leaves} leaves, {n_params:,} params; ceiling "
        f"{ceil['jax']['gbps']:.1f} GB/s (JAX)"
        + (f", {ceil['c']['gbps']:.1f} GB/s (C)" if "c" in ceil else "")
    )
    ctx = {**ctx, "tree": name, "ceiling": ceil}
    for pipeline in pipelines:
        cells = bench_cell(kind, shapes, np_params, np_grads, g_dev, pipeline, args, ctx)
        results["cells"].extend(cells)
        for c in cells:
            print("  " + format_line(c))
        sys.stdout.flush()
        # Partial results after every cell, so a long run that is stopped keeps them.
        dump_json(results, Path(args.out).with_suffix(".partial.json"))
    del np_params, np_grads, g_dev
    gc.collect()


def run(args, kinds, pipelines, meta, ctx) -> dict:
    """Measures ``pipelines`` on the trees ``kinds``; writes ``--out``; the results.

    ``ctx``: ``impls`` (the implementations asked for), ``torch`` (the module or None),
    ``clib`` and ``cmod`` (the C floor's library and module, or None).
    """
    results = {"meta": meta, "trees": {}, "ceilings": {}, "cells": []}
    for kind in kinds:
        _tree(kind, args, pipelines, ctx, results)
    meta["loadavg_end"] = loadavg()
    out = Path(args.out)
    md = write(results, out)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print("\n" + md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return results
