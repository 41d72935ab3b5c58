"""``adaptx.MetricsWriter``: one host transfer per ``every_steps`` steps, a log the report reads.

The writer's contract: ``write`` never reads a value (so it never waits for the device),
the buffer is fetched with one ``jax.device_get`` every ``every_steps`` steps and on
``flush``/``close``/exit, and the lines are the ``metrics.jsonl`` that
``python -m adaptx.report`` reads.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptx
from adaptx import report


class Lazy:
    """A stand-in for a device scalar that counts every time its value is read."""

    reads = 0

    def __init__(self, value, dtype=np.float32):
        self.value = value
        self.dtype = np.dtype(dtype)
        self.shape = ()

    def __array__(self, dtype=None, copy=None):
        Lazy.reads += 1
        return np.asarray(self.value, dtype=self.dtype)


class Recorder:
    """A sink with clu's ``write_scalars`` protocol."""

    def __init__(self):
        self.calls: list[tuple[int, dict]] = []
        self.flushes = 0

    def write_scalars(self, step, scalars):
        self.calls.append((step, dict(scalars)))

    def flush(self):
        self.flushes += 1


@pytest.fixture
def device_gets(monkeypatch):
    """The number of ``jax.device_get`` calls so far, as a one-element list."""
    calls = [0]
    real = jax.device_get

    def counting(tree):
        calls[0] += 1
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    return calls


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_host_transfer_per_every_steps(tmp_path, device_gets):
    log = tmp_path / "metrics.jsonl"
    with adaptx.MetricsWriter(tmp_path, every_steps=10) as writer:
        assert writer.path == log
        for step in range(25):
            writer.write(step, {"loss": jnp.float32(step), "n": jnp.int32(step)})
            assert device_gets[0] == (step + 1) // 10
            assert len(lines(log)) == 10 * device_gets[0]  # written at each fetch, not before
    assert device_gets[0] == 3  # the last 5 steps on exit
    assert [r["step"] for r in lines(log)] == list(range(25))
    assert lines(log)[7] == {"step": 7, "loss": 7.0, "n": 7}


def test_a_flush_copies_one_array_per_dtype_not_one_per_figure(tmp_path, monkeypatch):
    """20 steps of 30 device scalars of three dtypes are fetched as three arrays, and each
    value comes back with its own dtype and value."""
    fetched = []
    real = jax.device_get

    def recording(tree):
        fetched.append(len(jax.tree.leaves(tree)))
        return real(tree)

    monkeypatch.setattr(jax, "device_get", recording)
    with adaptx.MetricsWriter(tmp_path, every_steps=20) as writer:
        for step in range(20):
            figures = {f"f{i}": jnp.float32(step + i / 8) for i in range(10)}
            figures |= {f"n{i}": jnp.int32(2**30 + step + i) for i in range(10)}
            figures |= {f"b{i}": jnp.bool_((step + i) % 2 == 0) for i in range(10)}
            writer.write(step, {**figures, "host": 0.25})
    assert fetched == [3]
    row = lines(tmp_path / "metrics.jsonl")[7]
    assert row["f3"] == 7.375 and row["n9"] == 2**30 + 16 and row["b0"] is False
    assert row["host"] == 0.25 and row["step"] == 7


def test_write_never_reads_a_value(tmp_path, device_gets):
    Lazy.reads = 0
    with adaptx.MetricsWriter(tmp_path, every_steps=4) as writer:
        for step in range(3):
            writer.write(step, {"a": Lazy(1.5), "b": Lazy(2, np.int32)})
        assert Lazy.reads == 0 and device_gets[0] == 0
        writer.write(3, {"a": Lazy(1.5), "b": Lazy(2, np.int32)})
        assert Lazy.reads == 8 and device_gets[0] == 1  # all read inside the one device_get
    assert lines(tmp_path / "metrics.jsonl")[3] == {"step": 3, "a": 1.5, "b": 2}


def test_a_device_step_is_fetched_with_the_figures(tmp_path, device_gets):
    with adaptx.MetricsWriter(tmp_path, every_steps=2) as writer:
        writer.write(jnp.int32(41), {"x": jnp.float32(1.0)})
        writer.write(jnp.int32(42), {"x": jnp.bfloat16(0.5)})
    assert device_gets[0] == 1
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 41, "x": 1.0}, {"step": 42, "x": 0.5}]


