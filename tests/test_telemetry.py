"""adaptx.telemetry finds every measurement wherever the transform is nested."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptx
from adaptx._core import telemetry as telemetry_lib
from adaptx.report import _events as report_events

PARAMS = {"w": jnp.zeros((2,)), "b": jnp.zeros((1,))}
GRADS = {"w": jnp.array([6.0, 8.0]), "b": jnp.array([0.0])}  # norm 10


def one_step(tx, params=PARAMS, grads=GRADS):
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    return state


def test_reports_pre_clip_norm_and_scale():
    figures = adaptx.telemetry(one_step(adaptx.adamw(1e-3, max_norm=2.0)))
    assert list(figures) == [
        "clip_by_global_norm/grad_norm",
        "clip_by_global_norm/scale",
        "scale_by_learning_rate/learning_rate",
    ]
    assert float(figures["clip_by_global_norm/grad_norm"]) == pytest.approx(10.0)
    assert float(figures["clip_by_global_norm/scale"]) == pytest.approx(0.2)
    assert float(figures["scale_by_learning_rate/learning_rate"]) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.chain(optax.identity(), optax.chain(tx, optax.sgd(0.1))),
        lambda tx: optax.masked(tx, {"w": True, "b": True}),
        lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
        lambda tx: optax.inject_hyperparams(adaptx.clip_by_global_norm)(max_norm=2.0),
        lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
        lambda tx: optax.multi_transform({"a": tx, "b": optax.identity()}, {"w": "a", "b": "a"}),
    ],
    ids=[
        "chain",
        "masked",
        "multisteps",
        "inject_hyperparams",
        "apply_if_finite",
        "multi_transform",
    ],
)
@jax.numpy_dtype_promotion("standard")  # optax's wrappers are not strict-clean
def test_found_inside_optax_wrappers(wrap):
    state = one_step(wrap(adaptx.clip_by_global_norm(2.0)))
    figures = adaptx.telemetry(state)
    assert float(figures["clip_by_global_norm/grad_norm"]) == pytest.approx(10.0)


def test_duplicates_are_keyed_by_their_path():
    tx = optax.chain(adaptx.clip_by_global_norm(5.0), adaptx.clip_by_global_norm(1.0))
    figures = adaptx.telemetry(one_step(tx))
    assert float(figures["0/clip_by_global_norm/grad_norm"]) == pytest.approx(10.0)
    assert float(figures["1/clip_by_global_norm/grad_norm"]) == pytest.approx(5.0)
    assert float(figures["1/clip_by_global_norm/scale"]) == pytest.approx(0.2)


@jax.numpy_dtype_promotion("standard")  # optax.adam is not strict-clean
def test_empty_for_states_without_measurements():
    assert adaptx.telemetry(one_step(optax.adam(1e-3))) == {}


def test_inside_jit_returns_scalars_without_host_sync():
    tx = adaptx.adamw(1e-3, max_norm=1.0)

    @jax.jit
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state, adaptx.telemetry(state)

    _, _, figures = step(PARAMS, tx.init(PARAMS), GRADS)
    assert all(isinstance(v, jax.Array) and v.shape == () for v in figures.values())
    assert float(figures["clip_by_global_norm/grad_norm"]) == pytest.approx(10.0)


def test_reads_a_flax_nnx_optimizer():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaptx.adamw(1e-3, max_norm=1e-3), wrt=nnx.Param)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    for source in (optimizer, optimizer.opt_state):
        figures = adaptx.telemetry(source)
        assert float(figures["clip_by_global_norm/grad_norm"]) == pytest.approx(np.sqrt(3.0))
        assert float(figures["clip_by_global_norm/scale"]) == pytest.approx(1e-3 / np.sqrt(3.0))


def test_per_tensor_figures_become_scalars():
    tx = adaptx.clip_by_block_rms(1.0)
    figures = adaptx.telemetry(one_step(tx))
    assert int(figures["clip_by_block_rms/tensors_clipped"]) == 1


def _looks_like_a_counter(field: str) -> bool:
    return field.startswith("num_") or field.endswith(("_clipped", "_skipped"))


def test_every_counter_is_in_the_vocabulary():
    registered = {name: fields for name, fields in telemetry_lib._REGISTRY.values()}
    assert {"adagc", "clip_by_block_rms", "scale_by_adam", "zclip", "guard"} <= set(registered)
    unknown = {
        f"{name}/{field}"
        for name, fields in registered.items()
        for field in fields
        if _looks_like_a_counter(field) and field not in telemetry_lib.COUNTERS
    }
    assert not unknown, f"add these to adaptx._core.telemetry.COUNTERS, or rename them: {unknown}"
    reported = {field for fields in registered.values() for field in fields}
    assert set(telemetry_lib.COUNTERS) <= reported  # no meaning without a figure


def test_each_state_points_at_the_vocabulary_for_its_counters():
    for cls, (name, fields) in telemetry_lib._REGISTRY.items():
        counters = [f for f in fields if f in telemetry_lib.COUNTERS]
        if counters:
            assert "adaptx._core.telemetry.COUNTERS" in " ".join(cls.__doc__.split()), name
            assert all(f"``{f}``" in cls.__doc__ for f in counters), (name, counters)


def test_the_report_reads_counters_of_the_vocabulary_only():
    read = {**report_events.CUMULATIVE, **report_events.PER_STEP, **report_events.FLAGS}
    assert set(read) <= set(telemetry_lib.COUNTERS)
    for name in report_events.CUMULATIVE:
        assert "so far" in telemetry_lib.COUNTERS[name], name
    for name in report_events.PER_STEP:
        assert "at the last step" in telemetry_lib.COUNTERS[name], name
