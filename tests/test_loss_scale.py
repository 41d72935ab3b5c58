"""dynamic_loss_scale: unscale, skip and back off on overflow, grow after a clean period."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx


def test_unscales_gradients_exactly():
    tx = adaptx.dynamic_loss_scale(init_scale=8.0)
    g = {"w": jnp.array([8.0, -16.0])}
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(u["w"], [1.0, -2.0])
    assert float(adaptx.loss_scale(state)) == 8.0


def test_scale_schedule_matches_the_rule():
    period, factor = 3, 2.0
    tx = adaptx.dynamic_loss_scale(init_scale=64.0, period=period, factor=factor, min_scale=16.0)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    pattern = "ggggbbbbbgggg"  # g: finite step, b: overflow
    scale, good, expected = 64.0, 0, []
    for c in pattern:
        if c == "g":
            good += 1
            if good >= period:
                scale, good = scale * factor, 0
        else:
            scale, good = max(scale / factor, 16.0), 0
        expected.append(scale)
    got = []
    for c in pattern:
        g = {"w": jnp.ones(2) if c == "g" else jnp.array([jnp.inf, 1.0])}
        u, state = jax.jit(tx.update)(g, state)
        got.append(float(adaptx.loss_scale(state)))
        if c == "b":
            np.testing.assert_array_equal(u["w"], 0.0)
    assert got == expected
    assert int(state.nonfinite_skipped) == pattern.count("b")


@jax.numpy_dtype_promotion("standard")  # optax.adam is not strict-clean
def test_wrapped_optimizer_state_is_untouched_on_overflow():
    tx = adaptx.dynamic_loss_scale(init_scale=4.0, inner=optax.adam(1e-2))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    state_ok = tx.update({"w": jnp.ones(3)}, state, params)[1]
    _, state_bad = tx.update({"w": jnp.array([jnp.nan, 1.0, 1.0])}, state_ok, params)
    for a, b in zip(
        jax.tree.leaves(state_ok.inner_state), jax.tree.leaves(state_bad.inner_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert float(state_bad.scale) == 2.0


def test_float16_training_with_the_loss_scale():
    # float32 master weights, float16 compute: a backward pass through float16 whose
    # gradient is ~1e-8 underflows unscaled and survives with the 2**15 loss scale.
    tx = adaptx.dynamic_loss_scale(inner=optax.sgd(1.0))
    params = {"w": jnp.ones(4, jnp.float32)}
    state = tx.init(params)
    tiny = jnp.float16(1e-4)

    def loss(p, s):
        y = (p["w"].astype(jnp.float16) * tiny) * tiny
        return jnp.sum(y.astype(jnp.float32)) * s

    unscaled = jax.grad(loss)(params, jnp.float32(1.0))
    assert float(jnp.max(jnp.abs(unscaled["w"]))) == 0.0  # lost without scaling
    grads = jax.grad(loss)(params, adaptx.loss_scale(state))
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -1e-8, rtol=1e-2)
    assert int(state.nonfinite_skipped) == 0


def test_loss_scale_needs_exactly_one():
    with pytest.raises(ValueError, match="found 0"):
        adaptx.loss_scale(optax.sgd(0.1).init({"w": jnp.ones(1)}))


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"period": 0}, "period"),
        ({"factor": 1.0}, "factor"),
        ({"min_scale": -1.0}, "min_scale"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"dynamic_loss_scale: `{arg}`"):
        adaptx.dynamic_loss_scale(**kwargs)
