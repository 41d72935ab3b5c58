"""Helpers shared by the tests of the norm-statistics transforms (autoclip, zclip, adagc)."""

import jax
import jax.numpy as jnp
import numpy as np


def scripted_grads(steps, spikes, seed=0, decay=False):
    """Gradient trees with global norm ~1 (5% noise), times ``spikes[t]`` at scripted steps.

    With ``decay`` the typical norm falls from ~2 to ~1 (``1 + exp(-t / 20)``).
    """
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        norm = (1.0 + np.exp(-t / 20)) if decay else 1.0
        norm *= (1.0 + 0.05 * rng.standard_normal()) * spikes.get(t, 1.0)
        w, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
        total = np.sqrt(np.sum(w**2) + np.sum(b**2))
        out.append(
            {
                "w": jnp.asarray(w * norm / total, jnp.float32),
                "b": jnp.asarray(b * norm / total, jnp.float32),
            }
        )
    return out


def norm64(tree):
    """Global L2 norm of a tree, in float64 NumPy."""
    squares = (np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
    return float(np.sqrt(sum(squares)))


def grads_with_norm(norm):
    return {"w": jnp.array([norm, 0.0], jnp.float32)}


def run(tx, grads_seq):
    """Jitted updates over a gradient sequence; returns every update and state."""
    update = jax.jit(tx.update)
    state = tx.init(grads_seq[0])
    outs, states = [], []
    for g in grads_seq:
        u, state = update(g, state)
        outs.append(u)
        states.append(state)
    return outs, states
