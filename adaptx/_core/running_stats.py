"""Running mean and variance of a scalar (a gradient norm), jit-safe.

The first ``warmup`` recorded values give the population mean and variance
(Welford's update); after that an exponential moving average with weight
``alpha`` on the past takes over, its variance measured about the new mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adaptx._core import tree as tu

EPS = 1e-6


def zscore(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    r""":math:`(x - \mu) / (\sigma + 10^{-6})`."""
    return (x - mean) / (jnp.sqrt(var) + EPS)


def record(
    count: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    x: jax.Array,
    *,
    alpha: Any,
    warmup: Any,
    when: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds ``x`` into (count, mean, var) where ``when`` holds; else returns them unchanged."""
    f32 = jnp.float32
    x = x.astype(f32)
    a = tu.as_scalar(alpha, f32)
    warm = count < jnp.asarray(warmup).astype(count.dtype)
    k = tu.safe_increment(count).astype(f32)
    delta = x - mean
    w_mean = mean + delta / k
    w_var = var + (delta * (x - w_mean) - var) / k
    e_mean = a * mean + (1.0 - a) * x
    e_var = a * var + (1.0 - a) * jnp.square(x - e_mean)
    new_mean = jnp.where(warm, w_mean, e_mean)
    new_var = jnp.where(warm, w_var, e_var)
    return (
        jnp.where(when, tu.safe_increment(count), count).astype(count.dtype),
        jnp.where(when, new_mean, mean).astype(mean.dtype),
        jnp.where(when, new_var, var).astype(var.dtype),
    )
