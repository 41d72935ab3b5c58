"""Recipes built on the explosion defenses: StableAdamW, SPAM and robust AdamW."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adaptx._chain import chain
from adaptx._clipping.spike_clip import clip_spikes
from adaptx._core import validate
from adaptx._guards.guard import guard
from adaptx._recipes.common import decay_and_step
from adaptx._scaling.adam import scale_by_adam

Mask = Any | Callable[[optax.Params], Any] | None


def _check_adam(
    fn: str, b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike, eps: jax.typing.ArrayLike
) -> None:
    validate.check_decay(fn, "b1", b1)
    validate.check_decay(fn, "b2", b2, example="0.999")
    validate.check_nonnegative(fn, "eps", eps, example="1e-8")


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.2,
    update_rms_clip: jax.typing.ArrayLike = 1.0,
    mask: Mask = None,
    pack_small_leaves: int | None = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""StableAdamW: AdamW with per-tensor update clipping instead of gradient clipping.

    .. math::

      \theta_t = \theta_{t-1} - \eta_t \left(
        \frac{1}{\max(1, \mathrm{RMS}_t / d)} \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
        + \lambda \theta_{t-1} \right), \qquad
      \mathrm{RMS}_t = \sqrt{\operatorname{mean}(g_t^2 / \max(\hat v_t, \epsilon^2))}

    per tensor (see :func:`adaptx.scale_by_adam`, ``update_rms_clip``). The weight
    decay is not scaled by the clip, as in the reference implementation. Defaults
    are the reference implementation's (:math:`\beta_2 = 0.99`, :math:`\lambda = 0.2`,
    :math:`d = 1`); no global-norm clipping is needed.

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: denominator floor.
      weight_decay: :math:`\lambda \ge 0`, decoupled weight decay.
      update_rms_clip: :math:`d > 0`.
      mask: which parameters are decayed (tree of booleans or a function of params).
      pack_small_leaves: keep the moments of leaves with at most this many elements
        in flat buffers; see :func:`adaptx.scale_by_adam`.
      per_tensor: keep each tensor's update RMS ratio, for
        ``adaptx.telemetry(state, per_tensor=True)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adaptx.stable_adamw(1e-3)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> float(adaptx.telemetry(state)["scale_by_adam/max_update_rms"])
      1.0

    References:
      Wortsman et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, 2023.
    """
    fn = "stable_adamw"
    _check_adam(fn, b1, b2, eps)
    validate.check_positive(fn, "update_rms_clip", update_rms_clip, example="1.0")
    return chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            update_rms_clip=update_rms_clip,
            pack_small_leaves=pack_small_leaves,
            per_tensor=per_tensor,
        ),
        *decay_and_step(fn, learning_rate, weight_decay, mask),
    )


def spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    spike_threshold: jax.typing.ArrayLike = 5000.0,
    reset_interval: int | None = 500,
    reset_warmup: int = 150,
    spike_start: int = 20,
    mask: Mask = None,
    pack_small_leaves: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SPAM: Adam with spike-aware clipping and periodic momentum reset.

    .. math::

      g_{t,i} \leftarrow \operatorname{sign}(g_{t,i})\sqrt{\theta v_{t-1,i}}
        \ \text{ if } g_{t,i}^2 > \theta v_{t-1,i}, \qquad
      m_t, v_t \leftarrow 0 \ \text{ at } t = k \Delta T, \qquad
      p_t = p_{t-1} - \eta_t\, w_t \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`w_t` the cosine warm-up factor after the last reset.

    Every ``reset_interval`` steps both moments restart from zero and the step is
    warmed back up with a cosine over ``reset_warmup`` steps; an element whose
    squared gradient exceeds ``spike_threshold`` times its previous second moment
    is clipped to that bound. See :func:`adaptx.scale_by_adam` for the math.
    Defaults are the paper's code's (:math:`\theta = 5000`, :math:`\Delta T = 500`,
    :math:`W = 150`, :math:`\epsilon = 10^{-6}`, no weight decay).

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: denominator floor.
      weight_decay: decoupled weight decay.
      spike_threshold: :math:`\theta > 0`.
      reset_interval: :math:`\Delta T` steps between momentum resets; ``None`` never.
      reset_warmup: :math:`W`, warm-up steps after each reset.
      spike_start: steps before spike clipping starts, and after each reset.
      mask: which parameters are decayed.
      pack_small_leaves: keep the moments of leaves with at most this many elements
        in flat buffers; see :func:`adaptx.scale_by_adam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, adaptx
      >>> tx = adaptx.spam(1e-3)
      >>> params = {"w": jnp.zeros(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> sorted(adaptx.telemetry(state))
      ['scale_by_adam/max_update_rms', 'scale_by_adam/momentum_scale',
       'scale_by_adam/spikes', 'scale_by_adam/tensors_clipped',
       'scale_by_learning_rate/learning_rate']

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    fn = "spam"
    _check_adam(fn, b1, b2, eps)
    validate.check_positive(fn, "spike_threshold", spike_threshold, example="5000.0")
    return chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            reset_warmup=reset_warmup,
            spike_start=spike_start,
            pack_small_leaves=pack_small_leaves,
        ),
        *decay_and_step(fn, learning_rate, weight_decay, mask),
    )


def robust_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    clip_z: jax.typing.ArrayLike = 6.0,
    clip_ratio: jax.typing.ArrayLike = 4.0,
    clip_alpha: jax.typing.ArrayLike = 0.95,
    clip_max_ratio: jax.typing.ArrayLike = 10.0,
    initial_max_norm: jax.typing.ArrayLike | None = 1.0,
    max_norm: jax.typing.ArrayLike | None = None,
    update_rms_clip: jax.typing.ArrayLike | None = 5.0,
    skip_nonfinite: bool = True,
    spike_z: jax.typing.ArrayLike | None = None,
    loss_z: jax.typing.ArrayLike | None = None,
    max_consecutive_skips: int | None = None,
    max_consecutive_nonfinite: int | None = None,
    mask: Mask = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = "float32",
    pack_small_leaves: int | None = None,
    per_tensor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with defenses that act only when something is wrong.

    .. code-block:: python

      guard(
          chain(
              clip_spikes(clip_z, clip_ratio, clip_alpha, max_ratio=clip_max_ratio,
                          initial_max_norm=initial_max_norm, max_norm=max_norm),
              scale_by_adam(b1, b2, eps, update_rms_clip=update_rms_clip,
                            mu_dtype=mu_dtype, nu_dtype=nu_dtype),
              add_decayed_weights(weight_decay, mask),
              scale_by_learning_rate(learning_rate),
          ),
          skip_nonfinite=skip_nonfinite, spike_z=spike_z, loss_z=loss_z,
          max_consecutive_skips=max_consecutive_skips,
          max_consecutive_nonfinite=max_consecutive_nonfinite,
      )

    * :func:`adaptx.guard` skips a step whose gradients (or loss, when passed as
      ``value=loss``) hold a NaN or Inf, leaving parameters and optimizer state
      bit-identical; with ``loss_z``, also a step whose loss is an outlier.
    * :func:`adaptx.clip_spikes` clips the global norm only when it is both
      ``clip_z`` standard deviations (of the log-norm) and ``clip_ratio`` times above
      its running geometric mean, from the second step on; the first step is clipped
      to ``initial_max_norm`` (Adam's first step does not depend on the gradient's
      scale, so this costs nothing and keeps a first-step spike out of the second
      moment).
    * StableAdamW's update clipping bounds each tensor's step when its second moment
      badly under-estimates the gradient: at ``update_rms_clip=5``, not StableAdamW's 1.
      Measured on the example's BiLSTM and LM (healthy runs, after the first tenth), the
      largest per-tensor :math:`\sqrt{\mathrm{mean}(g^2/\hat v)}` exceeds 1 on 72-90 % of
      the steps, 3 on 0.2-1.0 % and 5 on 0-0.3 % (``python -m bench.stability.probes
      update-rms``): at 1 it is a permanent change of the step size, not a defense.
      It is the recipe's one per-tensor defense (a spike confined to one small tensor
      barely moves the global norm), and its costliest part: the per-tensor reduction
      reads ``g`` and ``v`` once more. ``update_rms_clip=None`` keeps the detector and the
      guard alone; on ``bench/stability``'s replays it catches the same faults as the
      default, intervenes less and steps faster (figures in ``bench/README.md``).

    * The second moment is stored in float32 whatever the parameters' dtype (optax and
      :func:`adaptx.adamw` store it in the parameters' dtype). In float16, the stored
      :math:`v` flushes to zero between steps wherever it falls below
      :math:`6 \times 10^{-8}` (a gradient of about :math:`2 \times 10^{-4}`), so
      :math:`\hat v` forgets the history of :math:`g^2` and the step grows past the
      learning rate: on ``bench/stability/natural``'s float16 language model, with the
      second moment in float16 every seed ends with a late loss that is not finite, and in
      float32 every seed trains (late loss 2.11 and 2.69 on a fixed batch, the best optax
      baseline's 2.14 and 2.73). In bfloat16, an increment of
      :math:`(1 - \beta_2) = 10^{-3}` relative is below the format's resolution
      (:math:`2^{-8}`), so :math:`v` stops following :math:`g^2`. It costs 2 more bytes
      per parameter for 16-bit parameters; ``nu_dtype=None`` keeps optax's choice.

    The defaults were chosen on the calibration runs of ``bench/stability`` and are
    reported on its held-out runs (see ``bench/README.md``): on every healthy run the
    clip, the guard and the update clip intervene on at most 1 % of the steps after the
    first tenth, every NaN/Inf and every spike of 100x
    or more is caught from the first step, a spike leaves no aftershock, and a lasting
    10x rise of the norm is absorbed within a bounded number of steps. ZClip's paper
    defaults (``adaptx.zclip``) flag far more healthy steps, and are kept as they are.

    The chain is an :func:`adaptx.chain`: the clip's scale is folded into Adam's pass, so
    the update-RMS reduction reads the gradient itself and the step needs no full-size
    temporary; ``optax.chain`` of the same parts gives the same numbers (to rounding).

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: denominator floor.
      weight_decay: decoupled weight decay.
      clip_z: :func:`adaptx.clip_spikes`'s ``z_thresh``.
      clip_ratio: :func:`adaptx.clip_spikes`'s ``min_ratio``.
      clip_alpha: :func:`adaptx.clip_spikes`'s ``alpha``.
      clip_max_ratio: :func:`adaptx.clip_spikes`'s ``max_ratio``.
      initial_max_norm: ceiling on the first step's norm; ``None`` for none.
      max_norm: optional hard ceiling on the global norm at every step.
      update_rms_clip: StableAdamW's :math:`d` (its paper uses 1); ``None`` disables update
        clipping.
      skip_nonfinite: skip steps with NaN/Inf gradients or loss.
      spike_z: additionally skip steps whose norm has a z-score above this.
      loss_z: additionally skip steps whose loss has a z-score above this (needs
        ``value=loss`` at every update).
      max_consecutive_skips: let a spike through after this many skips in a row.
      max_consecutive_nonfinite: after this many non-finite steps in a row, the guard
        declares the run diverged (``guard/diverged``), and :func:`adaptx.check` raises;
        ``None`` never does.
      mask: which parameters are decayed.
      mu_dtype: storage dtype of the first moment (default: the parameters' dtype).
      nu_dtype: storage dtype of the second moment (default ``"float32"``, see above;
        a string, not ``jnp.float32``, so that ``optax.inject_hyperparams`` does not take
        the default for a schedule); ``None`` for the parameters' dtype.
      pack_small_leaves: keep the moments of leaves with at most this many elements
        in flat buffers; see :func:`adaptx.scale_by_adam`.
      per_tensor: keep each leaf's gradient norm (detector and guard) and update RMS
        ratio, and the leaf that led each intervention, for
        ``adaptx.telemetry(state, per_tensor=True)``; no extra pass over memory.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`adaptx.GuardState`.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adaptx.robust_adamw(1e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params)
      >>> bool(jnp.all(optax.apply_updates(params, updates)["w"] == params["w"]))  # untouched
      True
      >>> int(adaptx.telemetry(state)["guard/skipped"])
      1
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.nan)
      >>> int(adaptx.telemetry(state)["guard/last_reason"])  # a NaN loss is skipped too
      3

    References:
      Wortsman et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, 2023.

      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    fn = "robust_adamw"
    _check_adam(fn, b1, b2, eps)
    if update_rms_clip is not None:
        validate.check_positive(fn, "update_rms_clip", update_rms_clip, example="1.0")
    inner = chain(
        clip_spikes(
            clip_z,
            clip_ratio,
            clip_alpha,
            max_ratio=clip_max_ratio,
            initial_max_norm=initial_max_norm,
            max_norm=max_norm,
            per_tensor=per_tensor,
        ),
        scale_by_adam(
            b1,
            b2,
            eps,
            update_rms_clip=update_rms_clip,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            pack_small_leaves=pack_small_leaves,
            per_tensor=per_tensor and update_rms_clip is not None,
        ),
        *decay_and_step(fn, learning_rate, weight_decay, mask),
    )
    return guard(
        inner,
        skip_nonfinite=skip_nonfinite,
        spike_z=spike_z,
        loss_z=loss_z,
        max_consecutive_skips=max_consecutive_skips,
        max_consecutive_nonfinite=max_consecutive_nonfinite,
        per_tensor=per_tensor,
    )
