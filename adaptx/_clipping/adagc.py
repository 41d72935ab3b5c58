"""AdaGC: per-tensor clipping against an EMA of each tensor's clipped norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptx._clipping.global_norm import clip_scale
from adaptx._core import per_tensor as per_tensor_lib
from adaptx._core import skip as skip_lib
from adaptx._core import tree as tu
from adaptx._core import validate
from adaptx._core.telemetry import reports


@reports(
    "adagc",
    *("grad_norm", "tensors_clipped", "gamma_mean"),
    per_tensor=("tensor_grad_norm", "tensor_clip_factor", "top_tensor"),
)
class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    ``tensors_clipped`` is a counter: it means what ``adaptx._core.telemetry.COUNTERS``
    says, in every state that reports it.

    Attributes:
      count: number of steps taken (int32, saturating).
      gamma: per-tensor reference norm :math:`\\gamma_i`, a float32 scalar per
        gradient leaf, in a tree shaped like the parameters. 0 means no norm has
        been recorded for that tensor yet.
      grad_norm: global L2 norm of the incoming gradients at the last step, before
        clipping (float32).
      tensors_clipped: tensors scaled down at the last step (int32). During warm-up,
        every tensor when the global clip engaged, else 0.
      gamma_mean: mean of ``gamma`` over the tensors after the last step (float32).
      tensor_grad_norm: with ``per_tensor``, each leaf's gradient norm at the last
        step (``TensorFigures``, float32); ``None`` otherwise.
      tensor_clip_factor: with ``per_tensor``, each leaf's clip factor at the last
        step (``TensorFigures``, float32, in [0, 1]); ``None`` otherwise.
      top_tensor: with ``per_tensor``, the leaf with the largest norm at the last step
        that clipped any (int32 index into the per-tensor figures; -1 before any).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    gamma: optax.Updates
    grad_norm: jax.Array
    tensors_clipped: jax.Array
    gamma_mean: jax.Array
    tensor_grad_norm: per_tensor_lib.TensorFigures | None = None
    tensor_clip_factor: per_tensor_lib.TensorFigures | None = None
    top_tensor: jax.Array | None = None


def adagc(
    beta: jax.typing.ArrayLike = 0.98,
    lambda_rel: jax.typing.ArrayLike = 1.05,
    lambda_abs: jax.typing.ArrayLike = 1.0,
    warmup_steps: int = 100,
    *,
    axis_name: Any = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: clips each tensor against an EMA of its own past clipped norms.

    Every gradient tensor :math:`g_{t,i}` (one leaf of the tree) keeps a reference
    norm :math:`\gamma_i`. For the first :math:`T` steps (warm-up) the whole tree
    is clipped by global norm to :math:`\lambda_{abs}`, and :math:`\gamma_i`
    records the smallest clipped norm seen:

    .. math::

      \hat g_{t} = \min\!\left(1, \frac{\lambda_{abs}}{\|g_t\|}\right) g_t, \qquad
      \gamma_{t,i} = \min\bigl(\gamma_{t-1,i}, \|\hat g_{t,i}\|\bigr)
      \quad (\gamma_{1,i} = \|\hat g_{1,i}\|), \qquad t \le T .

    After warm-up each tensor is clipped on its own, relative to its reference
    norm, which then follows an EMA of the clipped norms:

    .. math::

      h_{t,i} = \min\!\left(1, \frac{\lambda_{rel}\,\gamma_{t-1,i}}{\|g_{t,i}\|}\right),
      \qquad \hat g_{t,i} = h_{t,i}\, g_{t,i}, \qquad
      \gamma_{t,i} = \beta\gamma_{t-1,i} + (1-\beta)\|\hat g_{t,i}\|, \qquad t > T .

    So a tensor's gradient norm may grow by at most a factor :math:`\lambda_{rel}`
    over its recent level per step, while a spike in one tensor leaves the others
    untouched (global clipping would shrink them all). This is Algorithm 1 of the
    paper as the authors' Megatron-LM code runs it (default ``AdaGC`` mode, with
    tensor-parallel norms all-reduced): steps :math:`1..T` are the warm-up, and the
    warm-up's reference norm is the running minimum, not an EMA. The defaults are
    the paper's recommendations (:math:`\beta = 0.98`, :math:`\lambda_{rel} = 1.05`,
    :math:`\lambda_{abs} = 1`, :math:`T = 100`); the authors' GPT-2 script uses
    :math:`\beta = 0.99`, :math:`\lambda_{rel} = 1.04`.

    Where this implementation adds to the reference code:

    * A tensor whose gradient is exactly zero leaves its :math:`\gamma_i`
      unchanged. In JAX an unused parameter gets a zero gradient where PyTorch
      gives it none and the reference code skips it; recording the zero would set
      :math:`\gamma_i = 0` and freeze that tensor for the rest of training. A
      tensor with no recorded norm yet starts from its first nonzero norm, as the
      reference code does for a parameter first seen after warm-up.
    * A tensor with a non-finite norm leaves its :math:`\gamma_i` unchanged too
      (the reference code would make it NaN for good). Its gradient is scaled by 0
      when infinite and passes through when NaN; wrap the optimizer in
      :func:`adaptx.guard` to skip such steps.
    * Scales are exactly :math:`\min(1, c / \|g\|)`; the reference code divides by
      :math:`\|g\| + 10^{-6}`.

    Norms are accumulated in float32 or wider whatever the gradients' dtype; each
    tensor is multiplied by one scalar. The reference norms are float32 scalars,
    one per tensor, so the state is tiny.

    Args:
      beta: EMA decay :math:`\beta \in [0, 1)` of the reference norms. May be a
        tracer.
      lambda_rel: :math:`\lambda_{rel} > 0`, the largest allowed ratio of a
        tensor's gradient norm to its reference norm. May be a tracer.
      lambda_abs: :math:`\lambda_{abs} > 0`, the global-norm bound during warm-up.
        May be a tracer.
      warmup_steps: number :math:`T \ge 0` of warm-up steps. May be a tracer.
      axis_name: under ``shard_map``/``pmap``, the mapped axis (or axes) that
        every gradient leaf is sharded over; each tensor's squared norm is summed
        across it (one collective for all tensors), so a sharded tensor is clipped
        by its whole norm, as the reference code all-reduces the norms of
        tensor-parallel weights. Leave it ``None`` for data parallelism, where each
        device holds the whole (averaged) gradient, and under ``jax.jit`` with
        sharded arrays, where the norms are global already.
      per_tensor: also keep each leaf's norm and clip factor, and the leaf that led the
        last clip, for ``adaptx.telemetry(state, per_tensor=True)`` (figures AdaGC
        computes anyway).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AdaGCState`; :func:`adaptx.telemetry` reports ``grad_norm``,
      ``tensors_clipped`` and ``gamma_mean``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.adagc(warmup_steps=1)
      >>> state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
      >>> grads = {"a": jnp.array([0.6, 0.0]), "b": jnp.array([0.0, 0.3])}
      >>> _, state = tx.update(grads, state)  # warm-up: global norm 0.67 < 1
      >>> spike = {"a": jnp.array([60.0, 0.0]), "b": jnp.array([0.0, 0.3])}
      >>> updates, state = tx.update(spike, state)
      >>> updates["a"], updates["b"]  # only "a" is clipped, to 1.05 * 0.6
      (Array([0.63, 0.  ], dtype=float32), Array([0. , 0.3], dtype=float32))
      >>> int(adaptx.telemetry(state)["adagc/tensors_clipped"])
      1

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    fn = "adagc"
    validate.check_decay(fn, "beta", beta, example="0.98")
    validate.check_positive(fn, "lambda_rel", lambda_rel, example="1.05")
    validate.check_positive(fn, "lambda_abs", lambda_abs, example="1.0")
    validate.check_int(fn, "warmup_steps", warmup_steps, low=0, traced_ok=True, example="100")

    def init_fn(params: optax.Params) -> AdaGCState:
        return AdaGCState(
            count=jnp.zeros([], jnp.int32),
            gamma=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
            grad_norm=jnp.zeros([], jnp.float32),
            tensors_clipped=jnp.zeros([], jnp.int32),
            gamma_mean=jnp.zeros([], jnp.float32),
            **_initial_figures(params, per_tensor),
        )

    def update_fn(
        updates: optax.Updates,
        state: AdaGCState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AdaGCState]:
        del params, extra_args
        tu.check_float_leaves(fn, updates)
        tu.check_same_structure(fn, updates, state.gamma, "updates", "state's gamma")
        leaves, treedef_ = jax.tree.flatten(updates)
        treedef: Any = treedef_  # jaxlib's PyTreeDef has no stubs
        count = tu.safe_increment(state.count)
        if not leaves:
            return updates, state._replace(count=count)

        f32 = jnp.float32
        acc = tu.compute_dtype(*(x.dtype for x in leaves))
        sq = jnp.stack([jnp.sum(tu.abs_sq(x.astype(acc))) for x in leaves])
        if axis_name is not None:
            sq = jax.lax.psum(sq, axis_name)
        global_norm = jnp.sqrt(jnp.sum(sq))
        norms = jnp.sqrt(sq).astype(f32)
        gamma = jnp.stack(treedef.flatten_up_to(state.gamma)).astype(f32)
        seen = gamma > 0
        record = jnp.isfinite(norms) & (norms > 0)
        warm = state.count < jnp.asarray(warmup_steps).astype(jnp.int32)

        # Warm-up: one global scale; gamma tracks the minimum clipped norm.
        global_s = clip_scale(global_norm, lambda_abs).astype(f32)
        warm_norms = norms * global_s
        warm_record = jnp.isfinite(warm_norms) & (warm_norms > 0)
        warm_gamma = jnp.where(seen, jnp.minimum(gamma, warm_norms), warm_norms)
        warm_gamma = jnp.where(warm_record, warm_gamma, gamma)
        warm_s = jnp.broadcast_to(global_s, norms.shape)

        # After warm-up: each tensor against lambda_rel times its reference norm.
        ref = jnp.where(seen, gamma, norms)
        bound = tu.as_scalar(lambda_rel, f32) * ref
        over = norms > bound
        rel_s = jnp.where(over, bound / jnp.where(over, norms, 1.0), 1.0)
        clipped_norms = jnp.where(over, bound, norms)
        b = tu.as_scalar(beta, f32)
        rel_gamma = jnp.where(record, b * ref + (1.0 - b) * clipped_norms, gamma)

        s = jnp.where(warm, warm_s, rel_s)
        new_gamma = jnp.where(warm, warm_gamma, rel_gamma)
        out = treedef.unflatten([tu.scale(x, s[i]) for i, x in enumerate(leaves)])
        new_state = AdaGCState(
            count=count,
            gamma=treedef.unflatten(list(new_gamma)),
            grad_norm=global_norm.astype(state.grad_norm.dtype),
            tensors_clipped=jnp.sum(s < 1, dtype=jnp.int32),
            gamma_mean=jnp.mean(new_gamma).astype(state.gamma_mean.dtype),
        )
        if per_tensor and state.tensor_clip_factor is not None:
            new_state = new_state._replace(
                tensor_clip_factor=state.tensor_clip_factor.replace(s),
                **per_tensor_lib.updated(state, norms, jnp.any(s < 1)),
            )
        return out, new_state

    return skip_lib.by_selection(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def _initial_figures(params, per_tensor: bool) -> dict:
    if not per_tensor:
        return {}
    return {
        **per_tensor_lib.initial(params, True),
        "tensor_clip_factor": per_tensor_lib.zeros(params).replace(
            jnp.ones([len(jax.tree.leaves(params))], jnp.float32)
        ),
    }