def test_the_report_reads_the_log_of_a_guarded_run(tmp_path, capsys):
    tx = adaptx.robust_adamw(1e-2, per_tensor=True)
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    state = tx.init(params)

    @jax.jit
    def step(state, grads):
        _, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        return state, adaptx.telemetry(state, per_tensor=True)

    with adaptx.MetricsWriter(tmp_path / "run", every_steps=8) as writer:
        for t in range(30):
            grads = {"w": jnp.full(3, jnp.nan if t == 20 else 0.1), "b": jnp.full(2, 0.1)}
            state, figures = step(state, grads)
            writer.write(t, {"loss": jnp.float32(1.0), **figures})
    records = report.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(30))
    assert math.isnan(records[20]["guard/grad_norm"])
    assert math.isnan(records[20]["guard/tensor_grad_norm/w"])
    events = report.summarize(records)
    skips = [e for e in events if e.kind.startswith("skip")]
    assert [(e.step, e.kind, e.tensor) for e in skips] == [(20, "skip_nonfinite", "w")]
    assert report.main([str(tmp_path / "run"), "--no-plot"]) == 0
    assert "skipped by guard (non-finite gradients)" in capsys.readouterr().out


def test_non_finite_values_round_trip_as_the_reader_expects(tmp_path):
    values = {"a": math.nan, "b": math.inf, "c": -math.inf}
    with adaptx.MetricsWriter(tmp_path, every_steps=3) as writer:
        writer.write(0, values)
        writer.write(1, {k: jnp.float32(v) for k, v in values.items()})
        writer.write(2, {k: np.float16(v) for k, v in values.items()})
    text = (tmp_path / "metrics.jsonl").read_text()

    def strict(constant):
        raise AssertionError(f"{constant} is not strict JSON")

    for line in text.splitlines():
        assert json.loads(line, parse_constant=strict) == {
            "step": json.loads(line)["step"],
            "a": "nan",
            "b": "inf",
            "c": "-inf",
        }
    for record in report.read_metrics(tmp_path):
        assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def per_tensor_figures(step: int) -> dict:
    norms = {"embed": 1.0, "enc/kernel": 5.0, "enc/bias": 0.1, "head": 3.0, "out": 2.0}
    if step == 1:
        norms["enc/bias"] = math.nan
    figures = {"loss": 0.5, "guard/grad_norm": 6.0, "guard/top_tensor": 1}
    figures.update({f"guard/tensor_grad_norm/{k}": jnp.float32(v) for k, v in norms.items()})
    figures.update({f"scale_by_adam/tensor_update_rms/{k}": -v for k, v in norms.items()})
    return figures


def test_top_k_keeps_the_largest_tensors_of_each_figure(tmp_path):
    with adaptx.MetricsWriter(tmp_path, top_k=2) as writer:
        for step in range(2):
            writer.write(step, per_tensor_figures(step))
    first, second = lines(tmp_path / "metrics.jsonl")
    assert list(first) == [
        "step",
        "loss",
        "guard/grad_norm",
        "guard/top_tensor",
        "guard/tensor_grad_norm/enc/kernel",
        "guard/tensor_grad_norm/head",
        "scale_by_adam/tensor_update_rms/embed",  # the largest of negated norms: -0.1, -1
        "scale_by_adam/tensor_update_rms/enc/bias",
    ]
    # A NaN counts as the largest: it is the tensor a reader looks for.
    assert second["guard/tensor_grad_norm/enc/bias"] == "nan"
    assert [k for k in second if k.startswith("guard/tensor_")] == [
        "guard/tensor_grad_norm/enc/kernel",
        "guard/tensor_grad_norm/enc/bias",
    ]
    records = report.read_metrics(tmp_path)
    assert report.leading_tensor(records[1], {"enc/bias": "guard/tensor_grad_norm/enc/bias"}) == (
        "enc/bias",
        None,
    )


def test_without_top_k_every_tensor_is_kept(tmp_path):
    with adaptx.MetricsWriter(tmp_path) as writer:
        writer.write(0, per_tensor_figures(0))
    assert len(lines(tmp_path / "metrics.jsonl")[0]) == 1 + len(per_tensor_figures(0))


