"""``adaptx.check``: a diverged run or non-finite parameters stop the loop, nothing else does.

The figures are built by hand where they name guard figures that ``adaptx.guard`` does not
report yet (``guard/diverged``, ``guard/steps``, ``guard/consecutive_nonfinite``), and
taken from a real guard where they exist.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

DIVERGED = {
    "guard/grad_norm": math.nan,
    "guard/skipped": 9,
    "guard/last_reason": 1,
    "guard/diverged": 1,
    "guard/steps": 812,
    "guard/consecutive_nonfinite": 5,
}


def as_host(x):
    return x


def as_numpy(x):
    return np.asarray(x, dtype=np.int32 if isinstance(x, int) else np.float32)[()]


def as_device(x):
    return jnp.asarray(x, dtype=jnp.int32 if isinstance(x, int) else jnp.float32)


CONVERTERS = [as_host, as_numpy, as_device]


def converted(figures: dict, convert) -> dict:
    return {k: convert(v) for k, v in figures.items()}


@pytest.mark.parametrize("convert", CONVERTERS)
def test_diverged_guard_names_step_reason_and_run_length(convert):
    with pytest.raises(adaptx.DivergedError) as info:
        adaptx.check(converted(DIVERGED, convert))
    e = info.value
    assert isinstance(e, RuntimeError)
    assert (e.step, e.reason, e.consecutive, e.tensor) == (812, "non-finite gradients", 5, None)
    message = str(e)
    assert "at step 812" in message
    assert "5 non-finite steps in a row (since step 807)" in message
    assert "non-finite gradients" in message
    assert "9 steps skipped in all" in message


@pytest.mark.parametrize("convert", CONVERTERS)
def test_healthy_figures_pass(convert):
    healthy = {**DIVERGED, "guard/diverged": 0, "guard/grad_norm": 1.0, "guard/last_reason": 0}
    healthy["monitor/param_norm"] = 12.5
    assert adaptx.check(converted(healthy, convert)) is None


@pytest.mark.parametrize(
    "code, words",
    [(2, "gradient-norm spike"), (3, "non-finite loss"), (4, "loss spike"),
     (5, "gradient norm above max_grad_norm"), (6, "loss above max_loss"), (42, "reason 42")],
)  # fmt: skip
def test_reason_codes_are_named_as_the_report_names_them(code, words):
    with pytest.raises(adaptx.DivergedError, match=words) as info:
        adaptx.check({**DIVERGED, "guard/last_reason": code})
    assert info.value.reason == words


def test_device_arrays_are_fetched_in_one_transfer(monkeypatch):
    calls = []
    real = jax.device_get

    def counting(tree):
        calls.append(tree)
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    with pytest.raises(adaptx.DivergedError):
        adaptx.check(converted(DIVERGED, as_device))
    assert len(calls) == 1


def test_without_a_step_count_the_skipped_count_is_given():
    figures = {k: v for k, v in DIVERGED.items() if k != "guard/steps"}
    with pytest.raises(adaptx.DivergedError) as info:
        adaptx.check(figures)
    assert info.value.step is None
    assert "no guard/steps" in str(info.value) and "9 steps skipped in all" in str(info.value)


def test_prefixed_keys_of_two_guards_are_read_apart():
    outer = {f"0/{k}": v for k, v in DIVERGED.items()}
    inner = {f"1/{k}": v for k, v in DIVERGED.items()}
    outer["0/guard/diverged"] = 0
    inner["1/guard/steps"] = 40
    with pytest.raises(adaptx.DivergedError, match=r"at step 40, as 1/guard declared") as info:
        adaptx.check({**outer, **inner})
    assert info.value.step == 40
    assert adaptx.check({**outer, "1/guard/diverged": 0}) is None


def test_per_tensor_figures_name_the_first_non_finite_tensor():
    figures = {
        **DIVERGED,
        "guard/tensor_grad_norm/encoder/kernel": 1.0,
        "guard/tensor_grad_norm/decoder/bias": math.nan,
        "guard/tensor_grad_norm/head/kernel": math.inf,
        "clip_spikes/tensor_grad_norm/embed": math.nan,  # not the guard's: not read
    }
    with pytest.raises(adaptx.DivergedError, match="first non-finite gradient in decoder/bias"):
        adaptx.check(figures)
    del figures["guard/tensor_grad_norm/decoder/bias"]
    with pytest.raises(adaptx.DivergedError) as info:
        adaptx.check(figures)
    assert info.value.tensor == "head/kernel"


@pytest.mark.parametrize("convert", CONVERTERS)
@pytest.mark.parametrize(
    "key, tensor",
    [
        ("monitor/param_norm", None),
        ("0/monitor/param_norm", None),
        ("monitor/tensor_param_norm/encoder/kernel", "encoder/kernel"),
    ],
)
def test_non_finite_parameter_norms_raise(convert, key, tensor):
    figures = {"monitor/param_norm": 3.0, "monitor/tensor_param_norm/head": 1.0}
    assert adaptx.check(converted(figures, convert)) is None
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(adaptx.DivergedError, match="parameters are not finite") as info:
            adaptx.check(converted({**figures, key: bad}, convert))
        assert info.value.tensor == tensor
        assert key in str(info.value)


def test_figures_without_guard_or_parameter_norms_are_an_error_that_says_how_to_get_them():
    with pytest.raises(ValueError) as info:
        adaptx.check({"loss": 0.3, "clip_by_global_norm/grad_norm": 2.0})
    message = str(info.value)
    assert "no guard figures" in message and "no parameter norms" in message
    assert "adaptx.guard(tx, max_consecutive_nonfinite=N)" in message
    assert "'clip_by_global_norm/grad_norm'" in message
    with pytest.raises(ValueError, match="nothing to check"):
        adaptx.check({})


def test_bad_arguments():
    with pytest.raises(TypeError, match="`figures` must be the dict adaptx.telemetry"):
        adaptx.check([("guard/diverged", 1)])
    with pytest.raises(ValueError, match=r"figures\['guard/diverged'\] must be a real scalar"):
        adaptx.check({"guard/diverged": np.ones(3)})


def test_without_a_limit_the_guard_never_declares_divergence():
    """``diverged`` stays 0 without ``max_consecutive_nonfinite``, even after many NaN steps."""
    tx = adaptx.robust_adamw(1e-2, per_tensor=True)
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    nan = {"w": jnp.full(3, jnp.nan), "b": jnp.zeros(2)}
    for _ in range(4):
        _, state = tx.update(nan, state, params, value=jnp.float32(1.0))
    figures = jax.device_get(adaptx.telemetry(state, per_tensor=True))
    assert int(figures["guard/diverged"]) == 0 and int(figures["guard/consecutive"]) == 4
    assert int(figures["guard/consecutive_nonfinite"]) == 4
    assert adaptx.check(figures) is None
    assert adaptx.check(adaptx.telemetry(state)) is None  # device arrays too
    with pytest.raises(adaptx.DivergedError, match="parameters are not finite"):
        adaptx.check({**figures, "monitor/param_norm": np.float32(np.nan)})


def test_a_real_guard_declares_divergence_after_its_limit():
    tx = adaptx.guard(optax.sgd(1e-2), per_tensor=True, max_consecutive_nonfinite=3)
    params = {"enc": jnp.ones(2), "dec": jnp.ones(2)}
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s, params))
    _, state = step({"enc": jnp.ones(2), "dec": jnp.ones(2)}, state)
    bad = {"enc": jnp.ones(2), "dec": jnp.array([1.0, jnp.inf])}
    for _ in range(3):
        assert adaptx.check(jax.device_get(adaptx.telemetry(state, per_tensor=True))) is None
        _, state = step(bad, state)
    figures = jax.device_get(adaptx.telemetry(state, per_tensor=True))
    assert int(figures["guard/diverged"]) == 1
    with pytest.raises(adaptx.DivergedError) as info:
        adaptx.check(figures)
    assert info.value.tensor == "dec"
    assert info.value.reason == "non-finite gradients"
    assert info.value.step == 4
    # a healthy step afterwards does not undo the verdict
    _, state = step({"enc": jnp.ones(2), "dec": jnp.ones(2)}, state)
    with pytest.raises(adaptx.DivergedError):
        adaptx.check(jax.device_get(adaptx.telemetry(state)))
