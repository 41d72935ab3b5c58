"""rewind: a diverging loss sends the run back to its last snapshot, with a backoff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

GRADS = {"w": jnp.ones(3), "b": jnp.full(2, 0.5)}


def run(tx, losses):
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, v: tx.update(GRADS, s, p, value=v))
    out = []
    for loss in losses:
        u, state = step(params, state, jnp.float32(loss))
        params = optax.apply_updates(params, u)
        out.append((params, state))
    return out


def test_healthy_run_is_the_inner_optimizer_exactly():
    losses = 1.0 + 0.01 * np.random.default_rng(0).standard_normal(30)
    ours = run(adaptx.rewind(optax.sgd(0.1), snapshot_every=5), losses)
    plain = run(optax.with_extra_args_support(optax.sgd(0.1)), losses)
    for (p, _), (q, _) in zip(ours, plain, strict=True):
        jax.tree.map(np.testing.assert_array_equal, p, q)
    assert int(ours[-1][1].rewinds) == 0 and float(ours[-1][1].lr_scale) == 1.0


@pytest.mark.parametrize("bad", [50.0, np.nan, np.inf])
def test_divergence_restores_the_snapshot_and_backs_off(bad):
    tx = adaptx.rewind(
        adaptx.adamw(0.1, weight_decay=0.0, max_norm=None), snapshot_every=4, warmup=3
    )
    losses = [1.0] * 10 + [bad] + [1.0]
    out = run(tx, losses)
    snap_params, snap_state = out[7][1].good_params, out[7][1].good_inner
    params, state = out[10]
    jax.tree.map(np.testing.assert_allclose, params, snap_params)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, snap_state)
    assert int(state.rewinds) == 1 and float(state.lr_scale) == 0.5
    # The next healthy step is the inner optimizer's, at half the learning rate.
    assert int(out[11][1].rewinds) == 1


def test_the_snapshot_is_a_consistent_pair_of_params_and_state():
    out = run(
        adaptx.rewind(adaptx.adamw(0.1, weight_decay=0.0, max_norm=None), snapshot_every=3),
        [1.0] * 7,
    )
    # Taken at the start of step 3 (index 2): the params after step 2 and the state after it.
    jax.tree.map(np.testing.assert_array_equal, out[2][1].good_params, out[1][0])
    jax.tree.map(np.testing.assert_array_equal, out[2][1].good_inner, out[1][1].inner_state)


def test_needs_params_and_value():
    tx = adaptx.rewind(optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="rewind"):
        tx.update({"w": jnp.ones(2)}, state, None, value=1.0)
    with pytest.raises(ValueError, match="value=loss"):
        tx.update({"w": jnp.ones(2)}, state, params)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"loss_factor": 1.0}, "loss_factor"),
        ({"backoff": 0.0}, "backoff"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"warmup": 0}, "warmup"),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"rewind: `{name}`"):
        adaptx.rewind(optax.sgd(0.1), **kwargs)
