"""adaptx: composable JAX gradient transformations that keep training stable.

Every public transform is a factory returning an ``optax.GradientTransformationExtraArgs``;
it chains with ``optax.chain``, runs under ``jax.jit`` and plugs into
``flax.nnx.Optimizer``. What a transform measures (pre-clip norms, scales,
thresholds, skip counters) lives in its state; :func:`telemetry` returns it as a
flat dict of scalars.

The namespace mirrors the README's sections: clipping (fixed and adaptive
thresholds), adaptive scaling, momentum, guards, recipes and telemetry.
"""

from adaptx._adopt import adopt_state
from adaptx._chain import chain
from adaptx._check import DivergedError, check
from adaptx._clipping.adagc import AdaGCState, adagc
from adaptx._clipping.agc import adaptive_grad_clip
from adaptx._clipping.autoclip import AutoClipState, autoclip
from adaptx._clipping.block_rms import ClipByBlockRmsState, clip_by_block_rms
from adaptx._clipping.global_norm import ClipByGlobalNormState, clip_by_global_norm
from adaptx._clipping.scalar_clip import scalar_clip
from adaptx._clipping.spike_clip import ClipSpikesState, clip_spikes
from adaptx._clipping.value import clip_by_value
from adaptx._clipping.zclip import ZClipState, zclip
from adaptx._guards.accumulate import AccumulateState, accumulate
from adaptx._guards.guard import GuardState, guard
from adaptx._guards.loss_scale import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from adaptx._guards.rewind import RewindState, rewind
from adaptx._momentum.ema import EmaState, ema
from adaptx._momentum.momentum import MomentumState, momentum
from adaptx._monitor import MonitorState, monitor
from adaptx._nnx import restore_on_skip
from adaptx._recipes.adamw import adam_atan2, adamw
from adaptx._recipes.defended import robust_adamw, spam, stable_adamw
from adaptx._recipes.sgd import sgd
from adaptx._scaling.adagrad import ScaleByAdagradState, scale_by_adagrad
from adaptx._scaling.adam import ScaleByAdamState, scale_by_adam
from adaptx._scaling.adam_atan2 import ScaleByAdamAtan2State, scale_by_adam_atan2
from adaptx._scaling.learning_rate import ScaleByLearningRateState, scale_by_learning_rate
from adaptx._scaling.rms import ScaleByRmsState, scale_by_rms
from adaptx._telemetry import telemetry
from adaptx._writer import MetricsWriter

__version__ = "0.1.0"

__all__ = (
    "AccumulateState",
    "AdaGCState",
    "AutoClipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipSpikesState",
    "DivergedError",
    "DynamicLossScaleState",
    "EmaState",
    "GuardState",
    "MetricsWriter",
    "MomentumState",
    "MonitorState",
    "RewindState",
    "ScaleByAdagradState",
    "ScaleByAdamAtan2State",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ZClipState",
    "accumulate",
    "adagc",
    "adam_atan2",
    "adamw",
    "adaptive_grad_clip",
    "adopt_state",
    "autoclip",
    "chain",
    "check",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_value",
    "clip_spikes",
    "dynamic_loss_scale",
    "ema",
    "guard",
    "loss_scale",
    "momentum",
    "monitor",
    "restore_on_skip",
    "rewind",
    "robust_adamw",
    "scalar_clip",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adam_atan2",
    "scale_by_learning_rate",
    "scale_by_rms",
    "sgd",
    "spam",
    "stable_adamw",
    "telemetry",
    "zclip",
)
