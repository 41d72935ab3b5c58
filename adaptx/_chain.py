r"""``optax.chain`` that honours a guard's skip and fuses a global clip into the step after it."""

from __future__ import annotations

from typing import Any

import optax

from adaptx._clipping.scalar_clip import ScalarClip, clip_of
from adaptx._core import skip as skip_lib
from adaptx._scaling.adam_family import EngineUpdate, engine_update


class _Fused:
    """A global clip and the Adam-family step after it, run as one pass (two states)."""

    def __init__(self, clip: ScalarClip, step: EngineUpdate):
        self.clip, self.step = clip, step

    def update(
        self, updates: Any, states: tuple[Any, Any], params: Any, extra_args: dict[str, Any]
    ) -> tuple[Any, tuple[Any, Any]]:
        skip = skip_lib.decision(extra_args)
        s, clip_state = self.clip.scale(updates, states[0])
        # the step first: it checks the updates against its state, naming any mismatch
        out, step_state = self.step.scaled(updates, states[1], s, params, **extra_args)
        clip_state = skip_lib.select_state(skip, states[0], clip_state)
        return out, (clip_state, step_state)


def _plan(txs: tuple[optax.GradientTransformationExtraArgs, ...]) -> list[Any]:
    """The members grouped into steps: a :class:`_Fused` pair, or one transform."""
    steps: list[Any] = []
    i = 0
    while i < len(txs):
        clip = clip_of(txs[i])
        step = engine_update(txs[i + 1]) if i + 1 < len(txs) else None
        if clip is not None and step is not None:
            steps.append(_Fused(clip, step))
            i += 2
        else:
            steps.append(txs[i])
            i += 1
    return steps


def chain(*args: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""``optax.chain(*args)``: the same state and numbers, in a program made for them.

    Two things differ from ``optax.chain``, neither visible in the numbers:

    - **The skip protocol.** Inside :func:`adaptx.guard` (or ``rewind``,
      ``dynamic_loss_scale(inner=)``), the guard's decision is passed to every member.
      adaptx members keep their own state on a skipped step inside their own pass (for
      Adam's moments: without a copy of them); the state of any other member (optax's,
      yours) is selected here. ``optax.chain`` is a transform the guard knows nothing
      of, so it selects the whole chain's state itself: correct, but on XLA:CPU it
      costs Adam's moments a copy (``python -m bench.skip_select``).
    - **Fusion.** A global clip (:func:`adaptx.clip_by_global_norm`,
      :func:`adaptx.clip_spikes`, any :func:`adaptx.scalar_clip`) directly followed by an
      Adam-family step (:func:`adaptx.scale_by_adam`, :func:`adaptx.scale_by_adam_atan2`)
      runs as one pass: the clip's scale :math:`s` is computed first, and the moments take
      :math:`s\,g` element by element in their own kernel. A per-tensor reduction that is
      homogeneous in :math:`g` (update clipping's :math:`\mathrm{mean}(g^2/\hat v)`) reads
      the unscaled :math:`g` times :math:`s^2`, and a packed state concatenates the
      unscaled leaves, so XLA never writes :math:`s\,g` out as a full-size temporary.

    The state is ``optax.chain``'s, a tuple of the members' states, so telemetry,
    checkpoints and an ``optax.chain`` of the same members read it alike. Every adaptx
    recipe is an ``adaptx.chain``; the same members in ``optax.chain`` give the same
    numbers (to the rounding of a reduction's order of additions), in a slower program.

    Args:
      *args: optax transforms, applied in order (named as ``optax.chain`` names them).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that honours the guard's skip.

    Examples:
      >>> import jax.numpy as jnp, optax, adaptx
      >>> parts = lambda: (adaptx.clip_by_global_norm(1.0), adaptx.scale_by_adam(),
      ...                  optax.scale(-0.1))
      >>> fused, plain = adaptx.chain(*parts()), optax.chain(*parts())
      >>> g = {"w": jnp.array([3.0, -4.0])}
      >>> u1, _ = fused.update(g, fused.init(g))
      >>> u2, _ = plain.update(g, plain.init(g))
      >>> bool(jnp.all(u1["w"] == u2["w"]))
      True
    """
    for i, t in enumerate(args):
        if not (hasattr(t, "init") and hasattr(t, "update")):
            raise TypeError(
                f"chain: transform {i} is not an optax GradientTransformation, got {t!r}. "
                "Pass transforms such as adaptx.scale_by_adam() or optax.scale(-1e-3)."
            )
    txs = tuple(optax.with_extra_args_support(t) for t in args)
    steps = _plan(txs)

    def init_fn(params: optax.Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in txs)

    def update_fn(
        updates: optax.Updates,
        state: tuple[Any, ...],
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, tuple[Any, ...]]:
        if len(state) != len(txs):
            raise ValueError(
                f"chain: the state has {len(state)} members but the chain has {len(txs)} "
                "transforms. Pass the state that this chain's init returned."
            )
        skip = skip_lib.decision(extra_args)
        new_state: list[Any] = []
        for step in steps:
            i = len(new_state)
            if isinstance(step, _Fused):
                updates, pair = step.update(updates, (state[i], state[i + 1]), params, extra_args)
                new_state.extend(pair)
            elif skip is None:
                updates, s = step.update(updates, state[i], params, **extra_args)
                new_state.append(s)
            else:
                updates, s = skip_lib.held(step, skip, updates, state[i], params, extra_args)
                new_state.append(s)
        return skip_lib.zeros_if(skip, updates), tuple(new_state)

    return skip_lib.Honouring(init_fn, update_fn)
