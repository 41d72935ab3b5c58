"""The size of the step against the size of the parameters, kept in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports

_TENSOR_FIELDS = ("tensor_param_norm", "tensor_update_norm", "tensor_update_ratio")


@reports("monitor", "param_norm", "update_norm", "update_ratio", per_tensor=_TENSOR_FIELDS)
class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    Attributes:
      inner_state: the wrapped transformation's state.
      param_norm: global norm of the parameters passed at the last step (float32).
      update_norm: global norm of the updates ``inner`` returned at the last step
        (float32).
      update_ratio: ``update_norm / param_norm`` (float32; 0 while the parameters are all
        zero).
      tensor_param_norm: with ``per_tensor``, each leaf's parameter norm
        (``TensorFigures``, float32); ``None`` otherwise.
      tensor_update_norm: with ``per_tensor``, each leaf's update norm; ``None`` otherwise.
      tensor_update_ratio: with ``per_tensor``, each leaf's update norm over its parameter
        norm (0 for a leaf that is all zero); ``None`` otherwise.
    """

    inner_state: optax.OptState
    param_norm: jax.Array
    update_norm: jax.Array
    update_ratio: jax.Array
    tensor_param_norm: per_tensor_lib.TensorFigures | None = None
    tensor_update_norm: per_tensor_lib.TensorFigures | None = None
    tensor_update_ratio: per_tensor_lib.TensorFigures | None = None


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den`` is 0 (nothing to compare the step with)."""
    safe = jnp.where(den > 0, den, jnp.ones([], den.dtype))
    return jnp.where(den > 0, num / safe, jnp.zeros([], num.dtype))


def _figures(params: Any, updates: Any, state: MonitorState, per_tensor: bool) -> dict:
    """This step's figures, as the fields of a :class:`MonitorState`."""
    f32 = jnp.float32
    if not per_tensor:
        p = jnp.sqrt(tu.sum_of_squares(params)).astype(f32)
        u = jnp.sqrt(tu.sum_of_squares(updates)).astype(f32)
        return {"param_norm": p, "update_norm": u, "update_ratio": _ratio(u, p)}
    # Each leaf's sum of squares; the global figures are their totals.
    p_sq = per_tensor_lib.leaf_sums_of_squares(params)
    u_sq = per_tensor_lib.leaf_sums_of_squares(updates)
    p, u = jnp.sqrt(jnp.sum(p_sq)).astype(f32), jnp.sqrt(jnp.sum(u_sq)).astype(f32)
    leaf_p, leaf_u = jnp.sqrt(p_sq).astype(f32), jnp.sqrt(u_sq).astype(f32)
    assert state.tensor_param_norm is not None  # built with per_tensor=True
    assert state.tensor_update_norm is not None and state.tensor_update_ratio is not None
    return {
        "param_norm": p,
        "update_norm": u,
        "update_ratio": _ratio(u, p),
        "tensor_param_norm": state.tensor_param_norm.replace(leaf_p),
        "tensor_update_norm": state.tensor_update_norm.replace(leaf_u),
        "tensor_update_ratio": state.tensor_update_ratio.replace(_ratio(leaf_u, leaf_p)),
    }


def monitor(
    inner: optax.GradientTransformation, *, per_tensor: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a transformation and keeps the norms of the parameters and of its step.

    .. math::

      \|\theta_t\| = \sqrt{\textstyle\sum_i \theta_{t,i}^2}, \qquad
      \|u_t\| = \sqrt{\textstyle\sum_i u_{t,i}^2}, \qquad
      r_t = \frac{\|u_t\|}{\|\theta_t\|},

    with :math:`\theta_t` the parameters passed to ``update`` and :math:`u_t` the updates
    ``inner`` returns for them: the size of the step relative to the weights it moves
    (:math:`r_t` is 0 while the parameters are all zero). :func:`adaptx.telemetry` reports
    them as ``monitor/param_norm``, ``monitor/update_norm`` and ``monitor/update_ratio``;
    with ``per_tensor=True`` also per parameter leaf, as
    ``monitor/tensor_param_norm/<param path>``, ``monitor/tensor_update_norm/<param path>``
    and ``monitor/tensor_update_ratio/<param path>``, for
    ``adaptx.telemetry(state, per_tensor=True)``. A ratio that stays far above its usual
    level is a learning rate too large for that tensor; a parameter norm that is not
    finite makes :func:`adaptx.check` raise. The updates are returned as ``inner``
    returns them.

    The norms are two reductions (parameters, updates) with the accumulation and the
    grouping of small leaves of the other norms in adaptx; the per-leaf figures are the
    partial sums of the global ones. They are not free: XLA:CPU writes the update out to
    reduce it and copies the donated parameters (``bench/measured/monitor.md``,
    ``python -m bench.monitor_cost``), 2.2-3.7x the step time of ``adamw`` on large leaves;
    on a GPU 1.07-1.34x (``python -m bench.paired monitor``, ``bench/measured/gpu``).

    Under a guard's skip (the skip protocol), ``inner`` is told to skip and the figures
    stay as they were, so they always describe the last step that was taken.

    Args:
      inner: the transformation whose step is measured (typically a whole optimizer).
      per_tensor: also keep each leaf's norms and ratio.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`MonitorState`;
      ``update`` needs ``params``. It honours the decision of a guard around it.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> tx = adaptx.monitor(optax.sgd(0.1))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> updates, state = tx.update({"w": jnp.array([6.0, 8.0])}, tx.init(params), params)
      >>> {k: round(float(v), 4) for k, v in adaptx.telemetry(state).items()}
      {'monitor/param_norm': 5.0, 'monitor/update_norm': 1.0, 'monitor/update_ratio': 0.2}

    References:
      You, Gitman and Ginsburg, `Large Batch Training of Convolutional Networks
      <https://arxiv.org/abs/1708.03888>`_, 2017 (the ratio of a layer's update norm to its
      weight norm, per layer).
    """
    fn = "monitor"
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(
            f"{fn}: `inner` must be an optax GradientTransformation, got inner={inner!r}. "
            "Pass e.g. inner=adaptx.adamw(1e-3)."
        )
    if not isinstance(per_tensor, bool):
        raise ValueError(
            f"{fn}: `per_tensor` must be a bool, got per_tensor={per_tensor!r}. "
            "Pass e.g. per_tensor=True."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> MonitorState:
        def scalar() -> jax.Array:  # a buffer of its own: the state may be donated
            return jnp.zeros([], jnp.float32)

        tensors = {f: per_tensor_lib.zeros(params) for f in _TENSOR_FIELDS} if per_tensor else {}
        return MonitorState(inner.init(params), scalar(), scalar(), scalar(), **tensors)

    def update_fn(
        updates: optax.Updates,
        state: MonitorState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MonitorState]:
        validate.require_params(fn, params)
        tu.check_same_structure(fn, updates, params, "updates", "params", shapes=True)
        skip = skip_lib.decision(extra_args)
        if skip is None:
            out, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        else:
            out, inner_state = skip_lib.run(
                inner, skip, updates, state.inner_state, params, extra_args
            )
        new = _figures(params, out, state, per_tensor)
        # Under a guard's skip the figures stay those of the last step taken.
        new = {f: skip_lib.select_state(skip, getattr(state, f), v) for f, v in new.items()}
        return out, MonitorState(inner_state, **new)

    return skip_lib.Honouring(init_fn, update_fn)
