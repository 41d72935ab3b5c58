"""The skip-step rules that large training codebases ship, written from their published code.

All three keep the last 128 losses and gradient norms and skip a step whose value is more
than 6 standard deviations from the window's mean, judged against the window *before*
the current value is added:

.. math::

    \\text{skip}_t = \\big(\\text{count} \\ge h\\big) \\wedge
    \\neg\\big(x_t - \\bar x_{\\text{window}} \\le 6\\,\\sigma_{\\text{window}}\\big)

for ``x`` the loss and the gradient norm (a NaN makes the comparison false: skipped).
Read from (repository, path, commit):

* levanter: ``marin-community/marin``, ``src/levanter/optim/skipstep.py`` at c877ddb:
  population std floored at 1e-6; skips once ``h = 64`` values are in the window; the
  norm is that of the gradient the wrapper receives; the update is multiplied by the 0/1
  factor (so a NaN update stays NaN) and the inner state is selected with ``where``;
  every value enters the window, skipped or NaN.
* OLMo-core: ``allenai/OLMo-core``, ``src/olmo_core/optim/skip_step_optimizer.py`` at
  067267c: unbiased std (N - 1) with no floor, a two-sided z-score (``|x - mean| / std``),
  skipping once 64 values are held counting the current one (63 before it); the factor
  multiplies the update and the moment updates alike (a NaN stays NaN in both).
* MaxText: ``AI-Hypercomputer/maxtext``, ``src/maxtext/optimizers/optimizers.py``
  (``skip_step_on_spikes``) at a90f992, and ``src/maxtext/trainers/pre_train/train.py``
  at 000e6d8: unbiased std, skipping once ``count + 1 >= 64``; the skip is a ``lax.cond``
  that returns zeros and the old inner state (no NaN leaks); the train step first clips
  the gradient to ``gradient_clipping_threshold`` (default 1.0) with
  ``optax.clip_by_global_norm``, then passes the norm of the *clipped* gradient.

:func:`window_skip` is that rule with each of these choices as an argument; it wraps an
inner transformation like :func:`adaptx.guard` does. :func:`maxtext` adds MaxText's clip.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

#: How a skip is applied: multiply the update by 0 and select the old inner state
#: (levanter), multiply the update and the state's change by 0 (OLMo-core), or run only
#: one branch with ``lax.cond`` (MaxText).
MODES = ("multiply", "multiply_state", "cond")


class WindowSkipState(NamedTuple):
    inner_state: optax.OptState
    losses: jax.Array  # [window]
    norms: jax.Array  # [window]
    count: jax.Array  # values written so far (saturating at window)
    index: jax.Array  # next slot
    skipped: jax.Array  # 1 if the last step was skipped


def _ok(history, filled, x, sigma: float, ddof: int, floor, two_sided: bool):
    """``x - mean <= sigma * std`` over the first ``filled`` slots (False for NaN, as in torch)."""
    valid = jnp.arange(history.shape[0]) < filled
    n = jnp.maximum(filled.astype(jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(valid, history, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(history - mean), 0.0)) / jnp.maximum(n - ddof, 1.0)
    std = jnp.sqrt(var)
    if floor is not None:
        std = jnp.maximum(std, floor)
    dev = jnp.abs(x - mean) if two_sided else x - mean
    return dev <= sigma * std


def _apply_skip(mode: str, skip, run_inner, updates, old_inner):
    """The inner update, or zeros and the old state, as ``mode`` does it."""
    if mode == "cond":
        return jax.lax.cond(
            skip, lambda: (jax.tree.map(jnp.zeros_like, updates), old_inner), run_inner
        )
    new_updates, new_inner = run_inner()
    keep = jnp.where(skip, 0.0, 1.0)
    out = jax.tree.map(lambda u: u * keep.astype(u.dtype), new_updates)
    if mode == "multiply":
        return out, jax.tree.map(lambda n, o: jnp.where(skip, o, n), new_inner, old_inner)

    def scaled(n, o):  # the state's change times the factor; counters selected
        if jnp.issubdtype(n.dtype, jnp.floating):
            return o + keep.astype(n.dtype) * (n - o)
        return jnp.where(skip, o, n)

    return out, jax.tree.map(scaled, new_inner, old_inner)


def window_skip(
    inner: optax.GradientTransformation,
    *,
    on: tuple[str, ...] = ("loss", "grad_norm"),
    window: int = 128,
    sigma: float = 6.0,
    min_history: int = 64,
    ddof: int = 0,
    std_floor: float | None = 1e-6,
    mode: str = "multiply",
    two_sided: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose loss or gradient norm is ``sigma`` std above the last ``window``.

    The loss is read from ``value=`` (the optax extra-args convention); the norm is the
    incoming gradients' global norm, or ``window_norm=`` when given (MaxText passes the
    norm of its clipped gradient). ``mode`` is one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        buf = jnp.zeros([window], jnp.float32)
        zero = jnp.zeros([], jnp.int32)
        return WindowSkipState(inner.init(params), buf, buf, zero, zero, zero)

    def update_fn(updates, state, params=None, **extra):
        norm = extra.pop("window_norm", None)
        norm = optax.tree.norm(updates) if norm is None else norm
        norm = jnp.asarray(norm, jnp.float32)
        loss = jnp.asarray(extra.get("value", 0.0), jnp.float32)
        ok = jnp.ones([], bool)
        stats = dict(sigma=sigma, ddof=ddof, floor=std_floor, two_sided=two_sided)
        if "loss" in on:
            ok &= _ok(state.losses, state.count, loss, **stats)
        if "grad_norm" in on:
            ok &= _ok(state.norms, state.count, norm, **stats)
        skip = (state.count >= min_history) & ~ok
        out, inner_state = _apply_skip(
            mode,
            skip,
            lambda: inner.update(updates, state.inner_state, params, **extra),
            updates,
            state.inner_state,
        )
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
    return window_skip(inner, on=on, ddof=0, std_floor=1e-6, mode="multiply", min_history=64)


def olmo_core(inner, on=("loss", "grad_norm")):
    """OLMo-core's ``SkipStepOptimizer`` defaults (the current value is the 64th entry)."""
    return window_skip(
        inner, on=on, ddof=1, std_floor=None, mode="multiply_state", min_history=63, two_sided=True
    )


def maxtext(inner, on=("loss", "grad_norm"), clip: float | None = 1.0):
    """MaxText's train step with ``skip_step_on_spikes``: the gradient clipped to ``clip``
    (``gradient_clipping_threshold``; ``None`` or 0 for none), its norm *after* the clip
    given to the window rule, and the skip a ``lax.cond``."""
    rule = window_skip(inner, on=on, ddof=1, std_floor=None, mode="cond", min_history=63)
    clipper = optax.clip_by_global_norm(clip) if clip else optax.identity()

    def update_fn(updates, state, params=None, **extra):
        clipped, _ = clipper.update(updates, optax.EmptyState())
        extra["window_norm"] = optax.tree.norm(clipped)
        return rule.update(clipped, state, params, **extra)

    return optax.GradientTransformationExtraArgs(rule.init, update_fn)
