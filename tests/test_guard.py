"""guard: bad steps are skipped, counted, and leave parameters and state bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptx
from adaptx._guards.guard import NONFINITE, OK, SPIKE


def params0():
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.zeros(3)}


def grads_at(t, scale=1.0):
    k = jax.random.fold_in(jax.random.key(0), t)
    k1, k2 = jax.random.split(k)
    return {"w": scale * jax.random.normal(k1, (2, 3)), "b": scale * jax.random.normal(k2, (3,))}


def bitwise_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=False)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def train(tx, steps, corrupt=lambda t, g: g, params=None):
    params = params0() if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    history = []
    for t in range(steps):
        before = (params, state)
        params, state = step(params, state, corrupt(t, grads_at(t)))
        history.append((before, (params, state)))
    return params, state, history


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_step_leaves_params_and_inner_state_bit_identical(bad):
    tx = adaptx.guard(adaptx.adamw(1e-2))

    def corrupt(t, g):
        return {**g, "w": g["w"].at[0, 1].set(bad)} if t == 3 else g

    _, state, history = train(tx, 6, corrupt)
    (p_before, s_before), (p_after, s_after) = history[3]
    assert bitwise_equal(p_before, p_after)
    assert bitwise_equal(s_before.inner_state, s_after.inner_state)
    assert int(s_after.last_reason) == NONFINITE
    assert int(state.skipped) == 1 and int(state.consecutive) == 0
    # the steps around it did move the parameters
    (p_b, _), (p_a, _) = history[4]
    assert not bitwise_equal(p_b, p_a)


def test_guarded_run_matches_clean_run_with_bad_steps_removed():
    bad_steps = {2, 5, 6}
    tx = adaptx.guard(adaptx.adamw(1e-2))

    def corrupt(t, g):
        return jax.tree.map(lambda x: x * jnp.nan, g) if t in bad_steps else g

    guarded, state, _ = train(tx, 10, corrupt)
    # The same optimizer, fed only the good gradients, in order.
    clean_tx = adaptx.adamw(1e-2)
    params, clean_state = params0(), clean_tx.init(params0())
    for t in range(10):
        if t in bad_steps:
            continue
        u, clean_state = jax.jit(clean_tx.update)(grads_at(t), clean_state, params)
        params = optax.apply_updates(params, u)
    assert bitwise_equal(guarded, params)
    assert int(state.skipped) == 3
    assert int(state.inner_state[1].count) == 7  # Adam counted only the good steps


def test_spike_skipping_after_warmup():
    tx = adaptx.guard(optax.sgd(0.1), spike_z=4.0, spike_warmup=5)

    def corrupt(t, g):
        return jax.tree.map(lambda x: 1e3 * x, g) if t == 10 else g

    _, state, history = train(tx, 12, corrupt)
    (p10_before, _), (p10_after, s10_after) = history[10]
    assert int(s10_after.last_reason) == SPIKE
    assert bitwise_equal(p10_before, p10_after)
    assert int(state.skipped) == 1


def test_no_spike_is_declared_during_warmup():
    tx = adaptx.guard(optax.sgd(0.1), spike_z=4.0, spike_warmup=5)

    def corrupt(t, g):
        return jax.tree.map(lambda x: 1e3 * x, g) if t == 2 else g

    _, state, history = train(tx, 4, corrupt)
    assert int(history[2][1][1].last_reason) == OK
    assert int(state.skipped) == 0


def test_spike_statistics_follow_a_numpy_reference():
    alpha, warmup = 0.9, 4
    norms = [1.0, 1.2, 0.8, 1.1, 1.0, 0.9, 1.3, 50.0, 1.05]
    tx = adaptx.guard(optax.identity(), spike_z=3.0, spike_alpha=alpha, spike_warmup=warmup)
    state = tx.init(jnp.zeros(1))
    mean = var = 0.0
    seen = []
    for n in norms:
        _, state = tx.update(jnp.array([n]), state)
        z = (n - mean) / (np.sqrt(var) + 1e-6)
        spike = len(seen) >= warmup and z > 3.0
        if not spike:
            seen.append(n)
            if len(seen) <= warmup:
                mean, var = np.mean(seen), np.var(seen)
            else:
                mean = alpha * mean + (1 - alpha) * n
                var = alpha * var + (1 - alpha) * (n - mean) ** 2
        assert int(state.last_reason) == (SPIKE if spike else OK), n
        np.testing.assert_allclose(float(state.norm_mean), mean, rtol=1e-5)
        np.testing.assert_allclose(float(state.norm_var), var, rtol=1e-4, atol=1e-7)
    assert int(state.skipped) == 1


def test_max_consecutive_skips_lets_a_lasting_change_through():
    tx = adaptx.guard(optax.sgd(0.1), spike_z=3.0, spike_warmup=3, max_consecutive_skips=2)

    def corrupt(t, g):  # the gradient scale jumps 100x for good at step 5
        return jax.tree.map(lambda x: 100 * x, g) if t >= 5 else g

    _, state, history = train(tx, 9, corrupt)
    reasons = [int(after[1].last_reason) for _, after in history]
    assert reasons[5:8] == [SPIKE, SPIKE, OK]
    assert int(state.forced) >= 1


def test_nonfinite_steps_are_never_forced_through():
    tx = adaptx.guard(optax.sgd(0.1), max_consecutive_skips=1)
    params, state, _ = train(tx, 5, lambda t, g: jax.tree.map(lambda x: x * jnp.nan, g))
    assert bitwise_equal(params, params0())
    assert int(state.skipped) == 5 and int(state.consecutive) == 5


def test_counters_saturate():
    tx = adaptx.guard(optax.sgd(0.1))
    state = tx.init(params0())
    top = jnp.array(np.iinfo(np.int32).max, jnp.int32)
    state = state._replace(skipped=top, consecutive=top)
    bad = jax.tree.map(lambda x: x * jnp.nan, grads_at(0))
    _, state = tx.update(bad, state, params0())
    assert int(state.skipped) == int(top) and int(state.consecutive) == int(top)


def test_nothing_to_guard_is_an_error():
    with pytest.raises(ValueError, match="skip_nonfinite"):
        adaptx.guard(optax.sgd(0.1), skip_nonfinite=False)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"spike_z": -1.0}, "spike_z"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"spike_alpha": 1.0}, "spike_alpha"),
        ({"spike_warmup": 0}, "spike_warmup"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"guard: `{arg}`.*{arg}="):
        adaptx.guard(optax.sgd(0.1), **kwargs)


def test_inner_must_be_a_transformation():
    with pytest.raises(ValueError, match="`inner`"):
        adaptx.guard(lambda g: g)


def test_long_run_with_random_faults_never_goes_nonfinite():
    rng = np.random.default_rng(0)
    steps = 500
    faulty = set(rng.choice(steps, size=40, replace=False).tolist())
    kinds = {t: rng.choice(["nan", "inf", "neg_inf"]) for t in faulty}
    value = {"nan": jnp.nan, "inf": jnp.inf, "neg_inf": -jnp.inf}
    tx = adaptx.guard(adaptx.adamw(1e-2))
    params = params0()
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    for t in range(steps):
        g = grads_at(t)
        if t in faulty:
            g = {**g, "b": g["b"].at[t % 3].set(value[kinds[t]])}
        new_params, new_state = step(params, state, g)
        if t in faulty:
            assert bitwise_equal(new_params, params), t
        params, state = new_params, new_state
    for leaf in jax.tree.leaves((params, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    assert int(state.skipped) == len(faulty)


# --- the skip decision is handed down to adaptx transforms ------------------------------


def _full_size_copies(tx, n):
    """Copies of a whole state-sized buffer in the compiled, donated step."""
    p, g = jnp.zeros(n), jnp.full(n, 1e-3)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), g).compile().as_text()
    return [ln for ln in hlo.splitlines() if f"f32[{n}]" in ln and " copy(" in ln]


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="HLO checked on XLA:CPU")
@pytest.mark.parametrize(
    "make", [lambda: adaptx.adamw(1e-3), lambda: adaptx.robust_adamw(1e-3)], ids=["adamw", "robust"]
)
def test_guard_adds_no_copy_of_the_moments(make):
    # Selecting the old moments *around* Adam makes XLA copy both moments before its
    # in-place update (two extra full-size buffers); guard hands its decision down so
    # Adam selects inside its own fused update instead.
    n = 1 << 16
    assert _full_size_copies(make(), n) == []
    assert _full_size_copies(adaptx.guard(make()), n) == []


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: tx,
        lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
        lambda tx: optax.masked(tx, {"w": True, "b": False}),
        lambda tx: adaptx.guard(tx),
    ],
    ids=["plain", "MultiSteps", "masked", "guard-in-guard"],
)
@jax.numpy_dtype_promotion("standard")  # optax.MultiSteps mixes int32 and float32
def test_skipped_step_is_bit_identical_through_wrappers(wrap):
    # Adam selects its own moments inside a guard; wrappers between the two must not
    # let a skipped step through.
    tx = adaptx.guard(wrap(adaptx.adamw(1e-2)))

    def corrupt(t, g):
        return jax.tree.map(lambda x: x * jnp.nan, g) if t == 3 else g

    _, _, history = train(tx, 5, corrupt)
    (p_before, s_before), (p_after, s_after) = history[3]
    assert bitwise_equal(p_before, p_after)
    assert bitwise_equal(s_before.inner_state, s_after.inner_state)
    (p_b, _), (p_a, _) = history[4]
    assert not bitwise_equal(p_b, p_a)


INNER = {
    "adamw": lambda: adaptx.adamw(1e-2),
    "adamw-f16-moments": lambda: optax.chain(
        adaptx.scale_by_adam(mu_dtype=jnp.float16, nu_dtype=jnp.float16), optax.scale(-1e-2)
    ),
    "nadam": lambda: optax.chain(adaptx.scale_by_adam(nesterov=True), optax.scale(-1e-2)),
    "spam": lambda: adaptx.spam(1e-2, reset_interval=4, spike_start=1),
    "stable_adamw": lambda: adaptx.stable_adamw(1e-2),
    "sgd-nesterov": lambda: adaptx.sgd(1e-2, nesterov=True),
    "rms": lambda: optax.chain(adaptx.scale_by_rms(), optax.scale(-1e-2)),
    "adagrad": lambda: optax.chain(adaptx.scale_by_adagrad(), optax.scale(-1e-2)),
    "ema": lambda: optax.chain(adaptx.ema(0.9), optax.scale(-1e-2)),
}


@pytest.mark.parametrize("name", sorted(INNER))
def test_every_state_that_selects_itself_is_kept_on_a_skipped_step(name):
    # Each of these selects its own state inside a guard; a skipped step must still
    # leave it bit-identical, and a good step must give the unguarded numbers.
    tx, plain = adaptx.guard(INNER[name]()), INNER[name]()

    def corrupt(t, g):
        return {**g, "b": g["b"].at[1].set(jnp.inf)} if t in (2, 5) else g

    params, state, history = train(tx, 7, corrupt)
    for t in (2, 5):
        (p_before, s_before), (p_after, s_after) = history[t]
        assert bitwise_equal(p_before, p_after), t
        assert bitwise_equal(s_before.inner_state, s_after.inner_state), t
    ref, ref_state = params0(), plain.init(params0())
    for t in range(7):
        if t not in (2, 5):
            u, ref_state = jax.jit(plain.update)(grads_at(t), ref_state, ref)
            ref = optax.apply_updates(ref, u)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
