"""adaptx.chain, and every recipe against a user's optax.chain of its documented parts.

A recipe is an ``adaptx.chain`` (fusing a global clip into Adam's pass, honouring the
guard's skip inside each member). A user who writes the same parts in ``optax.chain``
(``bench/recipe_parts.py``) gets the same state structure and the same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from bench.recipe_parts import PARTS

RECIPES = {
    "adamw": adaptx.adamw,
    "adam_atan2": adaptx.adam_atan2,
    "stable_adamw": adaptx.stable_adamw,
    "spam": adaptx.spam,
    "robust_adamw": adaptx.robust_adamw,
    "sgd": adaptx.sgd,
}


def params_and_grads(step):
    k = jax.random.fold_in(jax.random.key(0), step)
    k1, k2, k3 = jax.random.split(k, 3)
    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8), "s": jnp.ones(())}
    scale = 100.0 if step == 7 else 1.0  # one spike, so the clips act
    grads = {
        "w": scale * jax.random.normal(k1, (16, 8)),
        "b": jax.random.normal(k2, (8,)),
        "s": jax.random.normal(k3, ()),
    }
    if step == 9:
        grads["b"] = grads["b"].at[0].set(jnp.nan)  # a step the guard skips
    return params, grads


def run(tx, steps=12):
    params, _ = params_and_grads(0)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    out = []
    for t in range(steps):
        _, grads = params_and_grads(t)
        if t == 9 and not isinstance(state, adaptx.GuardState):
            grads = params_and_grads(8)[1]  # no guard: no NaN
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state, params


@pytest.mark.parametrize("packed", [False, True], ids=["per-leaf", "packed"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_users_optax_chain_of_the_parts_gives_the_recipes_numbers(name, packed):
    kw = {"pack_small_leaves": 65536} if packed and name != "sgd" else {}
    recipe_u, recipe_s, recipe_p = run(RECIPES[name](1e-3, **kw))
    chain_u, chain_s, chain_p = run(PARTS[name](1e-3, **kw))
    assert jax.tree.structure(recipe_s) == jax.tree.structure(chain_s)
    for a, b in zip(jax.tree.leaves(recipe_u), jax.tree.leaves(chain_u), strict=True):
        # equal to the rounding of a reduction's order of additions
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    for a, b in zip(jax.tree.leaves(recipe_p), jax.tree.leaves(chain_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


def test_chain_fuses_a_global_clip_into_adam_without_changing_the_numbers():
    parts = lambda: (  # noqa: E731
        adaptx.clip_spikes(),
        adaptx.scale_by_adam(update_rms_clip=1.0),
        optax.scale(-1e-2),
    )
    fused_u, fused_s, _ = run(adaptx.chain(*parts()))
    plain_u, plain_s, _ = run(optax.chain(*parts()))
    for a, b in zip(jax.tree.leaves(fused_u), jax.tree.leaves(plain_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    assert adaptx.telemetry(fused_s).keys() == adaptx.telemetry(plain_s).keys()


def test_a_users_own_scalar_clip_is_fused_like_adaptxs():
    def half_above_one(updates, count):
        n = optax.tree.norm(updates)
        return jnp.where(n > 1.0, 0.5, 1.0).astype(jnp.float32), count + 1

    def make():
        return adaptx.scalar_clip(lambda p: jnp.zeros([], jnp.int32), half_above_one)

    fused_u, fused_s, _ = run(adaptx.chain(make(), adaptx.scale_by_adam(), optax.scale(-0.1)))
    plain_u, plain_s, _ = run(optax.chain(make(), adaptx.scale_by_adam(), optax.scale(-0.1)))
    for a, b in zip(jax.tree.leaves(fused_u), jax.tree.leaves(plain_u), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(fused_s[0]) == int(plain_s[0]) == 12


def test_chain_refuses_a_state_of_another_length():
    tx = adaptx.chain(adaptx.scale_by_adam(), optax.scale(-1.0))
    state = tx.init(jnp.ones(2))
    with pytest.raises(ValueError, match="the state has 1 members but the chain has 2"):
        tx.update(jnp.ones(2), state[:1])


def test_bad_members_are_refused_naming_them():
    with pytest.raises(TypeError, match="chain: transform 1 is not an optax"):
        adaptx.chain(adaptx.scale_by_adam(), 0.1)
    with pytest.raises(TypeError, match="scalar_clip: `scale` must be a function"):
        adaptx.scalar_clip(lambda p: None, 1.0)
