"""Prototype: clip + AdamW with the moments of small leaves packed into one flat buffer.

Not part of the library; it exists to measure what packing buys on trees with many
small leaves (see ``bench/README.md``). The tree interface is the usual optax one:
``init(params)`` and ``update(grads, state, params) -> (updates, state)`` on the
user's tree; only the state layout differs.

Why it compiles fast: XLA:CPU emits one machine-code kernel per *distinct* fused
computation. A per-leaf update that reads its slice of a flat buffer at a constant
offset is a distinct kernel for every leaf (2000 leaves -> 2000 LLVM compilations).
Here each small leaf's offset is a runtime int32 scalar kept in the state, so every
small leaf of a given shape uses the *same* fused computation, which XLA compiles
once. Leaves above ``pack_max`` elements keep their own moments and fused pass
(packing them would add a copy of the gradient and of the update per step).

Per step, for the packed part: one concatenation of the small gradients, one
reduction for the norm, one fused pass over the flat gradient and moments writing the
moments and the flat update, then one small fused kernel per leaf
``p + slice(u) - lr * wd * p`` (``optax.apply_updates`` fuses into it).

>>> import jax.numpy as jnp, optax
>>> tx = packed_adamw(1e-3)
>>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
>>> state = tx.init(params)
>>> grads = {"w": jnp.full((2, 3), 0.1), "b": jnp.full(3, -0.2)}
>>> updates, state = jax.jit(tx.update)(grads, state, params)
>>> ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
>>> ref_updates, _ = jax.jit(ref.update)(grads, ref.init(params), params)
>>> bool(all(jnp.allclose(a, b, atol=1e-7) for a, b in zip(
...     jax.tree.leaves(updates), jax.tree.leaves(ref_updates))))
True
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class PackedAdamState(NamedTuple):
    count: jax.Array  # int32 scalar
    flat_mu: jax.Array  # [n_small] float32: moments of every small leaf, concatenated
    flat_nu: jax.Array
    offsets: tuple  # one int32 scalar per small leaf: its start in the flat buffers
    mu: tuple  # per big leaf
    nu: tuple


def _split(leaves, pack_max):
    small = [i for i, x in enumerate(leaves) if x.size <= pack_max]
    big = [i for i, x in enumerate(leaves) if x.size > pack_max]
    return small, big


def packed_adamw(
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    max_norm: float | None = 1.0,
    pack_max: int = 1 << 16,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(...))``, packed.

    Leaves with at most ``pack_max`` elements share one flat float32 buffer per moment.
    """

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        small, big = _split(leaves, pack_max)
        sizes = [leaves[i].size for i in small]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32) if sizes else []
        n = int(sum(sizes))
        return PackedAdamState(
            count=jnp.zeros([], jnp.int32),
            flat_mu=jnp.zeros([n], jnp.float32),
            flat_nu=jnp.zeros([n], jnp.float32),
            offsets=tuple(jnp.asarray(s, jnp.int32) for s in starts),
            mu=tuple(jnp.zeros_like(leaves[i]) for i in big),
            nu=tuple(jnp.zeros_like(leaves[i]) for i in big),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        small, big = _split(g_leaves, pack_max)
        f32 = jnp.float32
        count = state.count + 1
        t = count.astype(f32)
        k1 = 1.0 / (1.0 - jnp.asarray(b1, f32) ** t)
        k2 = 1.0 / (1.0 - jnp.asarray(b2, f32) ** t)
        lr = jnp.asarray(learning_rate, f32)
        wd = jnp.asarray(weight_decay, f32)

        gs = (
            jnp.concatenate([g_leaves[i].reshape(-1).astype(f32) for i in small])
            if small
            else (jnp.zeros([0], f32))
        )
        sq = jnp.sum(gs * gs) + sum(
            (jnp.sum(jnp.square(g_leaves[i].astype(f32))) for i in big), jnp.zeros([], f32)
        )
        if max_norm is None:
            s = jnp.ones([], f32)
        else:
            norm = jnp.sqrt(sq)
            c = jnp.asarray(max_norm, f32)
            s = jnp.where(norm > c, c / jnp.where(norm > c, norm, 1.0), 1.0)

        def adam(g, m, v):
            g = g.astype(f32) * s
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (g * g)
            return (k1 * m) / (jnp.sqrt(k2 * v) + eps), m, v

        out = [None] * len(g_leaves)
        # Packed part: one fused pass over all small leaves. The barrier materialises the
        # flat update, so the per-leaf kernels below read it instead of each re-fusing the
        # whole concatenation (which would make every one of them distinct and huge).
        if small:
            u_flat, mu, nu = jax.lax.optimization_barrier(adam(gs, state.flat_mu, state.flat_nu))
            for k, i in enumerate(small):
                p = p_leaves[i]
                u = jax.lax.dynamic_slice(u_flat, (state.offsets[k],), (p.size,)).reshape(p.shape)
                out[i] = (-lr * (u + wd * p.astype(f32))).astype(p.dtype)
        else:
            mu, nu = state.flat_mu, state.flat_nu
        new_mu, new_nu = [], []
        for k, i in enumerate(big):
            p = p_leaves[i]
            u, m, v = adam(g_leaves[i], state.mu[k], state.nu[k])
            out[i] = (-lr * (u + wd * p.astype(f32))).astype(p.dtype)
            new_mu.append(m.astype(state.mu[k].dtype))
            new_nu.append(v.astype(state.nu[k].dtype))
        new_state = PackedAdamState(count, mu, nu, state.offsets, tuple(new_mu), tuple(new_nu))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
