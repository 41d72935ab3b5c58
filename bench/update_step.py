"""Benchmark of the optimizer step: adaptx vs optax (vs PyTorch, vs a C floor).

Times the jitted, donated step ``params, state <- apply_updates(params, update(grads,
state, params))`` of equivalent pipelines on several parameter trees:

* pipelines: ``clip+adamw`` (global-norm clip 1.0 then AdamW), ``adamw`` alone,
  ``clip`` alone (applied as ``p + clip(g)``), ``sgd-floor`` (``p - lr * g``: the
  cheapest step a tree can take, a compile/dispatch floor), and the adaptx recipes
  (``robust_adamw``, ``stable_adamw``, ``spam``, ``guard``, ``zclip``, ``adam_atan2``)
  against the nearest optax chain;
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

This file is the script (``python bench/update_step.py`` or ``python -m
bench.update_step``); the code is in ``bench/update/``, one concept a module, and the
names other scripts use are re-exported here. Run ``python bench/update_step.py --help``
for the flags; ``bench/README.md`` explains the output.

>>> sorted(TREE_KINDS)
['many_small', 'single16', 'single64', 'transformer']
>>> sum(PASSES[p] for p in ("clip+adamw", "adamw"))
15
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script, or loaded from its path: make ``bench`` importable
    _ROOT = str(Path(__file__).resolve().parent.parent)
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)

from bench.update.cell import bench_cell, estimate_compile  # noqa: E402
from bench.update.cli import main, parse_args  # noqa: E402
from bench.update.compiled import count_fusions  # noqa: E402
from bench.update.config import (  # noqa: E402
    B1,
    B2,
    CEILING_PASSES,
    CORE_PIPELINES,
    EPS,
    IMPLS,
    LR,
    MAX_NORM,
    PACK,
    PASSES,
    RECIPES,
    WD,
)
from bench.update.donation import quiet, shared_buffers  # noqa: E402
from bench.update.external import CVariant, TorchVariant  # noqa: E402
from bench.update.memory import RssPeak, device_memory, rss_bytes  # noqa: E402
from bench.update.merge import merge  # noqa: E402
from bench.update.metadata import device_info, git_info, versions  # noqa: E402
from bench.update.metadata import loadavg as _loadavg  # noqa: E402
from bench.update.pipelines import NEAREST_OPTAX, hand_written, jax_variants  # noqa: E402
from bench.update.report import format_line, markdown, write  # noqa: E402
from bench.update.targets import MEMORY_SLACK, evaluate_targets, speed_targets  # noqa: E402
from bench.update.timing import (  # noqa: E402
    CompileEvents,
    ceiling,
    compile_events,
    run_rounds,
    summarize,
)
from bench.update.trees import (  # noqa: E402
    TREE_KINDS,
    make_numpy_tree,
    transformer_shapes,
    tree_name,
    tree_shapes,
)
from bench.update.trees import is_shape as _is_shape  # noqa: E402
from bench.update.variants import CeilingVariant, JaxVariant, Variant  # noqa: E402

__all__ = [
    "B1",
    "B2",
    "CEILING_PASSES",
    "CORE_PIPELINES",
    "EPS",
    "IMPLS",
    "LR",
    "MAX_NORM",
    "MEMORY_SLACK",
    "NEAREST_OPTAX",
    "PACK",
    "PASSES",
    "RECIPES",
    "TREE_KINDS",
    "WD",
    "CVariant",
    "CeilingVariant",
    "CompileEvents",
    "JaxVariant",
    "RssPeak",
    "TorchVariant",
    "Variant",
    "_is_shape",
    "_loadavg",
    "bench_cell",
    "ceiling",
    "compile_events",
    "count_fusions",
    "device_info",
    "device_memory",
    "estimate_compile",
    "evaluate_targets",
    "format_line",
    "git_info",
    "hand_written",
    "jax_variants",
    "main",
    "make_numpy_tree",
    "markdown",
    "merge",
    "parse_args",
    "quiet",
    "rss_bytes",
    "run_rounds",
    "shared_buffers",
    "speed_targets",
    "summarize",
    "transformer_shapes",
    "tree_name",
    "tree_shapes",
    "versions",
    "write",
]

if __name__ == "__main__":
    main()
