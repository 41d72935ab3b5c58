"""``adaptx.adopt_state``: a run moves to another optimizer and keeps its moments.

Every matchable moment (``mu``, ``nu``, ``trace``) and its state's ``count`` arrive
bit-identical, so where the new optimizer has the old one's math its next update is the
one the old optimizer would have made; what cannot be matched is named, never dropped
silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx

MOMENT_FIELDS = ("mu", "nu", "trace", "ema", "sum_of_squares")


def params_tree(key=0) -> dict:
    k = jax.random.split(jax.random.key(key), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[2], (3,))},
        "head": jax.random.normal(k[1], (3, 2)),
    }


def grads_tree(t: int, scale: float = 0.1) -> dict:
    return jax.tree.map(lambda x: scale * x, params_tree(100 + t))


@jax.numpy_dtype_promotion("standard")  # optax's own code is not strict-clean
def train(tx, params, steps=5):
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(grads_tree(t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@jax.numpy_dtype_promotion("standard")
def next_update(tx, state, params):
    return tx.update(grads_tree(99), state, params)[0]


def moments(state) -> dict[tuple[str, str], np.ndarray]:
    """``{(field, parameter path): array}`` of every moment in a state, wherever it sits."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [getattr(k, "name", None) for k in path]
        for i, name in enumerate(names):
            if name in MOMENT_FIELDS:
                param = "/".join(str(getattr(k, "key", k)) for k in path[i + 1 :])
                out[(name, param)] = np.asarray(leaf)
    return out


def assert_same_moments(new, old):
    got, want = moments(new), moments(old)
    assert set(got) == set(want) and want
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


