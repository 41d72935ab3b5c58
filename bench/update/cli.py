"""The command line of ``bench/update_step.py``: flags, what they select, the run.

>>> args = parse_args(["--quick", "--pipelines", "all"])
>>> args.reps, args.warmup
(5, 1)
>>> selection(args)[1] == list(CORE_PIPELINES + RECIPES)
True
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import jax

from bench.update.config import BENCH_DIR, CORE_PIPELINES, IMPLS, RECIPES
from bench.update.merge import merge
from bench.update.metadata import run_meta
from bench.update.report import write
from bench.update.run import run
from bench.update.trees import TREE_KINDS

DESCRIPTION = "Benchmark of the optimizer step: adaptx vs optax (vs PyTorch, vs a C floor)."


def _selection_flags(p: argparse.ArgumentParser) -> None:
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
        + " ('all': the core ones plus every recipe)",
    )
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 20; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; quick 1)")
    p.add_argument(
        "--out",
        default=str(BENCH_DIR / "results" / "update_step"),
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _selection_flags(p)
    _run_flags(p)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def selection(args) -> tuple[list[str], list[str], list[str]]:
    """The trees, pipelines and implementations the flags name (unknown ones: exit)."""
    kinds = [k.strip() for k in args.trees.split(",") if k.strip()]
    for k in kinds:
        if k not in TREE_KINDS:
            raise SystemExit(f"unknown tree {k!r}; choose from {','.join(TREE_KINDS)}")
    if args.pipelines == "all":
        pipelines = list(CORE_PIPELINES + RECIPES)
    else:
        pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
        for p in pipelines:
            if p not in CORE_PIPELINES + RECIPES:
                raise SystemExit(f"unknown pipeline {p!r}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    return kinds, pipelines, impls


def load_torch(impls, args):
    """PyTorch, on as many threads as cores, if asked for and on JAX's platform; or None."""
    if "torch" not in impls or args.no_torch or not importlib.util.find_spec("torch"):
        return None
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    platform_ = jax.devices()[0].platform
    if platform_ != "cpu" and not (platform_ == "gpu" and torch.cuda.is_available()):
        # PyTorch on the host CPU against JAX on an accelerator compares nothing.
        print(f"PyTorch cannot use the {platform_} JAX runs on: PyTorch column skipped")
        return None
    return torch


def load_c(impls, args):
    """The C floor's ``(library, module)``; the library is None without a compiler."""
    if "c" not in impls or args.no_c:
        return None, None
    from bench import c_floor

    return c_floor.load(), c_floor


def _merge_only(args) -> dict:
    results = merge(args.from_json)
    out = Path(args.out)
    print(write(results, out))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        return _merge_only(args)
    # Three thread pools (XLA's, PyTorch's OpenMP, the C floor's OpenMP) take turns on
    # the same cores; OpenMP workers that spin after a parallel region steal the cores
    # from whichever runs next. Passive waiting keeps the interleaved rounds fair. It
    # only takes effect for OpenMP runtimes not yet started (set before importing torch).
    if args.omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy.upper())
    kinds, pipelines, impls = selection(args)
    torch = load_torch(impls, args)
    clib, cmod = load_c(impls, args)
    meta = run_meta(args, argv, torch, clib)
    print(f"device: {meta['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"torch threads: {meta['torch_threads']}; C floor: {meta['c_floor']}")
    print(f"recipes available in adaptx: {meta['recipes_available']}")
    sys.stdout.flush()
    ctx = {"impls": impls, "torch": torch, "clib": clib, "cmod": cmod}
    return run(args, kinds, pipelines, meta, ctx)
