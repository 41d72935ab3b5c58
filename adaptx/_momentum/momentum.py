"""Heavy-ball momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate


class MomentumState(NamedTuple):
    """State of :func:`momentum`.

    Attributes:
      trace: the momentum buffer, one array per parameter.
    """

    trace: optax.Updates


def momentum(
    decay: jax.typing.ArrayLike = 0.9, *, nesterov: bool = False, dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Heavy-ball momentum (the semantics of ``optax.trace``).

    .. math::

      b_t = g_t + \mu\, b_{t-1}, \qquad
      u_t = \begin{cases} g_t + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise.} \end{cases}

    The buffer is not damped by :math:`1-\mu`, as in PyTorch's SGD and
    ``optax.sgd``; put the learning rate after it. Complex leaves are averaged as they
    are, as ``optax.trace`` does.

    Args:
      decay: :math:`\mu \in [0, 1)`.
      nesterov: use Nesterov's look-ahead form.
      dtype: storage dtype of the buffer (default: the parameter's dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.momentum(0.5)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u
      Array([1.5], dtype=float32)

    References:
      Polyak, `Some methods of speeding up the convergence of iteration methods
      <https://doi.org/10.1016/0041-5553(64)90137-5>`_, 1964.

      Sutskever et al., `On the importance of initialization and momentum in deep
      learning <https://proceedings.mlr.press/v28/sutskever13.html>`_, 2013.
    """
    fn = "momentum"
    validate.check_decay(fn, "decay", decay)
    validate.check_dtype(fn, "dtype", dtype)
    dtype = tu.canonical_dtype(dtype)

    def init_fn(params: optax.Params) -> MomentumState:
        return MomentumState(trace=tu.zeros_like(params, dtype=dtype))

    def update_fn(
        updates: optax.Updates,
        state: MomentumState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MomentumState]:
        del params
        skip = skip_lib.decision(extra_args)
        tu.check_float_leaves(fn, updates, allow_complex=True)
        tu.check_same_structure(fn, updates, state.trace, "updates", "state.trace", shapes=True)
        mu = tu.as_scalar(decay, jnp.float32)

        def leaf(g, b):
            acc = tu.compute_dtype(g.dtype, b.dtype)
            g_, m = g.astype(acc), mu.astype(acc)
            b_ = skip_lib.hold(skip, b, g_ + m * b.astype(acc))
            u = skip_lib.silence(skip, g_ + m * b_ if nesterov else b_)
            return u.astype(g.dtype), tu.to_storage(b_, b.dtype)

        u, trace = tu.unzip(jax.tree.map(leaf, updates, state.trace), updates, 2)
        return u, MomentumState(trace=trace)

    return skip_lib.Honouring(init_fn, update_fn)
