r"""StableAdamW's update clipping (Wortsman et al. 2023), as a per-tensor engine reduction.

Each tensor's step is divided by :math:`\max(1, \mathrm{RMS}/d)`, with
:math:`\mathrm{RMS} = \sqrt{\mathrm{mean}(g_t^2 / \max(\hat v_t, \epsilon^2))}`. Plugged
into the Adam engine (``adaptx._scaling.adam_engine``) by :func:`adaptx.scale_by_adam`
when ``update_rms_clip`` is set; the math is in that function's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adaptx._core import tree as tu
from adaptx._scaling.adam_engine import Reduction, Scalars


def reduction(d: jax.typing.ArrayLike, eps: jax.typing.ArrayLike) -> Reduction:
    """The update-RMS reduction with clip level ``d`` and denominator floor ``eps``.

    :math:`\\mathrm{mean}(g^2/\\max(\\hat v, \\epsilon^2))` with :math:`\\hat v = v/b_2`
    (:math:`b_2 = 1-\\beta_2^t`) is computed as :math:`b_2\\,\\mathrm{mean}(g^2 / \\max(v,
    b_2\\epsilon^2))`: the same number, but the reduction reads ``v`` itself, so XLA does
    not write :math:`\\hat v` out as a temporary.
    """
    d = tu.as_scalar(d, jnp.float32)
    e = tu.as_scalar(eps, jnp.float32)

    def terms(k: Scalars, g: jax.Array, v: jax.Array) -> jax.Array:
        acc = g.dtype
        floor = jnp.maximum(v, k.bc2.astype(acc) * (e.astype(acc) * e.astype(acc)))
        return g * (g / floor)

    def weight(k: Scalars) -> jax.Array:
        return k.bc2

    def factor(k: Scalars, rms: jax.Array) -> jax.Array:
        del k
        return 1 / jnp.maximum(jnp.ones([], rms.dtype), rms / d.astype(rms.dtype))

    def exceeded(k: Scalars, rms: jax.Array) -> jax.Array:
        del k
        return rms > d

    return Reduction(terms=terms, weight=weight, factor=factor, degree=2, exceeded=exceeded)
