"""The learning-rate sweep: Wortsman et al.'s sensitivity, and a tiny sweep end to end."""

from __future__ import annotations

import dataclasses
import math

import compare
import lm
import lr_sweep
import pytest


def test_sensitivity_is_mean_capped_loss_minus_best():
    losses = {1e-3: [2.0, 2.2], 1e-2: [1.0, 1.2], 1e-1: [math.nan, 9.0]}
    s = lr_sweep.sensitivity(losses, init_loss=4.0)
    # capped means: 2.1, 1.1, 4.0 (a NaN run and one above the initial loss count as 4.0)
    assert s["best_lr"] == 1e-2
    assert s["best_loss"] == pytest.approx(1.1)
    assert s["sensitivity"] == pytest.approx((2.1 + 1.1 + 4.0) / 3 - 1.1)


def test_flat_losses_have_zero_sensitivity():
    s = lr_sweep.sensitivity({1e-3: [1.0], 1e-2: [1.0]}, init_loss=3.0)
    assert s["sensitivity"] == 0.0


def test_tiny_lm_sweep_end_to_end(tmp_path):
    tiny = lm.LMConfig(
        d_model=32,
        n_heads=4,
        n_layers=1,
        seq_len=32,
        batch_size=8,
        steps=30,
        warmup_steps=3,
        eval_batches=2,
    )
    data = lm.load_text(tiny)
    names = ["optax adamw", "adaptx.robust_adamw"]
    result = lr_sweep.sweep("lm", [1e-3, 1e-2], [0], names, tiny, data, log=lambda *_: None)
    assert set(result["summary"]) == set(names)
    for s in result["summary"].values():
        assert s["sensitivity"] >= 0.0 and math.isfinite(s["best_loss"])
    stem = lr_sweep.write(result, tmp_path)
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "| `adaptx.robust_adamw` |" in stem.with_suffix(".md").read_text()


def test_compare_lr_sweep_flag_runs_the_lm(tmp_path, monkeypatch):
    small = dataclasses.replace(lm.LMConfig(), d_model=32, n_layers=1, seq_len=32, batch_size=8)
    monkeypatch.setattr(lm, "LMConfig", lambda **kw: dataclasses.replace(small, **kw))
    result = compare.main(
        [
            "--lr-sweep",
            "--model",
            "lm",
            "--lrs",
            "3e-3",
            "--steps",
            "20",
            "--only",
            "adaptx.robust_adamw(loss_z=6)",
            "--out",
            str(tmp_path),
        ]
    )
    assert list(result["summary"]) == ["adaptx.robust_adamw(loss_z=6)"]
    assert (tmp_path / "lr-sweep-lm.json").exists()
