r"""Adam-atan2: Adam's step read off the moments with ``atan2``, with no epsilon."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._scaling import adam_engine as engine
from adaptx._scaling import adam_family as family


class ScaleByAdamAtan2State(NamedTuple):
    """State of :func:`scale_by_adam_atan2`.

    Attributes:
      count: number of updates applied so far (int32, saturating).
      mu: first-moment estimate, in ``mu_dtype`` (packed with ``pack_small_leaves``).
      nu: second-moment estimate, in ``nu_dtype`` (likewise).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_atan2(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    a: jax.typing.ArrayLike = 1.27,
    b: jax.typing.ArrayLike = 1.0,
    *,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    nesterov: bool = False,
    pack_small_leaves: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam's moments through ``atan2`` (Adam-atan2, Everett et al. 2024).

    Adam's moments and bias corrections (see :func:`adaptx.scale_by_adam`), with the
    step

    .. math::

      u_t = a \cdot \operatorname{atan2}\!\left(\hat m_t,\; b \sqrt{\hat v_t}\right)

    in place of :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`. For
    :math:`|\hat m| \ll b\sqrt{\hat v}` it is Adam's step times :math:`a/b`; it has no
    :math:`\epsilon`, so nothing underflows in bfloat16 or float16 and an element with
    :math:`\hat v = 0` gets a step of 0 (or :math:`\pm a\pi/2` if :math:`\hat m \ne 0`);
    it is invariant to the gradient's scale (multiplying every gradient by :math:`c > 0`
    leaves the step unchanged); and every element is bounded by construction,
    :math:`|u_t| \le a\pi/2`, whatever the gradient.

    The defaults are the constants of the reference implementations,
    :math:`a = 1.27 \approx 4/\pi` (so that :math:`a \operatorname{atan2}(x, 1) = x` at
    :math:`|x| = 1`) and :math:`b = 1`, with :math:`\beta_2 = 0.99`. Same engine as
    :func:`adaptx.scale_by_adam`: configurable storage dtypes, the skip protocol of
    :func:`adaptx.guard`, and ``pack_small_leaves``. ``atan2`` takes real arguments: a
    complex leaf raises ``TypeError``.

    Args:
      b1: decay :math:`\beta_1 \in [0, 1)` of the first moment.
      b2: decay :math:`\beta_2 \in [0, 1)` of the second moment.
      a: :math:`a > 0`, the step's scale.
      b: :math:`b > 0`, the second moment's weight inside ``atan2``.
      mu_dtype: storage dtype of :math:`m` (default: the parameter's dtype).
      nu_dtype: storage dtype of :math:`v` (default: the parameter's dtype).
      nesterov: use Nesterov momentum (NAdam's first moment).
      pack_small_leaves: pack the moments of leaves with at most this many elements
        into flat buffers (see :func:`adaptx.scale_by_adam`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.scale_by_adam_atan2()
      >>> state = tx.init(jnp.zeros(3))
      >>> u, _ = tx.update(jnp.array([1e-12, 1.0, -1e12]), state)   # no eps: scale-free
      >>> u
      Array([ 0.9974...,  0.9974..., -0.9974...], dtype=float32)
      >>> adam = adaptx.scale_by_adam()
      >>> u, _ = adam.update(jnp.array([1e-12, 1.0, -1e12]), adam.init(jnp.zeros(3)))
      >>> u   # Adam's eps swamps the small gradient
      Array([ 9.999...e-05,  1.000...e+00, -1.000...e+00], dtype=float32)

    References:
      Everett et al., `Scaling Exponents Across Parameterizations and Optimizers
      <https://arxiv.org/abs/2407.05872>`_, ICML 2024.
    """
    fn = "scale_by_adam_atan2"
    validate.check_decay(fn, "b1", b1)
    validate.check_decay(fn, "b2", b2, example="0.99")
    validate.check_positive(fn, "a", a, example="1.27")
    validate.check_positive(fn, "b", b, example="1.0")
    a_, b_ = tu.as_scalar(a, jnp.float32), tu.as_scalar(b, jnp.float32)

    def direction(k: engine.Scalars, m_hat: jax.Array, v_hat: jax.Array) -> jax.Array:
        acc = m_hat.dtype
        return a_.astype(acc) * jnp.arctan2(m_hat, b_.astype(acc) * jnp.sqrt(v_hat))

    method = engine.Method(
        name=fn,
        scalars=engine.no_scalars,
        moments=engine.ema_moments,
        direction=direction,
        nesterov=nesterov,
        no_complex="atan2 has no complex form (it takes real arguments)",
    )

    def make_state(
        moments: engine.Moments, step: engine.Step | None, context: Any
    ) -> ScaleByAdamAtan2State:
        del step, context
        return ScaleByAdamAtan2State(moments.count, moments.mu, moments.nu)

    return family.transformation(
        method,
        b1,
        b2,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        pack_small_leaves=pack_small_leaves,
        make_state=make_state,
    )
