"""Step time of each defense's full optimizer, paired against ``adaptx.adamw`` in one run.

Every variant steps the same parameter tree (a small transformer's shapes) under
``jax.jit`` with parameters and state donated. Each round times every variant once, in
a fresh random order, and divides by ``adaptx.adamw``'s time in the same round; the
figures are the median, min and max of those ratios over the rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def tree_shapes(d: int = 256, layers: int = 4, vocab: int = 8192) -> dict:
    shapes = {"embed": (vocab, d), "head": (d, vocab)}
    for i in range(layers):
        shapes |= {
            f"l{i}/qkv": (d, 3 * d),
            f"l{i}/out": (d, d),
            f"l{i}/up": (d, 4 * d),
            f"l{i}/down": (4 * d, d),
            f"l{i}/ln": (d,),
            f"l{i}/bias": (4 * d,),
        }
    return shapes


def describe(shapes: dict) -> dict:
    """The timed tree in a line a reader can check: its leaves and parameters."""
    n = sum(int(np.prod(s)) for s in shapes.values())
    return {"leaves": len(shapes), "parameters": n}


def _step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, value=jnp.ones([], jnp.float32))
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def paired_ratios(
    variants: dict[str, Callable[[], optax.GradientTransformation]],
    *,
    baseline: str,
    pairs: dict[str, tuple[str, str]] | None = None,
    rounds: int = 15,
    reps: int = 10,
    shapes: dict | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """``{name: {"ms": median ms/step, "ratio": median, "min": .., "max": ..}}``, the ratios
    against ``baseline``; each of ``pairs`` (``label: (a, b)``) adds ``a``'s time over ``b``'s,
    paired round by round."""
    shapes = shapes or tree_shapes()
    rng = np.random.default_rng(seed)
    grads = {k: jnp.asarray(rng.standard_normal(s, np.float32) * 1e-2) for k, s in shapes.items()}
    runs = {}
    for name, make in variants.items():
        tx = optax.with_extra_args_support(make())
        params = jax.tree.map(jnp.zeros_like, grads)
        step = _step(tx)
        state = jax.tree.map(jnp.copy, tx.init(params))  # no buffer twice among the donated
        params, state = step(params, state, grads)  # compile and warm up
        runs[name] = [step, params, state]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in rng.permutation(list(variants)):
            step, params, state = runs[name]
            jax.block_until_ready(params)
            t0 = time.perf_counter()
            for _ in range(reps):
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            times[name].append((time.perf_counter() - t0) / reps)
            runs[name][1:] = [params, state]

    def ratio(a: str, b: str) -> dict:
        r = np.array(times[a]) / np.array(times[b])
        return {"ratio": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}

    out = {
        name: {"ms": float(np.median(t) * 1e3), **ratio(name, baseline)}
        for name, t in times.items()
    }
    for label, (a, b) in (pairs or {}).items():
        out[label] = {"ms": None, **ratio(a, b), "pair": [a, b]}
    return out
