"""Property tests on random trees: the invariants hold for any gradients."""

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adaptx

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
magnitudes = st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4])


@st.composite
def gradient_trees(draw, dtype=np.float32):
    n = draw(st.integers(1, 4))
    scale = draw(magnitudes)
    leaves = [
        draw(hnp.arrays(dtype, draw(shapes), elements=st.floats(-1, 1, width=32))) * scale
        for _ in range(n)
    ]
    return {f"p{i}": jnp.asarray(x, dtype) for i, x in enumerate(leaves)}


def np_norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values())))


@SETTINGS
@given(gradient_trees(), st.floats(0.0, 10.0))
def test_clipped_norm_never_exceeds_the_bound(grads, max_norm):
    tx = adaptx.clip_by_global_norm(max_norm)
    updates, state = tx.update(grads, tx.init(grads))
    assert np_norm(updates) <= max_norm * (1 + 1e-5) + 1e-30
    assert 0.0 <= float(state.scale) <= 1.0
    # Squares below float32's smallest normal (norms under ~1e-19) flush to zero.
    np.testing.assert_allclose(float(state.grad_norm), np_norm(grads), rtol=1e-5, atol=1e-18)


@SETTINGS
@given(gradient_trees(), st.floats(1e-3, 10.0))
def test_clipping_preserves_direction(grads, max_norm):
    tx = adaptx.clip_by_global_norm(max_norm)
    updates, state = tx.update(grads, tx.init(grads))
    s = float(state.scale)
    for k in grads:
        np.testing.assert_allclose(updates[k], np.asarray(grads[k]) * s, rtol=1e-6, atol=1e-30)


@SETTINGS
@given(gradient_trees(), st.floats(1e-3, 10.0))
def test_clipping_is_idempotent(grads, max_norm):
    tx = adaptx.clip_by_global_norm(max_norm)
    once, _ = tx.update(grads, tx.init(grads))
    twice, _ = tx.update(once, tx.init(grads))
    for k in grads:
        np.testing.assert_allclose(twice[k], once[k], rtol=1e-5, atol=1e-30)


@SETTINGS
@given(gradient_trees(), st.floats(1e-3, 10.0))
def test_block_rms_bounds_each_block(grads, threshold):
    tx = adaptx.clip_by_block_rms(threshold)
    updates, _ = tx.update(grads, tx.init(grads))
    for x in updates.values():
        rms = float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))
        assert rms <= threshold * (1 + 1e-5)


@SETTINGS
@given(gradient_trees(), st.floats(1e-3, 1.0))
def test_clip_by_value_bounds_elements(grads, max_abs):
    tx = adaptx.clip_by_value(max_abs)
    updates, _ = tx.update(grads, tx.init(grads))
    for x in updates.values():
        assert float(jnp.max(jnp.abs(x))) <= np.float32(max_abs)


@SETTINGS
@given(gradient_trees(np.float32), st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_low_precision_norm_matches_float64(grads, dtype):
    low = {k: (v * 100.0).astype(dtype) for k, v in grads.items()}
    assume(all(bool(jnp.all(jnp.isfinite(x))) for x in low.values()))  # representable leaves
    tx = adaptx.clip_by_global_norm(1.0)
    _, state = tx.update(low, tx.init(low))
    expected = np_norm(low)
    assert np.isfinite(float(state.grad_norm))
    np.testing.assert_allclose(float(state.grad_norm), expected, rtol=1e-5)


@SETTINGS
@given(gradient_trees())
def test_adam_update_is_bounded_per_element(grads):
    # At t = 1, m_hat = g and v_hat = g^2, so every element of the update is at most 1.
    tx = adaptx.scale_by_adam()
    updates, _ = tx.update(grads, tx.init(grads))
    for x in updates.values():
        assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
