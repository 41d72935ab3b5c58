"""A packed state's layout is static: whatever is done to its arrays, no leaf moves.

Which leaf sits where in a packed buffer is pytree aux data, so a tree map over the
state (a reset), a cast of its floating leaves, ``jax.eval_shape``/``jax.jit`` of ``init``
and a checkpoint restore into an abstract target all keep every leaf in its place.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

RECIPES = {
    "adamw": lambda: adaptx.adamw(0.1, weight_decay=0.0, max_norm=None, pack_small_leaves=65536),
    "robust_adamw": lambda: adaptx.robust_adamw(0.1, weight_decay=0.0, pack_small_leaves=65536),
    "stable_adamw": lambda: adaptx.stable_adamw(0.1, weight_decay=0.0, pack_small_leaves=65536),
}
PARAMS = {"a": jnp.zeros(4), "b": jnp.zeros(4), "c": jnp.zeros((2, 3))}
# Opposite signs in a and b: a leaf read at another's place gives the opposite update.
GRADS = {
    "a": jnp.array([1.0, -1.0, 1.0, -1.0]),
    "b": jnp.array([-1.0, 1.0, -1.0, 1.0]),
    "c": jnp.arange(6.0).reshape(2, 3) - 2.5,
}


def first_update(tx, state):
    return tx.update(GRADS, state, PARAMS)[0]


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_reset_by_tree_map_keeps_every_leaf_in_place(name):
    tx = RECIPES[name]()
    fresh = tx.init(PARAMS)
    reset = jax.tree.map(jnp.zeros_like, fresh)
    assert_same(first_update(tx, fresh), first_update(tx, reset))
    u = first_update(tx, reset)
    assert float(u["b"][0]) > 0 > float(u["a"][0])  # b's own update, not a's


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_dtype_round_trip_of_the_floating_leaves(name):
    tx = RECIPES[name]()
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)

    def round_trip(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float16).astype(
                x.dtype
            )
        return x

    casted = jax.tree.map(round_trip, state)
    assert jax.tree.structure(casted) == jax.tree.structure(state)
    u1, _ = tx.update(GRADS, state, PARAMS)
    u2, _ = tx.update(GRADS, casted, PARAMS)
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-2, atol=1e-3)
        assert np.all(np.sign(np.asarray(x)) == np.sign(np.asarray(y)))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_init_under_eval_shape_and_jit_gives_the_same_layout(name):
    tx = RECIPES[name]()
    eager = tx.init(PARAMS)
    abstract = jax.eval_shape(tx.init, PARAMS)
    jitted = jax.jit(tx.init)(PARAMS)
    assert jax.tree.structure(abstract) == jax.tree.structure(eager)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    assert_same(first_update(tx, eager), first_update(tx, jitted))


def test_an_orbax_restore_into_an_abstract_target(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = RECIPES["robust_adamw"]()
    state = tx.init(PARAMS)
    for _ in range(3):
        _, state = tx.update(GRADS, state, PARAMS)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
    target = jax.eval_shape(tx.init, PARAMS)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_same(state, restored)
    assert_same(tx.update(GRADS, state, PARAMS)[0], tx.update(GRADS, restored, PARAMS)[0])


def test_the_layout_is_the_same_for_a_sharded_leaf_inside_and_outside_jit():
    # Decided from the abstract sharding, which jit sees as init does outside it.
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    mesh = jax.make_mesh((2,), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    params = {"w": jax.device_put(jnp.zeros(8), sharding), "b": jnp.zeros(3)}
    tx = adaptx.scale_by_adam(pack_small_leaves=65536)
    eager, jitted = tx.init(params), jax.jit(tx.init)(params)
    assert eager.mu.layout == jitted.mu.layout
    assert eager.mu.layout.big == (1,)  # "w", sharded, keeps its own buffer


def test_optax_chain_state_of_the_same_parts_is_interchangeable():
    # The recipe's state and a user's optax.chain of its parts have one structure.
    fused = adaptx.adamw(0.1, pack_small_leaves=65536)
    plain = optax.chain(
        adaptx.clip_by_global_norm(1.0),
        adaptx.scale_by_adam(pack_small_leaves=65536),
        optax.add_decayed_weights(1e-4),
        adaptx.scale_by_learning_rate(0.1),
    )
    assert jax.tree.structure(fused.init(PARAMS)) == jax.tree.structure(plain.init(PARAMS))
