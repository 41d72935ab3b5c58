"""The benchmark's fixed settings: hyperparameters, pipelines, implementations, bytes.

>>> sum(PASSES[p] for p in ("clip+adamw", "adamw"))
15
>>> passes("robust_adamw") == passes("clip+adamw")
True
"""

from __future__ import annotations

from pathlib import Path

#: ``bench/``: the default ``--out`` lives under it, the repository is its parent.
BENCH_DIR = Path(__file__).resolve().parents[1]

LR, B1, B2, EPS, WD, MAX_NORM = 1e-3, 0.9, 0.999, 1e-8, 1e-4, 1.0
RECIPES = ("robust_adamw", "stable_adamw", "spam", "guard", "zclip", "adam_atan2")
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


def passes(pipeline: str) -> int:
    """Float32 passes over the tree that ``pipeline``'s math requires."""
    return PASSES.get(pipeline, PASSES["clip+adamw"])
