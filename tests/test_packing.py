"""pack_small_leaves: the moments of small leaves live in flat buffers, the numbers do not change.

A packed Adam must give the same updates as the per-leaf one on any tree (mixed dtypes,
scalars, big and small leaves, masks, a clip before it), keep one flat buffer per dtype,
skip bit-identically inside ``guard``, compile to about one kernel per small leaf, and
refuse what it cannot do with an error naming the argument.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._core import packing


def mixed_tree():
    k = iter(jax.random.split(jax.random.key(0), 8))
    return {
        "embed": jax.random.normal(next(k), (40, 8)),  # 320 elements: above the limit below
        "layers": [
            {
                "kernel": jax.random.normal(next(k), (8, 8)),
                "bias": jnp.zeros(8),
                "scale": jnp.ones(8, jnp.bfloat16),
            }
            for _ in range(2)
        ],
        "temperature": jnp.asarray(1.0),  # a scalar leaf
        "head": jax.random.normal(next(k), (8, 3)).astype(jnp.bfloat16),
    }


def grads_for(params, step, magnitude=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), step), len(leaves))
    return treedef.unflatten(
        [
            (magnitude * jax.random.normal(key, x.shape)).astype(x.dtype)
            for key, x in zip(keys, leaves, strict=True)
        ]
    )


def run(tx, params, steps=5, magnitude=1.0):
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state, u

    updates = []
    for t in range(steps):
        params, state, u = step(params, state, grads_for(params, t, magnitude))
        updates.append(u)
    return params, state, updates


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": True, "weight_decay": 0.1},
        {"max_norm": 0.5, "mu_dtype": jnp.bfloat16},
        {"mask": lambda p: jax.tree.map(lambda x: x.ndim > 1, p)},
    ],
    ids=["default", "nesterov+decay", "clip+bf16-moments", "decay-mask"],
)
def test_packed_adamw_gives_the_same_updates(kwargs):
    params = mixed_tree()
    plain = run(adaptx.adamw(1e-2, **kwargs), params, magnitude=3.0)
    packed = run(adaptx.adamw(1e-2, pack_small_leaves=64, **kwargs), params, magnitude=3.0)
    for u, v in zip(plain[2], packed[2], strict=True):
        assert_trees_equal(u, v)
    assert_trees_equal(plain[0], packed[0])


@pytest.mark.parametrize("recipe", ["stable_adamw", "robust_adamw"])
def test_packed_update_clipping_is_still_per_tensor(recipe):
    # StableAdamW's RMS is taken per tensor: over each packed leaf's own slices. A large
    # gradient on one small leaf must scale that leaf's step, not its neighbours'.
    params = mixed_tree()
    make = getattr(adaptx, recipe)
    # (robust_adamw without its first-step ceiling: a clipped f16/bf16 step rounds the
    # scaled gradient differently in the packed buffer, and this test is about the RMS.)
    kw = {"update_rms_clip": 1.0} | ({"initial_max_norm": None} if recipe == "robust_adamw" else {})
    plain = make(1e-2, **kw)
    packed = make(1e-2, pack_small_leaves=64, **kw)
    s1, s2 = plain.init(params), packed.init(params)
    update1, update2 = jax.jit(plain.update), jax.jit(packed.update)
    for t in range(6):
        g = grads_for(params, t)
        if t == 4:  # the second moment under-estimates this step on one bias
            g["layers"][1]["bias"] = g["layers"][1]["bias"] * 300.0
        u1, s1 = update1(g, s1, params)
        u2, s2 = update2(g, s2, params)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-6, atol=1e-9
            ),
            u1,
            u2,
        )
    figures1, figures2 = adaptx.telemetry(s1), adaptx.telemetry(s2)
    assert set(figures1) == set(figures2)
    for key, value in figures1.items():
        np.testing.assert_allclose(float(value), float(figures2[key]), rtol=1e-5, err_msg=key)
    assert int(figures2["scale_by_adam/tensors_clipped"]) >= 1


def test_packed_robust_adamw_skips_a_nan_step():
    params = mixed_tree()
    tx = adaptx.robust_adamw(1e-2, pack_small_leaves=64)
    params, state, _ = run(tx, params, steps=3)
    bad = grads_for(params, 7)
    bad["temperature"] = jnp.asarray(jnp.nan)
    u, new_state = jax.jit(tx.update)(bad, state, params)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    old, new = jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state)
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_spam_gives_the_same_updates_and_spike_counts():
    make = lambda **kw: adaptx.scale_by_adam(  # noqa: E731
        b2=0.9, spike_threshold=2.0, spike_start=2, reset_interval=4, reset_warmup=2, **kw
    )
    params = mixed_tree()
    plain, packed = make(), make(pack_small_leaves=64)
    s1, s2 = plain.init(params), packed.init(params)
    total = 0
    for t in range(8):
        g = grads_for(params, t, magnitude=1.0 + 5.0 * (t % 3 == 2))
        u1, s1 = jax.jit(plain.update)(g, s1)
        u2, s2 = jax.jit(packed.update)(g, s2)
        assert_trees_equal(u1, u2)
        assert int(s1.spikes) == int(s2.spikes)
        total += int(s2.spikes)
    assert total > 0  # the rule did fire


def test_state_has_one_flat_buffer_per_dtype_and_a_static_start_per_packed_leaf():
    params = mixed_tree()
    state = adaptx.scale_by_adam(pack_small_leaves=64).init(params)
    mu = state.mu
    assert isinstance(mu, packing.PackedTree)
    # float32: 2 kernels (64) + 2 biases (8) + the scalar; bfloat16: 2 scales (8) + head (24)
    assert sorted((f.dtype.name, f.shape) for f in mu.flats) == [
        ("bfloat16", (2 * 8 + 24,)),
        ("float32", (2 * 64 + 2 * 8 + 1,)),
    ]
    assert [b.shape for b in mu.bigs] == [(40, 8)]  # the embedding (320) stays apart
    # where each leaf sits is static aux data, not arrays in the state
    assert len(mu.layout.starts) == 8
    assert all(isinstance(x, int) for x in mu.layout.starts)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(state.mu))


def test_unpacked_view_equals_the_per_leaf_state():
    params = mixed_tree()
    _, plain, _ = run(adaptx.scale_by_adam(), params)
    _, packed, _ = run(adaptx.scale_by_adam(pack_small_leaves=64), params)
    assert_trees_equal(plain.mu, packed.mu.unpacked(params))
    assert_trees_equal(plain.nu, packed.nu.unpacked(params))


def test_guard_skips_a_bad_step_bit_identically():
    params = mixed_tree()
    tx = adaptx.guard(adaptx.adamw(1e-2, pack_small_leaves=64))
    params, state, _ = run(tx, params, steps=3)
    bad = grads_for(params, 9)
    bad["layers"][0]["bias"] = bad["layers"][0]["bias"].at[3].set(jnp.nan)
    u, new_state = jax.jit(tx.update)(bad, state, params)
    assert int(new_state.skipped) == int(state.skipped) + 1
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    old, new = jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state)
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _compiled(tx, params):
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="HLO checked on XLA:CPU")
def test_about_one_kernel_per_small_leaf_and_no_copy():
    params = {f"b{i:02d}": jnp.zeros(1024) for i in range(64)}
    hlo = _compiled(adaptx.guard(adaptx.adamw(1e-3, pack_small_leaves=4096)), params).as_text()
    entry = hlo[hlo.index("ENTRY") :]

    def array_kernels(text):  # kernels writing an array (not the scalar bookkeeping)
        return [ln for ln in text.splitlines() if re.search(r"= f32\[\d+\]\S* (fusion|copy)\(", ln)]

    per_leaf = _compiled(adaptx.adamw(1e-3), params).as_text()
    # The per-leaf Adam needs three kernels a leaf (m, v, and the parameter); packed, each
    # leaf keeps one (its slice of the flat update, decay and learning rate, applied) and
    # the flat buffers take a few more.
    assert len(array_kernels(entry)) <= 64 + 4
    assert len(array_kernels(per_leaf[per_leaf.index("ENTRY") :])) >= 3 * 64
    assert [ln for ln in entry.splitlines() if "f32[65536]" in ln and " copy(" in ln] == []


def test_fresh_packed_state_can_be_donated():
    state = adaptx.adamw(1e-3, pack_small_leaves=64).init(mixed_tree())
    ids = [id(x) for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))
    jax.jit(lambda s: s, donate_argnums=0)(state)


def test_packing_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="pack_small_leaves=0"):
        adaptx.adamw(1e-3, pack_small_leaves=0)
    with pytest.raises(ValueError, match="pack_small_leaves=2.5"):
        adaptx.scale_by_adam(pack_small_leaves=2.5)
    tx = adaptx.scale_by_adam(pack_small_leaves=64)
    state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(5,\)"):
        tx.update({"a": jnp.zeros(3), "b": jnp.zeros(5)}, state)
    with pytest.raises(ValueError, match=r"different structures(.|\n)*'c'"):
        tx.update({"a": jnp.zeros(3), "c": jnp.zeros(4)}, state)
