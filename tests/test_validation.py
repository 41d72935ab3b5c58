"""Bad hyperparameters fail at construction with a ValueError naming argument and value."""

import jax
import jax.numpy as jnp
import optax
import pytest

import adaptx

BAD = [
    (adaptx.clip_by_global_norm, {"max_norm": -1.0}, "max_norm"),
    (adaptx.clip_by_global_norm, {"max_norm": float("nan")}, "max_norm"),
    (adaptx.clip_by_global_norm, {"max_norm": "1.0"}, "max_norm"),
    (adaptx.clip_by_global_norm, {"max_norm": jnp.ones(3)}, "max_norm"),
    (adaptx.clip_by_value, {"max_abs": -0.1}, "max_abs"),
    (adaptx.clip_by_block_rms, {"threshold": 0.0}, "threshold"),
    (adaptx.adaptive_grad_clip, {"clipping": -1.0}, "clipping"),
    (adaptx.adaptive_grad_clip, {"clipping": 0.1, "eps": -1e-3}, "eps"),
    (adaptx.scale_by_adam, {"b1": 1.0}, "b1"),
    (adaptx.scale_by_adam, {"b1": -0.1}, "b1"),
    (adaptx.scale_by_adam, {"b2": 1.5}, "b2"),
    (adaptx.scale_by_adam, {"eps": -1e-8}, "eps"),
    (adaptx.scale_by_adam, {"eps_root": -1.0}, "eps_root"),
    (adaptx.scale_by_adam, {"mu_dtype": jnp.int32}, "mu_dtype"),
    (adaptx.scale_by_adam, {"nu_dtype": "not-a-dtype"}, "nu_dtype"),
    (adaptx.scale_by_rms, {"decay": 1.0}, "decay"),
    (adaptx.scale_by_rms, {"eps": -1.0}, "eps"),
    (adaptx.scale_by_rms, {"initial_scale": -1.0}, "initial_scale"),
    (adaptx.scale_by_adagrad, {"initial_accumulator_value": -0.1}, "initial_accumulator_value"),
    (adaptx.scale_by_adagrad, {"eps": -1.0}, "eps"),
    (adaptx.momentum, {"decay": 1.0}, "decay"),
    (adaptx.momentum, {"decay": 0.9, "dtype": jnp.int8}, "dtype"),
    (adaptx.ema, {"decay": -0.5}, "decay"),
    (adaptx.adamw, {"learning_rate": -1e-3}, "learning_rate"),
    (adaptx.adamw, {"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
    (adaptx.adamw, {"learning_rate": 1e-3, "max_norm": -1.0}, "max_norm"),
    (adaptx.adamw, {"learning_rate": 1e-3, "b1": 1.0}, "b1"),
    (adaptx.sgd, {"learning_rate": -0.1}, "learning_rate"),
    (adaptx.sgd, {"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
    (adaptx.sgd, {"learning_rate": 0.1, "max_norm": -2.0}, "max_norm"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "arg"),
    BAD,
    ids=[f"{f.__name__}-{a}-{i}" for i, (f, _, a) in enumerate(BAD)],
)
def test_bad_hyperparameter_names_argument_and_value(factory, kwargs, arg):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    message = str(info.value)
    assert f"`{arg}`" in message
    assert f"{arg}=" in message  # shows the value given
    assert factory.__name__ in message


# Public functions that build no transform; their bad arguments are tested in their own
# modules (test_check.py, test_adopt.py, test_restore_on_skip.py).
NOT_FACTORIES = {"telemetry", "loss_scale", "check", "adopt_state", "restore_on_skip"}


def test_every_public_factory_is_covered():
    factories = {name for name in adaptx.__all__ if name[0].islower() and name not in NOT_FACTORIES}
    covered = {f.__name__ for f, _, _ in BAD} | set(EXTRA_COVERED)
    assert factories <= covered, f"no bad-input test for {sorted(factories - covered)}"


# Factories whose validation is tested in their own modules.
EXTRA_COVERED = (
    "accumulate",  # tests/test_accumulate.py
    "monitor",  # tests/test_monitor.py
    "scale_by_learning_rate",  # tests/test_learning_rate.py
    "autoclip",
    "chain",  # tests/test_chain.py
    "scalar_clip",  # tests/test_chain.py
    "clip_spikes",
    "rewind",
    "zclip",
    "adagc",
    "guard",
    "dynamic_loss_scale",
    "stable_adamw",
    "spam",
    "robust_adamw",
    "scale_by_adam_atan2",
    "adam_atan2",
)


def test_good_edge_values_are_accepted():
    adaptx.clip_by_global_norm(0.0)
    adaptx.scale_by_adam(b1=0.0, b2=0.0, eps=0.0)
    adaptx.sgd(0.1, momentum=None, max_norm=None)
    adaptx.adamw(0.0, max_norm=None)


def test_traced_hyperparameters_are_not_checked_and_still_work():
    # Under inject_hyperparams the factory is called with arrays (tracers inside jit).
    tx = optax.inject_hyperparams(adaptx.clip_by_global_norm)(max_norm=1.0)
    params = {"w": jnp.array([3.0, 4.0])}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state)
    assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-6)
