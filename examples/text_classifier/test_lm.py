"""Tests for the character language model workload (``lm.py``), on tiny configurations.

Run just these with ``pytest examples/text_classifier/test_lm.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import lm
import numpy as np
import optax
import pytest
from flax import nnx

TINY = lm.LMConfig(
    d_model=32,
    n_heads=4,
    n_layers=1,
    seq_len=32,
    batch_size=8,
    steps=60,
    peak_lr=1e-2,
    warmup_steps=6,
    eval_batches=2,
)


@pytest.fixture(scope="module")
def text() -> lm.LMData:
    return lm.load_text(TINY)


def recording_sgd(seen: list[float], lr: float = 1e-2) -> optax.GradientTransformationExtraArgs:
    """SGD that hands every ``value`` it is called with to ``seen`` (in step order)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, value=None, **extra_args):
        if value is None:
            raise AssertionError("the optimizer was called without value=")
        jax.debug.callback(lambda v: seen.append(float(v)), value, ordered=True)
        return jax.tree.map(lambda g: -lr * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def test_loss_decreases_on_real_text(text):
    result = lm.train_lm(TINY, data=text)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 60
    assert result["init_loss"] == losses[0]
    assert result["init_loss"] > math.log(len(text.vocab)) - 0.5  # about uniform at first
    assert np.mean(losses[-10:]) < result["init_loss"] - 1.0
    assert result["val_loss"] < result["init_loss"] - 1.0
    assert result["params_finite"]
    for key in ("loss", "grad_norm", "update_norm", "params_finite"):
        assert all(math.isfinite(h[key]) for h in result["history"]), key


def test_value_reaches_the_transformation(text):
    seen: list[float] = []
    result = lm.train_lm(dataclasses.replace(TINY, steps=10), recording_sgd(seen), data=text)
    jax.effects_barrier()
    losses = [h["loss"] for h in result["history"]]
    np.testing.assert_allclose(seen, losses, rtol=1e-6)


def test_plain_transformation_gets_wrapped(text):
    sgd = optax.sgd(1e-2)
    plain = optax.GradientTransformation(sgd.init, sgd.update)  # rejects extra arguments
    result = lm.train_lm(dataclasses.replace(TINY, steps=3), plain, data=text)
    assert result["params_finite"]


def test_nan_gradient_poisons_plain_adamw(text):
    def nan_at_10(step: int) -> float:
        return math.nan if step == 10 else 1.0

    lines: list[str] = []
    result = lm.train_lm(TINY, data=text, grad_scale=nan_at_10, log=lines.append)
    assert "not finite" in lines[-1]
    history = result["history"]
    assert len(history) == TINY.steps  # the run went on after the fault
    assert math.isfinite(history[9]["grad_norm"]) and history[9]["params_finite"] == 1.0
    assert math.isnan(history[10]["grad_norm"])
    assert all(h["params_finite"] == 0.0 for h in history[10:])
    assert all(math.isnan(h["loss"]) for h in history[11:])
    assert not result["params_finite"]
    assert math.isnan(result["val_loss"])


def test_repeated_runs_reuse_the_compiled_step(text):
    def cache_sizes() -> tuple[int, int]:
        return lm.train_step._cache_size(), lm.eval_step._cache_size()

    config = dataclasses.replace(TINY, steps=5)
    tx = optax.adamw(1e-3)
    first = lm.train_lm(config, tx, data=text)
    sizes = cache_sizes()
    second = lm.train_lm(config, tx, data=text)
    assert cache_sizes() == sizes
    assert first["history"] == second["history"]  # same seed, same run
    assert first["val_loss"] == second["val_loss"]
    # The default optimizer is one object per config, so it is compiled once too.
    lm.train_lm(TINY, data=text)
    sizes = cache_sizes()
    lm.train_lm(TINY, data=text)
    lm.train_lm(TINY, lm.default_tx(TINY), data=text)
    assert cache_sizes() == sizes


def test_held_out_text_is_disjoint_from_training(text):
    stream = lm.encode(lm.review_stream(TINY.source), text.vocab)
    n_train = len(text.train)
    np.testing.assert_array_equal(stream, np.concatenate([text.train, text.val]))
    assert 0.04 < len(text.val) / len(stream) < 0.06
    newline = text.vocab.index(lm.SEPARATOR)
    assert text.train[-1] == newline  # the split falls between two reviews
    assert set(text.vocab[1:]) == set(lm.decode(text.train, text.vocab))  # train-only vocab
    # Every validation window lies inside the held-out tail.
    windows = lm.eval_windows(TINY, text).reshape(-1, TINY.seq_len + 1)
    tail = np.lib.stride_tricks.sliding_window_view(text.val, TINY.seq_len + 1)
    for w in windows:
        assert np.any(np.all(tail == w, axis=1))
    np.testing.assert_array_equal(windows, lm.eval_windows(TINY, text).reshape(windows.shape))
    assert n_train == len(stream) - len(text.val)


def test_model_is_causal(text):
    model_def, state = nnx.split(lm.build_model(TINY, len(text.vocab)))
    apply = jax.jit(lambda state, ids: nnx.merge(model_def, state)(ids))
    ids = np.array(text.train[None, : TINY.seq_len])
    changed = ids.copy()
    changed[0, 20] = (ids[0, 20] + 1) % len(text.vocab)
    a, b = apply(state, ids), apply(state, changed)
    np.testing.assert_allclose(a[0, :20], b[0, :20], atol=1e-6)
    assert not np.allclose(a[0, 20:], b[0, 20:])


def test_learning_rate_schedule():
    lr = lm.learning_rate(lm.LMConfig(steps=600, peak_lr=3e-3, warmup_steps=60))
    assert float(lr(0)) == pytest.approx(3e-3 / 60, rel=1e-5)
    assert float(lr(60)) == pytest.approx(3e-3, rel=1e-5)
    assert float(lr(600)) == pytest.approx(3e-4, rel=1e-5)
    assert all(float(lr(s + 1)) <= float(lr(s)) for s in range(60, 600, 20))


def test_main_runs_with_flags(capsys):
    argv = "--d-model 32 --n-layers 1 --seq-len 32 --batch-size 8 --peak-lr 1e-2"
    argv += " --warmup-steps 6 --steps 60 --eval-batches 2"
    assert lm.parse_args(argv.split()) == TINY
    result = lm.main(argv.split())
    assert len(result["history"]) == TINY.steps
    assert "val loss" in capsys.readouterr().out
