"""The parameter trees the step runs on: shapes, names and random contents.

>>> sorted(TREE_KINDS)
['many_small', 'single16', 'single64', 'transformer']
>>> shapes = tree_shapes("many_small", quick=True)
>>> tree_name("many_small", shapes), len(shape_leaves(shapes)), param_count(shapes)
('10x500', 10, 5000)
>>> tree_name("transformer", tree_shapes("transformer", quick=True))
'transformer-22leaves-21.5K'
"""

from __future__ import annotations

import math

import jax
import numpy as np

TREE_KINDS = {
    "single16": "one 16M float32 leaf",
    "single64": "one 64M float32 leaf",
    "transformer": "transformer-like: ~200 leaves, ~16M params (matrices, biases, LayerNorms)",
    "many_small": "2000 leaves of 500 params",
}


def transformer_shapes(d: int, layers: int, vocab: int, max_len: int, classes: int = 2):
    """Shapes of a pre-norm transformer encoder classifier, as a nested dict."""
    layer = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "attn": {n: {"kernel": (d, d), "bias": (d,)} for n in ("query", "key", "value", "out")},
        "ln2": {"scale": (d,), "bias": (d,)},
        "mlp1": {"kernel": (d, 4 * d), "bias": (4 * d,)},
        "mlp2": {"kernel": (4 * d, d), "bias": (d,)},
    }
    return {
        "embed": (vocab, d),
        "pos": (max_len, d),
        "layers": {f"{i:02d}": layer for i in range(layers)},
        "norm": {"scale": (d,), "bias": (d,)},
        "head": {"kernel": (d, classes), "bias": (classes,)},
    }


def tree_shapes(kind: str, quick: bool):
    if kind == "single16":
        return {"w": (1 << 16,) if quick else (1 << 24,)}
    if kind == "single64":
        return {"w": (1 << 18,) if quick else (1 << 26,)}
    if kind == "transformer":
        if quick:
            return transformer_shapes(d=32, layers=1, vocab=256, max_len=32)
        return transformer_shapes(d=320, layers=12, vocab=4096, max_len=256)
    if kind == "many_small":
        n = 10 if quick else 2000
        return {f"l{i:04d}": (500,) for i in range(n)}
    raise ValueError(f"unknown tree {kind!r}; choose from {sorted(TREE_KINDS)}")


def is_shape(x) -> bool:
    """Whether ``x`` is a leaf of a shapes tree (a tuple of ints)."""
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def shape_leaves(shapes) -> list[tuple[int, ...]]:
    return jax.tree.leaves(shapes, is_leaf=is_shape)


def param_count(shapes) -> int:
    return sum(math.prod(s) for s in shape_leaves(shapes))


def tree_name(kind: str, shapes) -> str:
    leaves = shape_leaves(shapes)
    n = param_count(shapes)
    size = f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n / 2**10:.3g}K"
    if kind.startswith("single"):
        return f"1x{size}"
    if kind == "many_small":
        return f"{len(leaves)}x{leaves[0][0]}"
    return f"transformer-{len(leaves)}leaves-{size}"


def make_numpy_tree(shapes, seed: int, scale: float):
    rng = np.random.default_rng(seed)

    def leaf(shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    return jax.tree.map(leaf, shapes, is_leaf=is_shape)
