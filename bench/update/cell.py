"""One cell: every implementation of one pipeline on one tree, built, compiled, timed.

The variants are compiled and their memory probed one by one, then all run together in
interleaved rounds with the bandwidth ceiling (:func:`bench.update.timing.run_rounds`).
A variant that fails to build or compile is recorded with its error; a JAX step whose
estimated compile time exceeds ``--max-compile-seconds`` is recorded as skipped.
"""

from __future__ import annotations

import functools
import gc
import statistics

import jax
import jax.numpy as jnp

from bench.update.config import CEILING_PASSES, CORE_PIPELINES, IMPLS, passes
from bench.update.external import CVariant, TorchVariant
from bench.update.pipelines import jax_variants
from bench.update.timing import paired, run_rounds, summarize
from bench.update.trees import make_numpy_tree, param_count, shape_leaves
from bench.update.variants import CeilingVariant, JaxVariant, Variant

#: The implementations every other one is also compared with, when they ran in the cell.
REFERENCES = ("optax", "c", "adaptx-base", "adaptx-adamw")


def estimate_compile(factory, shapes, n_probe: int) -> float:
    """Compile time of the same step on the first ``n_probe`` leaves, scaled to the tree.

    XLA:CPU compile time of these per-leaf programs grows about as n**1.5 (measured:
    200 -> 500 -> 2000 leaves), so the estimate is ``t_probe * (n / n_probe) ** 1.5``.
    """
    leaves = shape_leaves(shapes)
    probe = {f"l{i}": leaves[i] for i in range(n_probe)}
    np_p = make_numpy_tree(probe, 0, 0.02)
    v = JaxVariant("probe", "", factory, np_p, jax.tree.map(jnp.asarray, np_p))
    v.compile()
    t = v.info["compile_s"]
    return t * (len(leaves) / n_probe) ** 1.5


def _record(cells, tree, kind, pipeline, impl, desc, status, reason=None, info=None):
    cells.append(
        {
            "tree": tree,
            "tree_kind": kind,
            "pipeline": pipeline,
            "impl": impl,
            "desc": desc,
            "status": status,
            "reason": reason,
            **(info or {}),
        }
    )


def _jax(shapes, np_params, g_dev, pipeline, args, impls, record) -> list[Variant]:
    leaves = shape_leaves(shapes)
    variants: list[Variant] = []
    for impl, (desc, factory) in jax_variants(pipeline, len(leaves), impls).items():
        if args.max_compile_seconds is not None and len(leaves) > 2 * args.probe_leaves:
            est = estimate_compile(factory, shapes, args.probe_leaves)
            if est > args.max_compile_seconds:
                reason = (
                    f"estimated compile {est:.0f} s > --max-compile-seconds "
                    f"{args.max_compile_seconds:g}"
                )
                record(impl, desc, "skipped", reason, {"compile_estimate_s": est})
                continue
        try:
            v = JaxVariant(impl, desc, factory, np_params, g_dev)
            v.compile(args.compile_reps)
            v.memory_probe()
            variants.append(v)
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. a recipe's signature)
            record(impl, desc, "error", f"{type(e).__name__}: {e}"[:300])
    return variants


def _external(np_params, np_grads, pipeline, ctx) -> list[Variant]:
    """PyTorch and the C floor, for the core pipelines, when they are available."""
    if pipeline not in CORE_PIPELINES:
        return []
    impls, makers = ctx["impls"], []
    if "torch" in impls and ctx["torch"] is not None:
        makers.append(lambda: TorchVariant(ctx["torch"], pipeline, np_params, np_grads))
    if "c" in impls and ctx["clib"] is not None and jax.devices()[0].platform == "cpu":
        makers.append(lambda: CVariant(ctx["cmod"], ctx["clib"], pipeline, np_params, np_grads))
    variants = []
    for make in makers:  # one at a time: each is built, run once and probed alone
        v = make()
        v.compile()
        v.memory_probe()
        variants.append(v)
    return variants


def _measure(variants: list[Variant], pipeline, n_params, args, record) -> None:
    """All variants and the ceiling in interleaved rounds; one "ok" record per variant."""
    ceil = CeilingVariant(n_params)
    rounds = run_rounds(variants + [ceil], args.reps, args.warmup)
    nbytes = passes(pipeline) * 4 * n_params
    ceil_bytes = CEILING_PASSES * 4 * n_params
    cs = summarize(ceil.times)
    cs["gbps"] = ceil_bytes / (cs["median_ms"] * 1e-3) / 1e9
    ceil.close()
    for v in variants:
        s = summarize(v.times)
        # Per round: achieved GB/s over the ceiling's GB/s in the same round.
        ratios = [(nbytes / r[v.impl]) / (ceil_bytes / r["ceiling"]) for r in rounds]
        info = {
            **s,
            **v.info,
            "model_bytes": nbytes,
            "gbps": nbytes / (s["median_ms"] * 1e-3) / 1e9,
            "ceiling_ratio": statistics.median(ratios),
            "ceiling_ratio_range": [min(ratios), max(ratios)],
            "ceiling_in_cell": cs,
        }
        for ref in REFERENCES:
            if ref != v.impl and all(ref in r for r in rounds):
                info[f"vs_{ref}"] = paired(rounds, v.impl, ref, s["median_ms"])
        record(v.impl, v.desc, "ok", None, info)
        v.close()


def bench_cell(kind, shapes, np_params, np_grads, g_dev, pipeline, args, ctx) -> list[dict]:
    """The records of one (tree, pipeline) cell, one per implementation, in IMPLS order."""
    cells: list[dict] = []
    record = functools.partial(_record, cells, ctx["tree"], kind, pipeline)
    variants = _jax(shapes, np_params, g_dev, pipeline, args, ctx["impls"], record)
    variants += _external(np_params, np_grads, pipeline, ctx)
    gc.collect()
    if variants:
        _measure(variants, pipeline, param_count(shapes), args, record)
    order = {k: i for i, k in enumerate(IMPLS)}
    cells.sort(key=lambda c: order.get(c["impl"], 99))
    gc.collect()
    return cells
