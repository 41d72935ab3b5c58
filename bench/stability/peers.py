"""The skip-step rules that large training codebases ship, written from their published code.

All three keep the last 128 losses and gradient norms and skip a step whose value is more
than 6 standard deviations above the window's mean, judged against the window *before*
the current value is added. Read from:

* levanter, ``src/levanter/optim/skipstep.py`` (``marin-community/levanter`` at 9263f81):
  population std floored at 1e-6; skips once 64 values are in the window; a step is
  skipped when the loss *or* the norm is out; the update is multiplied by 0 (so a NaN
  update stays NaN); every value enters the window, skipped or NaN.
* OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py`` (``allenai/OLMo-core`` at
  fa6c501): the same window and threshold, unbiased std (N - 1) with no floor, skipping
  once 63 values precede the current one; the update and the moment updates are
  multiplied by the 0/1 factor.
* MaxText, ``skip_step_on_spikes`` in ``optimizers.py`` (``AI-Hypercomputer/maxtext`` at
  e591f30): unbiased std, the same start, and the skip is a ``lax.cond`` that returns
  zeros and the old state (no NaN leaks); its norm is taken after clipping.

:func:`window_skip` is that rule with each of these choices as an argument; it wraps an
inner transformation like :func:`adaptx.guard` does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class WindowSkipState(NamedTuple):
    inner_state: optax.OptState
    losses: jax.Array  # [window]
    norms: jax.Array  # [window]
    count: jax.Array  # values written so far (saturating at window)
    index: jax.Array  # next slot
    skipped: jax.Array  # 1 if the last step was skipped


def _ok(history: jax.Array, filled: jax.Array, x: jax.Array, sigma: float, ddof: int, floor):
    """``x - mean <= sigma * std`` over the first ``filled`` slots (False for NaN, as in torch)."""
    valid = jnp.arange(history.shape[0]) < filled
    n = jnp.maximum(filled.astype(jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(valid, history, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(history - mean), 0.0)) / jnp.maximum(n - ddof, 1.0)
    std = jnp.sqrt(var)
    if floor is not None:
        std = jnp.maximum(std, floor)
    return (x - mean) <= sigma * std


def window_skip(
    inner: optax.GradientTransformation,
    *,
    on: tuple[str, ...] = ("loss", "grad_norm"),
    window: int = 128,
    sigma: float = 6.0,
    min_history: int = 64,
    ddof: int = 0,
    std_floor: float | None = 1e-6,
    multiply: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose loss or gradient norm is ``sigma`` std above the last ``window``.

    The loss is read from ``value=`` (the optax extra-args convention); the norm is the
    incoming gradients' global norm. ``multiply=True`` zeroes the update by multiplying
    it by 0 (levanter, OLMo-core), ``False`` selects zeros (MaxText).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        buf = jnp.zeros([window], jnp.float32)
        zero = jnp.zeros([], jnp.int32)
        return WindowSkipState(inner.init(params), buf, buf, zero, zero, zero)

    def update_fn(updates, state, params=None, **extra):
        norm = optax.tree.norm(updates).astype(jnp.float32)
        loss = jnp.asarray(extra.get("value", 0.0), jnp.float32)
        ok = jnp.ones([], bool)
        if "loss" in on:
            ok &= _ok(state.losses, state.count, loss, sigma, ddof, std_floor)
        if "grad_norm" in on:
            ok &= _ok(state.norms, state.count, norm, sigma, ddof, std_floor)
        skip = (state.count >= min_history) & ~ok
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        if multiply:
            factor = jnp.where(skip, 0.0, 1.0)
            out = jax.tree.map(lambda u: u * factor.astype(u.dtype), new_updates)
        else:
            out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        inner_state = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new_inner, state.inner_state)
        i = state.index
        return out, WindowSkipState(
            inner_state=inner_state,
            losses=state.losses.at[i].set(loss),
            norms=state.norms.at[i].set(norm),
            count=jnp.minimum(state.count + 1, window),
            index=(i + 1) % window,
            skipped=skip.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def levanter(inner, on=("loss", "grad_norm")):
    """levanter's ``SkipStepConfig`` defaults."""
    return window_skip(inner, on=on, ddof=0, std_floor=1e-6, multiply=True, min_history=64)


def olmo_core(inner, on=("loss", "grad_norm")):
    """OLMo-core's ``SkipStepOptimizer`` defaults (the current value is the 64th entry)."""
    return window_skip(inner, on=on, ddof=1, std_floor=None, multiply=True, min_history=63)


def maxtext(inner, on=("loss", "grad_norm")):
    """MaxText's ``skip_step_on_spikes`` defaults."""
    return window_skip(inner, on=on, ddof=1, std_floor=None, multiply=False, min_history=63)