# old optimizer, new optimizer, where each keeps its Adam/momentum state (count or None)
CASES = {
    "optax.adamw -> adaptx.adamw": (
        optax.adamw(1e-2, weight_decay=0.1),
        adaptx.adamw(1e-2, weight_decay=0.1, max_norm=None),
        lambda s: s[0].count,
        lambda s: s[1].count,
    ),
    "optax.adam -> adaptx.adamw": (
        optax.adam(1e-2),
        adaptx.adamw(1e-2, weight_decay=0.0, max_norm=None),
        lambda s: s[0].count,
        lambda s: s[1].count,
    ),
    "clip+optax.adamw -> adaptx.adamw": (
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
        adaptx.adamw(1e-3),
        lambda s: s[1][0].count,
        lambda s: s[1].count,
    ),
    "optax.sgd momentum -> adaptx.sgd": (
        optax.sgd(0.1, momentum=0.9),
        adaptx.sgd(0.1, momentum=0.9, max_norm=None),
        lambda s: None,
        lambda s: None,
    ),
    "optax.ema -> adaptx.ema": (
        optax.chain(optax.ema(0.9), optax.scale(-0.1)),
        optax.chain(adaptx.ema(0.9), optax.scale(-0.1)),
        lambda s: s[0].count,
        lambda s: s[0].count,
    ),
    "optax.scale_by_rss -> adaptx.scale_by_adagrad": (
        optax.chain(optax.scale_by_rss(), optax.scale(-0.1)),
        optax.chain(adaptx.scale_by_adagrad(), optax.scale(-0.1)),
        lambda s: None,
        lambda s: None,
    ),
    "optax.adamw -> adaptx.robust_adamw": (
        optax.adamw(1e-3),
        adaptx.robust_adamw(1e-3),
        lambda s: s[0].count,
        lambda s: s.inner_state[1].count,
    ),
    "clip+optax.adamw -> adaptx.robust_adamw": (
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
        adaptx.robust_adamw(1e-3),
        lambda s: s[1][0].count,
        lambda s: s.inner_state[1].count,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_moments_and_count_arrive_bit_identical_and_the_next_update_continues(name):
    old_tx, new_tx, old_count, new_count = CASES[name]
    params, old = train(old_tx, params_tree())
    new = adaptx.adopt_state(old, new_tx, params)
    assert jax.tree.structure(new) == jax.tree.structure(new_tx.init(params))
    assert_same_moments(new, old)
    if old_count(old) is not None:
        assert new_count(new).dtype == jnp.int32 and int(new_count(new)) == 5
    # The gradients' norm stays below 1: neither the clip nor robust_adamw's fresh
    # detector (its first step is clipped to initial_max_norm=1) changes them.
    want, got = next_update(old_tx, old, params), next_update(new_tx, new, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_fresh_state_would_not_continue():
    """The check above has teeth: without the moments the next update differs."""
    old_tx, new_tx, _, _ = CASES["optax.adamw -> adaptx.adamw"]
    params, old = train(old_tx, params_tree())
    want = next_update(old_tx, old, params)
    fresh = next_update(new_tx, new_tx.init(params), params)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(want), strict=True):
        assert not np.allclose(a, b, rtol=1e-3)


def test_everything_else_starts_fresh():
    params, old = train(optax.adamw(1e-3), params_tree())
    new = adaptx.adopt_state(old, adaptx.robust_adamw(1e-3), params)
    fresh = adaptx.robust_adamw(1e-3).init(params)
    for key in ("guard/skipped", "guard/norm_mean", "clip_spikes/count"):
        if key in adaptx.telemetry(fresh):
            assert float(adaptx.telemetry(new)[key]) == float(adaptx.telemetry(fresh)[key])
    assert int(new.count) == 0 and int(new.inner_state[0].count) == 0


def test_every_moment_of_a_nested_state_is_carried():
    def mask(wanted):
        return lambda p: {"dense": {"kernel": wanted, "bias": not wanted}, "head": wanted}

    old_tx = optax.chain(
        optax.masked(optax.scale_by_adam(), mask(True)),
        optax.masked(optax.trace(0.9), mask(False)),
        optax.scale(-1e-2),
    )
    new_tx = adaptx.guard(
        optax.chain(
            adaptx.clip_spikes(),
            optax.masked(adaptx.scale_by_adam(), mask(True)),
            optax.masked(adaptx.momentum(0.9), mask(False)),
            optax.scale(-1e-2),
        )
    )
    params, old = train(old_tx, params_tree())
    new = adaptx.adopt_state(old, new_tx, params)
    assert sorted(moments(old)) == [
        ("mu", "dense/kernel"),
        ("mu", "head"),
        ("nu", "dense/kernel"),
        ("nu", "head"),
        ("trace", "dense/bias"),
    ]
    assert_same_moments(new, old)
    assert int(new.inner_state[1].inner_state.count) == 5


def test_from_a_guarded_adaptx_state_back_to_a_plain_one():
    """An adaptx state is a source too: Adam's moments inside GuardState.inner_state."""
    params, old = train(adaptx.robust_adamw(1e-3), params_tree())
    new = adaptx.adopt_state(old, adaptx.adamw(1e-3, max_norm=None), params)
    assert_same_moments(new, old)
    assert int(new[1].count) == int(old.inner_state[1].count) == 5


def test_schedule_step_counts_are_carried():
    schedule = optax.cosine_decay_schedule(1e-2, 20)
    old_tx = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
    new_tx = adaptx.adamw(schedule, max_norm=None)
    params, old = train(old_tx, params_tree())
    new = adaptx.adopt_state(old, new_tx, params)
    assert int(new[-1].count) == 5  # the schedule's count, from inject_hyperparams'
    want, got = next_update(old_tx, old, params), next_update(new_tx, new, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("old_dtype, new_dtype", [(jnp.bfloat16, None), (None, jnp.bfloat16)])
def test_dtypes_are_the_new_states(old_dtype, new_dtype):
    params, old = train(optax.adam(1e-2, mu_dtype=old_dtype), params_tree())
    new_tx = adaptx.adamw(1e-2, mu_dtype=new_dtype, max_norm=None)
    new = adaptx.adopt_state(old, new_tx, params)
    want_dtype = jnp.bfloat16 if new_dtype else jnp.float32
    for path, mu in moments(new).items():
        if path[0] == "mu":
            assert mu.dtype == want_dtype
            np.testing.assert_array_equal(mu, moments(old)[path].astype(want_dtype))


def test_nothing_matched_names_what_each_side_holds():
    params, old = train(optax.sgd(0.1, momentum=0.9), params_tree())
    with pytest.raises(ValueError) as info:
        adaptx.adopt_state(old, adaptx.adamw(1e-3), params)
    message = str(info.value)
    assert "no moment of old_state fits" in message
    assert "TraceState at 0 (trace: 3 arrays)" in message
    assert "ScaleByAdamState at 1 (count, mu: 3 arrays, nu: 3 arrays)" in message
    other = jax.tree.map(lambda x: jnp.zeros((7,) + x.shape), params)  # other shapes
    _, old = train(optax.adam(1e-2), params_tree())
    with pytest.raises(ValueError, match="no moment of old_state fits"):
        adaptx.adopt_state(old, adaptx.adamw(1e-3), other)
    with pytest.raises(ValueError, match="no mu, nu, trace, ema, sum_of_squares field"):
        adaptx.adopt_state(optax.EmptyState(), adaptx.adamw(1e-3), params)


def test_partly_matched_states_warn_with_what_was_left_and_what_started_fresh():
    params, old = train(optax.adam(1e-2), params_tree())
    grown = {**params, "new": jnp.ones(5)}
    with pytest.warns(UserWarning, match=r"Started fresh in the new state: 1/mu/new \(5,\)"):
        new = adaptx.adopt_state(old, adaptx.adamw(1e-2, max_norm=None), grown)
    assert moments(new)[("mu", "head")].tolist() == moments(old)[("mu", "head")].tolist()
    assert not moments(new)[("mu", "new")].any()
    shrunk = {"dense": params["dense"]}
    with pytest.warns(UserWarning, match=r"Left behind in old_state.*0/mu/head \(3, 2\)"):
        adaptx.adopt_state(old, adaptx.adamw(1e-2, max_norm=None), shrunk)


def test_two_old_moments_for_one_new_one_is_an_error():
    params, old = train(optax.adam(1e-2), params_tree())
    with pytest.raises(ValueError, match="two moments that fit the same new one"):
        adaptx.adopt_state((old, old), adaptx.adamw(1e-2), params)


def test_packed_states_are_refused_naming_pack_small_leaves():
    params, old = train(optax.adam(1e-2), params_tree())
    packed = adaptx.adamw(1e-2, pack_small_leaves=65536)
    with pytest.raises(ValueError, match="pack_small_leaves") as info:
        adaptx.adopt_state(old, packed, params)
    assert "the new state" in str(info.value)
    old_packed = packed.init(params)
    with pytest.raises(ValueError, match="old_state holds Adam moments packed by pack_small"):
        adaptx.adopt_state(old_packed, adaptx.adamw(1e-2), params)


@pytest.mark.parametrize("with_target", [True, False], ids=["restored-as-states", "as-dicts"])
def test_through_an_orbax_checkpoint(tmp_path, with_target):
    ocp = pytest.importorskip("orbax.checkpoint")
    old_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params, old = train(old_tx, params_tree())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt_state", old)
    checkpointer.wait_until_finished()
    if with_target:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, old_tx.init(params))
        restored = checkpointer.restore(tmp_path / "opt_state", target)
    else:
        restored = checkpointer.restore(tmp_path / "opt_state")  # nested dicts and lists
        assert isinstance(restored[1][0], dict)
    new_tx = adaptx.robust_adamw(1e-3)
    new = adaptx.adopt_state(restored, new_tx, params)
    assert_same_moments(new, old)
    assert int(new.inner_state[1].count) == 5
    want, got = next_update(old_tx, old, params), next_update(new_tx, new, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