def test_sinks_receive_the_same_host_floats_at_flush_time(tmp_path):
    sink, other = Recorder(), Recorder()
    with adaptx.MetricsWriter(tmp_path, every_steps=2, top_k=1, sinks=[sink, other]) as w:
        w.write(0, {"loss": jnp.float32(0.25), "guard/skipped": jnp.int32(0), "note": "warm"})
        assert sink.calls == []  # nothing before the fetch
        w.write(1, {**per_tensor_figures(1), "loss": jnp.float32(jnp.nan)})
        assert len(sink.calls) == 2 and sink.flushes == 1
        w.write(2, {"loss": jnp.float32(0.5)})
    assert sink.flushes == 2 and repr(other.calls) == repr(sink.calls)
    (s0, first), (s1, second), (s2, third) = sink.calls
    assert (s0, s1, s2) == (0, 1, 2)
    assert first == {"loss": 0.25, "guard/skipped": 0.0}  # no strings
    assert all(type(v) is float for v in first.values())
    assert math.isnan(second["loss"]) and math.isnan(second["guard/tensor_grad_norm/enc/bias"])
    assert [k for k in second if "/tensor_" in k] == [
        "guard/tensor_grad_norm/enc/bias",
        "scale_by_adam/tensor_update_rms/enc/bias",  # NaN, negated or not
    ]
    assert third == {"loss": 0.5}
    logged = lines(tmp_path / "metrics.jsonl")
    assert set(logged[1]) - {"step"} == set(second)


def test_nothing_is_lost_when_the_loop_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with adaptx.MetricsWriter(tmp_path, every_steps=100) as writer:
            for step in range(7):
                writer.write(step, {"loss": jnp.float32(step)})
            raise RuntimeError("boom")
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == list(range(7))
    assert writer.closed
    writer.close()  # a second close does nothing
    with pytest.raises(ValueError, match="closed"):
        writer.write(7, {"loss": 1.0})


def test_flush_and_close_write_what_is_buffered(tmp_path):
    writer = adaptx.MetricsWriter(tmp_path / "log.jsonl", every_steps=50)
    writer.write(0, {"loss": 1.0})
    assert (tmp_path / "log.jsonl").read_text() == ""
    writer.flush()
    assert lines(tmp_path / "log.jsonl") == [{"step": 0, "loss": 1.0}]
    writer.write(1, {"loss": 2.0})
    writer.close()
    assert lines(tmp_path / "log.jsonl") == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0}]


def test_a_resumed_run_appends_to_its_log(tmp_path):
    for start in (0, 3):
        with adaptx.MetricsWriter(tmp_path / "run") as writer:
            for step in range(start, start + 3):
                writer.write(step, {"loss": 1.0})
    assert [r["step"] for r in report.read_metrics(tmp_path / "run")] == list(range(6))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every_steps": 0}, "every_steps=0"),
        ({"every_steps": -5}, "every_steps=-5"),
        ({"every_steps": 2.5}, "every_steps=2.5"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": "3"}, "top_k='3'"),
    ],
)
def test_bad_counts_are_value_errors_naming_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        adaptx.MetricsWriter(tmp_path, **kwargs)
    assert "MetricsWriter" in str(info.value) and "Pass e.g." in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_sink_without_write_scalars_is_a_type_error_naming_it(tmp_path):
    with pytest.raises(TypeError, match=r"sinks\[1\]=.*has no write_scalars"):
        adaptx.MetricsWriter(tmp_path, sinks=(Recorder(), object()))
    with pytest.raises(TypeError, match=r"got one writer.*sinks=\(writer,\)"):
        adaptx.MetricsWriter(tmp_path, sinks=Recorder())


def test_figures_must_be_scalars(tmp_path):
    with adaptx.MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=r"figures\['w'\] has shape \(3,\)"):
            writer.write(0, {"w": jnp.zeros(3)})
        with pytest.raises(TypeError, match=r"figures\['c'\] must be a real number"):
            writer.write(0, {"c": jnp.complex64(1j)})
        with pytest.raises(ValueError, match="'step' key"):
            writer.write(0, {"step": 3})
        writer.write(0, {"note": "a string is written as it is", "ok": True})
    assert lines(tmp_path / "metrics.jsonl") == [
        {"step": 0, "note": "a string is written as it is", "ok": True}
    ]


def test_without_a_path_only_the_sinks_are_written(tmp_path, monkeypatch, device_gets):
    monkeypatch.chdir(tmp_path)
    sink = Recorder()
    with adaptx.MetricsWriter(None, every_steps=2, sinks=(sink,)) as writer:
        for step in range(3):
            writer.write(step, {"loss": jnp.float32(step)})
        assert device_gets[0] == 1 and [s for s, _ in sink.calls] == [0, 1]
    assert [s for s, _ in sink.calls] == [0, 1, 2] and device_gets[0] == 2
    assert writer.closed and writer.path is None
    assert list(tmp_path.iterdir()) == []  # no file anywhere


def test_without_a_path_a_sink_is_required():
    with pytest.raises(ValueError, match=r"path=None .* at least one sink; got sinks=\(\)"):
        adaptx.MetricsWriter(None)
