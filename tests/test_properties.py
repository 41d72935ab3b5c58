"""Property tests on random trees: the invariants hold for any gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    # bf16 shares float32's exponent range: squares of norms under ~1e-19 flush to zero.
    np.testing.assert_allclose(float(state.grad_norm), expected, rtol=1e-5, atol=1e-18)


@SETTINGS
@given(gradient_trees())
def test_adam_update_is_bounded_per_element(grads):
    # At t = 1, m_hat = g and v_hat = g^2, so every element of the update is at most 1.
    tx = adaptx.scale_by_adam()
    updates, _ = tx.update(grads, tx.init(grads))
    for x in updates.values():
        assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6


# ---------------------------------------------------------------------------------------
# guard is idempotent; adaptive clipping scales lie in (0, 1].

GUARD_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
GUARD_INNERS = {
    "adamw": lambda: adaptx.adamw(1e-2),
    "sgd": lambda: adaptx.sgd(1e-2, momentum=0.9),
    "zclip_adam": lambda: optax.chain(adaptx.zclip(warmup_steps=2), adaptx.scale_by_adam()),
}
small_values = st.floats(-1, 1, width=32)


@st.composite
def gradient_sequences(draw, steps=5, faults=False):
    """``steps`` trees of fixed shapes, each scaled by its own magnitude (so that spikes
    occur); with ``faults``, some steps carry a NaN or an infinity."""
    seq = []
    for _ in range(steps):
        scale = draw(st.sampled_from([1e-3, 1.0, 1.0, 1.0, 1e3]))
        w = draw(hnp.arrays(np.float32, (3, 2), elements=small_values)) * np.float32(scale)
        b = draw(hnp.arrays(np.float32, (2,), elements=small_values)) * np.float32(scale)
        if faults:
            bad = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
            if bad is not None:
                w[draw(st.integers(0, 2)), 0] = bad
        seq.append({"w": jnp.asarray(w), "b": jnp.asarray(b)})
    return seq


def bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
    )


def _run_eagerly(tx, grads, params):
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs, state


@GUARD_SETTINGS
@given(st.sampled_from(sorted(GUARD_INNERS)), gradient_sequences())
def test_guard_on_finite_gradients_is_the_inner_transform(inner, grads):
    """Finite gradients are never skipped: updates and inner state are bitwise the inner's."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    plain, plain_state = _run_eagerly(GUARD_INNERS[inner](), grads, params)
    guarded, state = _run_eagerly(adaptx.guard(GUARD_INNERS[inner]()), grads, params)
    assert bitwise_equal(plain, guarded)
    assert bitwise_equal(plain_state, state.inner_state)
    assert int(state.skipped) == 0


@GUARD_SETTINGS
@given(st.sampled_from(sorted(GUARD_INNERS)), gradient_sequences(faults=True), st.booleans())
def test_guard_of_guard_is_guard(inner, grads, spikes):
    """Wrapping twice changes nothing: the same updates, the same innermost state, the
    outer counters equal a single guard's, and the inner guard never sees a bad step."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    kw = {"spike_z": 3.0, "spike_warmup": 2} if spikes else {}
    once, s1 = _run_eagerly(adaptx.guard(GUARD_INNERS[inner](), **kw), grads, params)
    twice, s2 = _run_eagerly(
        adaptx.guard(adaptx.guard(GUARD_INNERS[inner](), **kw), **kw), grads, params
    )
    assert bitwise_equal(once, twice)
    assert bitwise_equal(s1.inner_state, s2.inner_state.inner_state)
    assert bitwise_equal(s1._replace(inner_state=()), s2._replace(inner_state=()))
    assert int(s2.inner_state.skipped) == 0


SCALE_STEPS = 12
scale_norms = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-4, 1e6)), min_size=SCALE_STEPS, max_size=SCALE_STEPS
)
SCALE_DIRECTIONS = np.random.default_rng(0).standard_normal((SCALE_STEPS, 6))


@functools.cache
def _jitted(factory, kwargs):
    tx = factory(**dict(kwargs))
    return tx, jax.jit(tx.update)


def _norm_steps(tx_update, norms):
    tx, update = tx_update
    state = tx.init({"w": jnp.zeros(6)})
    for n, d in zip(norms, SCALE_DIRECTIONS, strict=True):
        g = {"w": jnp.asarray(d / np.linalg.norm(d) * n, jnp.float32)}
        updates, state = update(g, state)
        yield n, g, updates, state


@SETTINGS
@given(
    scale_norms,
    st.sampled_from([(), (("mode", "percentile"),), (("clip_option", "mean"),)]),
)
def test_zclip_scale_is_in_zero_one_for_any_norms(norms, kwargs):
    """For a finite nonzero norm the scale is in (0, 1]: a step is clipped, never zeroed,
    even after a warm-up of all-zero gradients; a zero gradient passes with scale 1."""
    tx_update = _jitted(adaptx.zclip, (("warmup_steps", 3), *kwargs))
    for n, _, updates, state in _norm_steps(tx_update, norms):
        scale = float(state.scale)
        if n == 0.0:
            assert scale == 1.0 and float(jnp.max(jnp.abs(updates["w"]))) == 0.0
        else:
            assert 0.0 < scale <= 1.0, (n, scale)
            assert float(jnp.max(jnp.abs(updates["w"]))) > 0.0


@SETTINGS
@given(scale_norms, st.sampled_from([10.0, 50.0, 90.0]))
def test_autoclip_scale_is_in_zero_one_and_zero_only_after_a_zero_norm(norms, percentile):
    """The scale is in [0, 1]; it is 0 only when a zero norm (an all-zero gradient, which
    AutoClip records, as the reference code does) lies in the window, else in (0, 1]."""
    tx_update = _jitted(adaptx.autoclip, (("percentile", percentile), ("history", 8)))
    for n, _, _, state in _norm_steps(tx_update, norms):
        scale = float(state.scale)
        window = np.asarray(state.norms)[: int(state.filled)]
        assert 0.0 <= scale <= 1.0
        if n > 0 and window.min() > 0:
            assert scale > 0.0, (n, scale, window)
