r"""Outlier detection against running statistics that no outlier can corrupt.

Shared by :func:`adaptx.clip_spikes` (on the log of the gradient norm) and by
:func:`adaptx.guard`'s loss check (on the loss itself). A value :math:`x_t` is judged
against the mean :math:`\mu` and variance :math:`\sigma^2` of the values before it:

.. math::

  b_t = \mu_{t-1} + \min\bigl(\max(z\,\sigma_{t-1},\ \delta),\ \Delta\bigr), \qquad
  \text{outlier} \iff x_t > b_t ,

with :math:`z` the z-score threshold, :math:`\delta \ge 0` a minimum gap and
:math:`\Delta \ge \delta` a maximum one (in log space, :math:`\delta = \log r` means "at
least :math:`r` times the typical value", and :math:`\Delta = \log R` makes anything
:math:`R` times the typical value an outlier, however noisy the history).
Nothing is judged before ``min_count`` values have been recorded.

The statistics are then fed the value *winsorised* at the bound,
:math:`\tilde x_t = \min(x_t, b_t)`, with weight :math:`w_k = \max(1/k, 1 - \alpha)` for
the :math:`k`-th recorded value:

.. math::

  d = \tilde x_t - \mu, \qquad \mu \leftarrow \mu + w_k d, \qquad
  \sigma^2 \leftarrow \begin{cases}
    (1 - w_k)(\sigma^2 + w_k d^2) & \text{not an outlier} \\
    \sigma^2 & \text{outlier.} \end{cases}

With :math:`w_k = 1/k` this is Welford's update (the exact mean and population
variance of the values so far), so the statistics have no start-up bias; once
:math:`1/k < 1 - \alpha` it is an exponential moving average. Three properties follow,
which the window rules used in practice (mean + 6 sigma of the last 128 values) lack:

* **NaN-proof.** A non-finite value is never recorded, so one NaN cannot turn the
  statistics into NaN.
* **No aftershocks.** An outlier moves :math:`\mu` by :math:`w_k (b_t - \mu)` at most and
  leaves :math:`\sigma` alone, so even a :math:`10^8\times` spike neither makes the rule
  trigger-happy afterwards nor blinds it (feeding the bound into the variance too would
  widen it by a third at each spike, with :math:`z = 6`, until spikes pass unseen).
* **Bounded adaptation.** After a lasting jump of the value by :math:`J`, each step
  moves :math:`\mu` up by at least :math:`(1-\alpha)\delta`, so the jump stops being an
  outlier after at most :math:`(J - \delta) / ((1-\alpha)\delta)` steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adaptx._core import tree as tu


class Judgement(NamedTuple):
    """What :func:`judge` decided about one value.

    Attributes:
      outlier: scalar bool, the value is above the bound (never during start-up or for a
        non-finite value).
      bound: :math:`b_t` (``+inf`` before ``min_count`` values were recorded).
      z: :math:`(x_t - \\mu) / \\sigma` (0 before statistics exist; large when
        :math:`\\sigma = 0`).
      fed: the value the statistics should record, :math:`\\min(x_t, b_t)`.
    """

    outlier: jax.Array
    bound: jax.Array
    z: jax.Array
    fed: jax.Array


def judge(
    x: jax.Array,
    count: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    z_thresh: Any,
    min_gap: Any,
    max_gap: Any = jnp.inf,
    min_count: int = 1,
) -> Judgement:
    """Judges ``x`` against ``(count, mean, var)``; see the module docstring."""
    f32 = jnp.float32
    x = x.astype(f32)
    std = jnp.sqrt(var)
    ready = count >= min_count
    width = jnp.maximum(tu.as_scalar(z_thresh, f32) * std, tu.as_scalar(min_gap, f32))
    width = jnp.minimum(width, tu.as_scalar(max_gap, f32))
    bound = jnp.where(ready, mean + width, jnp.inf)
    finite = jnp.isfinite(x)
    z = jnp.where(ready, (x - mean) / jnp.maximum(std, 1e-12), 0.0)
    return Judgement(
        outlier=ready & finite & (x > bound),
        bound=bound,
        z=jnp.where(finite, z, 0.0),
        fed=jnp.minimum(x, bound),
    )


def record(
    count: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    x: jax.Array,
    *,
    alpha: Any,
    when: jax.Array | bool,
    outlier: jax.Array | bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds ``x`` into ``(count, mean, var)`` where ``when`` holds and ``x`` is finite.

    Where ``outlier`` holds (pass :attr:`Judgement.outlier`), only the mean moves.
    """
    f32 = jnp.float32
    x = x.astype(f32)
    when = when & jnp.isfinite(x)
    k = tu.safe_increment(count).astype(f32)
    w = jnp.maximum(1.0 / k, 1.0 - tu.as_scalar(alpha, f32))
    d = jnp.where(when, x - mean, 0.0)  # never let a NaN into the arithmetic below
    new_mean = mean + w * d
    new_var = (1.0 - w) * (var + w * jnp.square(d))
    return (
        jnp.where(when, tu.safe_increment(count), count).astype(count.dtype),
        jnp.where(when, new_mean, mean).astype(mean.dtype),
        jnp.where(when & ~jnp.asarray(outlier), new_var, var).astype(var.dtype),
    )
