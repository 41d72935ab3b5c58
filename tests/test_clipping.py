"""Specification of the clipping transforms beyond optax parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptx


def norm(tree):
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_global_norm_of_low_precision_gradients_is_finite_and_correct(dtype):
    # A true norm of 1e5: its square (1e10) overflows float16 and loses bf16 precision.
    grads = {"a": jnp.full((100,), 1e4, dtype), "b": jnp.full((10, 10), 0.0, dtype)}
    tx = adaptx.clip_by_global_norm(1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    true_norm = norm(grads)  # of the values as stored (1e4 rounds to 9984 in bf16)
    assert true_norm > 9e4
    np.testing.assert_allclose(float(state.grad_norm), true_norm, rtol=1e-6)
    assert updates["a"].dtype == dtype
    np.testing.assert_allclose(norm(updates), 1.0, rtol=1e-2)
    np.testing.assert_allclose(float(state.scale), 1 / true_norm, rtol=1e-6)


def test_clip_keeps_direction_and_bounds_norm():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # norm 13
    tx = adaptx.clip_by_global_norm(2.6)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [[2.4]], rtol=1e-6)
    assert float(state.grad_norm) == pytest.approx(13.0)
    assert float(state.scale) == pytest.approx(0.2)


def test_small_gradients_are_untouched_bit_for_bit():
    grads = {"a": jnp.array([0.1, -0.2, 0.3])}
    tx = adaptx.clip_by_global_norm(1.0)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["a"], grads["a"])
    assert float(state.scale) == 1.0


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_zero_gradients_give_zeros_not_nan(max_norm):
    grads = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
    tx = adaptx.clip_by_global_norm(max_norm)
    updates, state = tx.update(grads, tx.init(grads))
    for x in jax.tree.leaves(updates):
        np.testing.assert_array_equal(x, 0.0)
    assert np.isfinite(float(state.scale))


def test_max_norm_zero_zeroes_every_gradient():
    grads = {"a": jnp.array([1.0, -2.0])}
    tx = adaptx.clip_by_global_norm(0.0)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["a"], 0.0)
    assert float(state.scale) == 0.0


def test_clipping_is_idempotent():
    grads = {"a": jnp.array([30.0, -40.0]), "b": jnp.ones((3, 3))}
    tx = adaptx.clip_by_global_norm(1.5)
    once, _ = tx.update(grads, tx.init(grads))
    twice, state = tx.update(once, tx.init(grads))
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(state.scale) == pytest.approx(1.0, abs=1e-6)


def test_empty_tree_is_a_no_op():
    tx = adaptx.clip_by_global_norm(1.0)
    updates, state = tx.update({}, tx.init({}))
    assert updates == {}
    assert float(state.grad_norm) == 0.0


def test_integer_leaves_are_rejected_with_their_path():
    grads = {"w": jnp.ones(2), "step": jnp.array(3, jnp.int32)}
    tx = adaptx.clip_by_global_norm(1.0)
    with pytest.raises(TypeError, match=r"\['step'\].*int32"):
        tx.update(grads, tx.init(grads))


def test_clip_by_value_bounds_every_element():
    grads = {"a": jnp.linspace(-5.0, 5.0, 11)}
    tx = adaptx.clip_by_value(2.0)
    updates, _ = tx.update(grads, tx.init(grads))
    assert float(jnp.max(jnp.abs(updates["a"]))) == 2.0
    np.testing.assert_array_equal(updates["a"][4:7], grads["a"][4:7])


def test_block_rms_clips_each_block_separately_and_counts():
    grads = {"big": jnp.full((4,), 3.0), "small": jnp.full((4,), 0.1), "mid": jnp.full((2,), 1.0)}
    tx = adaptx.clip_by_block_rms(1.0)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["big"], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["small"], grads["small"])
    np.testing.assert_array_equal(updates["mid"], grads["mid"])
    assert int(state.tensors_clipped) == 1


def test_agc_clips_units_not_tensors():
    # Kernel (in=2, out=2): unit norms are column norms.
    params = {"w": jnp.array([[3.0, 0.1], [4.0, 0.0]])}  # column norms 5 and 0.1
    grads = {"w": jnp.array([[1.0, 1.0], [0.0, 0.0]])}  # column norms 1 and 1
    tx = adaptx.adaptive_grad_clip(0.5, eps=1e-3)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"][:, 0], [1.0, 0.0])  # 1 <= 0.5 * 5: untouched
    np.testing.assert_allclose(updates["w"][:, 1], [0.05, 0.0], rtol=1e-5)  # to 0.5 * 0.1


def test_agc_zero_initialised_units_move_by_eps():
    params = {"b": jnp.zeros((3,))}
    grads = {"b": jnp.array([0.0, 3.0, 4.0])}
    tx = adaptx.adaptive_grad_clip(0.1, eps=1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(norm(updates), 0.1 * 1e-2, rtol=1e-5)


def test_agc_without_params_says_so():
    tx = adaptx.adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match="adaptive_grad_clip.*params"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_agc_unknown_rank_asks_for_axis():
    params = {"w": jnp.ones((2, 2, 2, 2, 2, 2))}
    tx = adaptx.adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match="axis="):
        tx.update(params, tx.init(params), params)
    tx = adaptx.adaptive_grad_clip(0.1, axis=(0, 1))
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates["w"].shape == params["w"].shape


def test_mismatched_state_tree_names_both_structures():
    tx = adaptx.scale_by_adam()
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="different structures"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(1)}, state)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_global_norm_of_many_small_leaves_is_one_reduction_and_correct(dtype):
    # 40 small leaves (reduced as one concatenation), one large leaf (its own reduction),
    # an empty leaf; the float16 values square past float16's range.
    from adaptx._core import tree as tu

    rng = np.random.default_rng(0)
    big = 1e3 if dtype == jnp.float16 else 1.0
    grads = {f"s{i}": jnp.asarray(big * rng.standard_normal(7 + i), dtype) for i in range(40)}
    grads["large"] = jnp.asarray(rng.standard_normal(tu.SMALL_LEAF + 1), dtype)
    grads["empty"] = jnp.zeros((0, 3), dtype)
    assert sum(x.size <= tu.SMALL_LEAF for x in jax.tree.leaves(grads)) >= tu.MANY_SMALL_LEAVES
    np.testing.assert_allclose(float(tu.global_norm(grads)), norm(grads), rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(tu.sum_of_squares)(grads))
    assert jaxpr.count("concatenate") == 1
    assert jaxpr.count("reduce_sum") == 2  # the concatenation and the large leaf
    tx = adaptx.clip_by_global_norm(1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(float(state.grad_norm), norm(grads), rtol=1e-6)
    np.testing.assert_allclose(norm(updates), 1.0, rtol=1e-2)
