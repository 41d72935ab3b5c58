"""A clip tells the transforms after it that its output is s * g (adaptx._core.hints)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._core import hints as hints_lib


def tree(dtype=jnp.float32, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "w": (scale * jax.random.normal(k1, (16, 8))).astype(dtype),
        "b": (scale * jax.random.normal(k2, (8,))).astype(dtype),
    }


def run(tx, steps=12, dtype=jnp.float32):
    params = tree(dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        boost = 51.0 if t == 8 else 1.0
        g = jax.tree.map(lambda x, k=boost: x * k, tree(dtype, 0.1 + t))
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def robust_chain():
    return optax.chain(
        adaptx.zclip(warmup_steps=3),
        adaptx.scale_by_adam(update_rms_clip=1.0),
        optax.scale(-1e-2),
    )


def test_lookup_is_by_identity_and_an_entry_dies_with_its_array():
    g, s = jnp.ones(3), jnp.float32(0.5)
    out = g * s
    hints_lib.record(out, g, s)
    assert hints_lib.lookup(out) == (g, s)
    assert hints_lib.lookup(g * s) is None  # equal values, another array
    before = len(hints_lib._SCALED)
    del out
    assert len(hints_lib._SCALED) == before - 1


def test_a_users_chain_compiles_to_the_recipes_program():
    # The hints travel with the arrays, not with the chain: the recipe and the same
    # transforms in a user's optax.chain are one program, so the same numbers, bit for bit
    # (before, the user's chain rounded differently: rtol 2e-2 in bfloat16).
    users = adaptx.guard(
        optax.chain(
            adaptx.clip_spikes(6.0, 4.0, 0.95, max_ratio=10.0, initial_max_norm=1.0),
            adaptx.scale_by_adam(update_rms_clip=5.0),
            optax.add_decayed_weights(1e-4),
            optax.scale_by_learning_rate(1e-3),
        ),
        spike_z=None,
    )
    recipe = adaptx.robust_adamw(1e-3)

    p_users, _ = run(users, dtype=jnp.bfloat16)
    p_recipe, _ = run(recipe, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(p_users), jax.tree.leaves(p_recipe), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hints_change_the_program_not_the_numbers(dtype):
    # The update-RMS clip (which binds at the spike) computed as s^2 mean(g0^2 / v) from
    # the clip's hint equals mean((s g0)^2 / v) to rounding.
    p_hinted, s_hinted = run(robust_chain(), dtype=dtype)
    with hints_lib.disabled():
        p_plain, s_plain = run(robust_chain(), dtype=dtype)
    assert jax.tree.structure(s_hinted) == jax.tree.structure(s_plain)
    assert int(s_plain[1].update_clipped) > 0 or float(s_plain[1].max_update_rms) > 0
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(p_hinted), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol)
    np.testing.assert_allclose(
        float(s_hinted[1].max_update_rms), float(s_plain[1].max_update_rms), rtol=10 * tol
    )


def test_a_transform_in_between_hides_the_hint():
    # Whatever changes the clip's output (here a sign flip) makes it another array: Adam
    # then reduces over what it received, and the numbers follow the changed updates.
    def flipped():
        return optax.chain(
            adaptx.zclip(warmup_steps=3),
            optax.scale(-1.0),
            adaptx.scale_by_adam(update_rms_clip=1e-3),
        )

    hinted = run(flipped())
    with hints_lib.disabled():
        plain = run(flipped())
    for a, b in zip(jax.tree.leaves(hinted), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
