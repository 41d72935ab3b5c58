"""Train a Flax NNX text classifier on movie reviews with an adaptx optimizer.

    python examples/text_classifier/train.py                   # Rotten Tomatoes sentences
    python examples/text_classifier/train.py --dataset imdb    # 25,000 IMDB reviews
    python examples/text_classifier/train.py --data my.csv     # your CSV/JSONL (text, label)
    python examples/text_classifier/train.py --help

Writes to ``runs/text_classifier/<name>/``: ``metrics.jsonl`` (one line per step with loss,
accuracy, gradient norm and the optimizer's ``adaptx.telemetry`` figures, plus one line per
epoch with validation results), ``checkpoint/`` (orbax, best-validation parameters),
``encoder.json`` (vocabularies), ``config.json``, ``results.json``, ``training.png`` and
``stability.png`` (``python -m adaptx.report``: norms, thresholds and every intervention).

``--distributed`` runs one copy of this script per process (host), data parallel over the
devices of all of them; see "Several hosts" in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Make the sibling modules importable however this file is run (script, -m, pytest).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as data_lib  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from model import BagOfEmbeddings, TextClassifier  # noqa: E402

import adaptx  # noqa: E402
from adaptx.report import plot as plot_stability  # noqa: E402


@dataclasses.dataclass
class Config:
    """Every field is also a command-line flag (``--max-len 64``)."""

    dataset: str = "rotten_tomatoes"  # rotten_tomatoes | imdb
    data: str | None = None  # path to your own CSV/JSONL with text and label columns
    limit: int | None = None  # use a random subset of this many examples (quick runs)
    max_len: int = 48  # tokens per example (truncate / pad)
    vocab_size: int = 30_000
    min_count: int = 2  # words seen fewer times in the training split are unknown
    bigrams: int = 100_000  # > 0: also embed word bigrams (vocabulary of at most this many)
    encoder: str = "lstm"  # lstm | transformer | rnn
    embed_dim: int = 64
    hidden_dim: int = 64
    layers: int = 1  # transformer only
    embed_dropout: float = 0.5
    word_dropout: float = 0.0
    dropout: float = 0.5
    recurrent_scale: float = 1.0  # rnn only: recurrent matrix = orthogonal * scale
    embed_init_std: float = 0.1
    # Rotten Tomatoes only: initialise the embeddings from a bag-of-embeddings sentiment model
    # fitted for this many epochs on the package's IMDB reviews (0: train from scratch).
    pretrain_epochs: int = 2
    pretrain_len: int = 256  # IMDB tokens per review used for that
    optimizer: str = "adamw"  # adamw | robust_adamw | sgd (the adaptx recipes)
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    decay_embeddings: bool = False
    max_norm: float = 1.0
    batch_size: int = 64
    buckets: int = 3  # batch examples of similar length; compile this many sequence lengths
    epochs: int = 6
    ema: float = 0.99  # > 0: evaluate and save an exponential moving average of the weights
    patience: int = 2  # early stopping: epochs without validation improvement
    seed: int = 0
    split_seed: int = 0  # fixed train/val/test split, independent of --seed
    out: str = "runs/text_classifier"
    name: str | None = None  # run folder name (default: dataset-encoder-seedN)
    plot: bool = True
    checkpoint: bool = True
    progress: bool = True
    # Several processes (hosts): jax.distributed.initialize(); settings left unset are
    # auto-detected (Slurm, Open MPI, Cloud TPU, ...; see the README, "Several hosts").
    distributed: bool = False
    coordinator: str | None = None  # HOST:PORT of process 0, reachable from every process
    num_processes: int | None = None
    process_id: int | None = None  # 0 .. num_processes - 1; process 0 writes the files

    @property
    def run_dir(self) -> Path:
        src = Path(self.data).stem if self.data else self.dataset
        return Path(self.out) / (self.name or f"{src}-{self.encoder}-seed{self.seed}")


def parse_args(argv=None, defaults: Config | None = None) -> Config:
    defaults = defaults or Config()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=value, metavar=f.name.upper())
    return Config(**vars(parser.parse_args(argv)))


# --------------------------------------------------------------------------------------
# Model, optimizer, sharding


def build_model(
    config: Config, vocab_size: int, num_classes: int, bigram_vocab_size: int = 0
) -> TextClassifier:
    return TextClassifier(
        vocab_size,
        num_classes,
        encoder=config.encoder,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        max_len=config.max_len,
        layers=config.layers,
        embed_dropout=config.embed_dropout,
        dropout=config.dropout,
        word_dropout=config.word_dropout,
        embed_init_std=config.embed_init_std,
        recurrent_scale=config.recurrent_scale,
        bigram_vocab_size=bigram_vocab_size,
        rngs=nnx.Rngs(config.seed),
    )


def load_data(config: Config) -> data_lib.TextData:
    """The dataset ``config`` names, split and encoded as its fields say."""
    return data_lib.load(
        config.dataset,
        config.data,
        max_len=config.max_len,
        vocab_size=config.vocab_size,
        min_count=config.min_count,
        split_seed=config.split_seed,
        limit=config.limit,
        bigrams=config.bigrams,
    )


def learning_rate(config: Config, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to 10% over the planned number of steps."""
    warmup = min(config.warmup_steps, total_steps // 2)
    if warmup == 0:
        return optax.cosine_decay_schedule(config.lr, max(total_steps, 1), alpha=0.1)
    # Warm-up starts at lr / warmup, not 0, so that no step is a zero update.
    return optax.warmup_cosine_decay_schedule(
        config.lr / warmup, config.lr, warmup, max(total_steps, 2), end_value=0.1 * config.lr
    )


def decay_mask(params, embeddings: bool = False):
    """Weight decay on matrices only (not biases or layer norms; embeddings optionally)."""
    return jax.tree.map_with_path(
        lambda path, p: p.ndim >= 2 and (embeddings or "embed" not in jax.tree_util.keystr(path)),
        params,
    )


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate(config, total_steps)
    mask = functools.partial(decay_mask, embeddings=config.decay_embeddings)
    if config.optimizer == "adamw":
        return adaptx.adamw(
            lr, weight_decay=config.weight_decay, max_norm=config.max_norm, mask=mask
        )
    if config.optimizer == "robust_adamw":
        return adaptx.robust_adamw(lr, weight_decay=config.weight_decay, mask=mask)
    if config.optimizer == "sgd":
        return adaptx.sgd(lr, momentum=0.9, max_norm=config.max_norm)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def bucket_lengths(max_len: int, n: int) -> list[int]:
    """``n`` sequence lengths up to ``max_len``, multiples of 8 where possible.

    >>> bucket_lengths(48, 3)
    [16, 32, 48]
    """
    if n <= 1:
        return [max_len]
    cuts = {min(max_len, 8 * math.ceil(max_len * (i + 1) / n / 8)) for i in range(n - 1)}
    return sorted(cuts | {max_len})


def init_distributed(config: Config) -> None:
    """With ``--distributed``, joins the other processes; must run before JAX uses a device.

    Does nothing without ``--distributed`` or when already initialized. Unset
    ``--coordinator`` / ``--num-processes`` / ``--process-id`` are left to
    ``jax.distributed.initialize`` to detect.
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    # Collectives between CPU processes need an implementation (Gloo; the default in recent
    # jax, but not in older ones). Only the CPU backend reads this option; a choice the user
    # made (e.g. "mpi") is kept.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def data_parallel(batch_size: int, name: str = "--batch-size"):
    """Shardings for data parallelism over all devices of all processes (a no-op with one).

    Returns ``(replicated, sharded)``: for the state, and for batches split along their
    first axis. ``batch_size`` is the global batch, summed over every device of every process.
    """
    devices = jax.devices()
    if batch_size % len(devices):
        raise ValueError(
            f"{name} {batch_size} (the global batch) must be a multiple of the number of "
            f"devices, {len(devices)} ({jax.process_count()} process(es))"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def shard_batch(arrays: tuple[np.ndarray, ...], sharding: NamedSharding) -> tuple:
    """A global batch (the same NumPy arrays in every process) as device arrays split over
    all devices; each process transfers only the rows its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    rows = _process_rows(sharding, len(arrays[0]))
    return tuple(jax.make_array_from_process_local_data(sharding, a[rows], a.shape) for a in arrays)


def _process_rows(sharding: NamedSharding, n: int) -> np.ndarray:
    """Indices of the rows of an ``n``-row batch that this process's devices hold, in the
    order ``jax.make_array_from_process_local_data`` expects them."""
    slices = {idx[0].indices(n) for idx in sharding.addressable_devices_indices_map((n,)).values()}
    return np.concatenate([np.arange(*s) for s in sorted(slices)])


def replicate(tree, sharding: NamedSharding):
    """Host (or single-device) values, the same in every process, copied to every device."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        # device_put onto devices of other processes takes NumPy (and checks that every
        # process passed the same value); random keys go as their raw data.
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def to_host(tree):
    """Device values as local values, in every process (a gather where not replicated)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                get(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(get, tree)


# --------------------------------------------------------------------------------------
# Steps


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _loss(model, tokens, labels, weights, deterministic):
    logits = model(tokens, deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    denom = jnp.maximum(weights.sum(), 1.0)
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    return (losses * weights).sum() / denom, (correct * weights).sum() / denom


# The steps take the static graph definitions first, so compilations are reused by every
# run whose model and optimizer have the same structure (compare.py, the tests).


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
def train_step(
    model_def, opt_def, model_state, opt_state, ema, tokens, labels, weights, grad_scale, ema_decay
):
    """One optimizer step on a batch; donates (reuses the memory of) the incoming state.

    ``grad_scale`` multiplies the gradients before the optimizer sees them: 1.0 in normal
    training, a large number or NaN for scripted fault injection (``compare.py``). ``ema``
    (parameters only, or None) is moved towards the new parameters by ``1 - ema_decay``.
    """
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(opt_def, opt_state)
    (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(
        model, tokens, labels, weights, False
    )
    grads = jax.tree.map(lambda g: g * grad_scale.astype(g.dtype), grads)
    # The loss goes to the optimizer too (optax's extra-args convention), so that a guard
    # can skip a step whose loss is non-finite or an outlier.
    updates = optimizer.update(model, grads, value=loss)
    params = nnx.state(model, nnx.Param)
    if ema is not None:
        ema = jax.tree.map(lambda e, p: e + (1 - ema_decay) * (p - e), ema, params)
    metrics = {
        "loss": loss,
        "accuracy": acc,
        "grad_norm": global_norm(grads),  # what the optimizer received, before clipping
        "update_norm": global_norm(updates),
        "params_finite": all_finite(params),
        **adaptx.telemetry(optimizer),
    }
    return nnx.state(model), nnx.state(optimizer), ema, metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model_def, model_state, ema, tokens, labels, weights):
    model = nnx.merge(model_def, model_state)
    if ema is not None:
        nnx.update(model, ema)
    loss, acc = _loss(model, tokens, labels, weights, True)
    n = weights.sum()
    return {"loss_sum": loss * n, "correct": acc * n, "count": n}


def evaluate(model_def, model_state, ema, split: data_lib.Split, batch_size: int, shard) -> dict:
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data_lib.batches(split, batch_size):
        out = eval_step(model_def, model_state, ema, *shard_batch(batch, shard))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n}


def pretrain(
    model: TextClassifier,
    dataset: data_lib.TextData,
    config: Config,
    log: Callable[[str], None] = print,
) -> dict:
    """Fits :class:`BagOfEmbeddings` on IMDB sentiment and copies its embeddings into ``model``.

    Transfer from a second, larger labelled source of movie reviews: rare Rotten Tomatoes
    words get embeddings that already carry sentiment. The Rotten Tomatoes validation and test
    splits are not touched, and the vocabulary stays the Rotten Tomatoes training split's.
    """
    t0 = time.perf_counter()
    corpus = data_lib.pretraining_corpus(dataset.encoder, config.pretrain_len)
    bag = BagOfEmbeddings(
        len(dataset.encoder.vocab),
        2,
        embed_dim=config.embed_dim,
        bigram_vocab_size=_bigram_size(dataset.encoder),
        embed_init_std=config.embed_init_std,
        rngs=nnx.Rngs(config.seed),
    )
    optimizer = nnx.Optimizer(bag, adaptx.adamw(1e-2, weight_decay=0.0), wrt=nnx.Param)
    graphdef, state = nnx.split((bag, optimizer))
    batch_size = 128
    replicated, sharded = data_parallel(batch_size, "the pretraining batch size")
    state = replicate(state, replicated)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, tokens, labels):
        bag, optimizer = nnx.merge(graphdef, state)

        def loss_fn(bag):
            logits = bag(tokens)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits.argmax(-1) == labels).mean()

        (_, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(bag)
        optimizer.update(bag, grads)
        return nnx.state((bag, optimizer)), acc

    rng = np.random.default_rng(config.seed)
    accs = []
    for _ in range(config.pretrain_epochs):
        for tokens, labels, _ in data_lib.batches(corpus, batch_size, rng, drop_last=True):
            state, acc = step(state, *shard_batch((tokens, labels), sharded))
            accs.append(acc)
    bag, _ = nnx.merge(graphdef, to_host(state))
    model.embed.embedding[...] = bag.embed.embedding[...]
    if model.bigram_embed is not None:
        model.bigram_embed.embedding[...] = bag.bigram_embed.embedding[...]
    last = float(np.mean(jax.device_get(accs[-len(accs) // max(config.pretrain_epochs, 1) :])))
    info = {
        "pretrain_reviews": len(corpus),
        "pretrain_train_accuracy": last,
        "pretrain_seconds": time.perf_counter() - t0,
    }
    log(
        f"pretrained embeddings on {len(corpus)} IMDB reviews: training accuracy {last:.3f} "
        f"in the last epoch ({info['pretrain_seconds']:.0f}s)"
    )
    return info


# --------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model: nnx.Module) -> None:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(model, nnx.Param), force=True)


def load_checkpoint(run_dir: str | Path) -> tuple[TextClassifier, data_lib.Encoder, dict]:
    """Rebuilds a trained model from its run folder: ``model, encoder, info``.

    ``info`` holds the run's ``config`` and ``class_names``. Use with :func:`predict`.
    """
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir).absolute()
    config = Config(**json.loads((run_dir / "config.json").read_text()))
    enc_info = json.loads((run_dir / "encoder.json").read_text())
    encoder = data_lib.Encoder.from_json(enc_info)
    build = functools.partial(
        build_model, config, len(encoder.vocab), len(enc_info["class_names"]), _bigram_size(encoder)
    )
    model_def, abstract, abstract_rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(run_dir / "checkpoint", abstract)
    # Only parameters are saved; the dropout RNG state (unused at inference) is filled in.
    rest = jax.tree.map(_placeholder, abstract_rest)
    model = nnx.merge(model_def, restored, rest)
    return model, encoder, {"config": config, "class_names": enc_info["class_names"]}


def predict(model: TextClassifier, encoder: data_lib.Encoder, texts: list[str]) -> np.ndarray:
    """Class probabilities [len(texts), num_classes] for raw texts."""
    model_def, model_state = nnx.split(model)
    return np.asarray(_predict(model_def, model_state, encoder(texts)))


@functools.partial(jax.jit, static_argnums=0)
def _predict(model_def, model_state, tokens):
    model = nnx.merge(model_def, model_state)
    return jax.nn.softmax(model(tokens, deterministic=True))


def _placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)


def _bigram_size(encoder: data_lib.Encoder) -> int:
    return len(encoder.bigram_vocab) if encoder.bigram_vocab is not None else 0


# --------------------------------------------------------------------------------------
# Training loop


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # disable=None turns the bar off when stderr is not a terminal (CI logs get the
    # one-line-per-epoch summaries instead).
    return tqdm(
        total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True, leave=False
    )


def _scalars(d: dict) -> dict:
    return {k: np.asarray(v).item() for k, v in d.items()}


def _json_line(d: dict) -> str:
    # Strict JSON has no NaN/Infinity: write those as the strings "nan", "inf", "-inf".
    return json.dumps(
        {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in d.items()}
    )


@functools.lru_cache(maxsize=64)
def _accepting_value(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx``, taking ``value=loss`` even if it does not use it (one wrapper per ``tx``, so
    that repeated runs with the same ``tx`` reuse the compiled train step)."""
    return optax.with_extra_args_support(tx)


def train(
    config: Config,
    *,
    dataset: data_lib.TextData | None = None,
    tx: optax.GradientTransformation | None = None,
    max_steps: int | None = None,
    grad_scale: Callable[[int], float] | None = None,
    early_stopping: bool = True,
    log: Callable[[str], None] = print,
    write_files: bool = True,
    validate: bool = True,
) -> dict:
    """Trains one model; returns a results dict (test accuracy, per-step history, ...).

    ``tx`` replaces the configured adaptx recipe, ``max_steps`` stops after that many
    steps, ``grad_scale(step)`` injects faults, ``validate=False`` skips the per-epoch
    validation (and so early stopping); these are used by ``compare.py``.
    """
    t_start = time.perf_counter()
    init_distributed(config)  # before anything below touches a device
    # Every process runs all of this on the same data, split, vocabulary and shuffles (all
    # seeded), and feeds its own devices their rows of each global batch; only process 0
    # prints and writes files (the checkpoint is written by all, as orbax requires).
    main_process = jax.process_index() == 0
    if not main_process:
        log = lambda *_: None  # noqa: E731
    if dataset is None:
        dataset = load_data(config)
    n_dev = jax.device_count()
    batch_size = config.batch_size
    replicated, sharded = data_parallel(batch_size)  # checks batch_size % n_dev
    steps_per_epoch = max(len(dataset.train) // batch_size, 1)
    total_steps = steps_per_epoch * config.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    buckets = bucket_lengths(config.max_len, config.buckets)

    model = build_model(
        config, len(dataset.encoder.vocab), dataset.num_classes, _bigram_size(dataset.encoder)
    )
    pretrain_info = {}
    if config.pretrain_epochs > 0 and dataset.source == "rotten_tomatoes":
        pretrain_info = pretrain(model, dataset, config, log)
    tx = tx if tx is not None else make_optimizer(config, total_steps)
    tx = _accepting_value(tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # Functional state for the jitted steps; replicated over the devices, batches sharded.
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    ema = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)) if config.ema > 0 else None
    # (copies: a buffer must not appear twice among the donated arguments)
    model_state, opt_state, ema = jax.tree.map(
        jnp.copy, replicate((model_state, opt_state, ema), replicated)
    )

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(
        f"{dataset.source}: {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test, vocabulary {len(dataset.encoder.vocab)} (train split only); "
        f"{config.encoder} model, {n_params:,} parameters; "
        f"{n_dev} {jax.default_backend()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", batch {batch_size}"
    )

    run_dir = config.run_dir
    metrics_file = None
    if write_files and main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        (run_dir / "encoder.json").write_text(
            json.dumps({**dataset.encoder.to_json(), "class_names": dataset.class_names})
        )
        metrics_file = open(run_dir / "metrics.jsonl", "w")  # noqa: SIM115

    history: list[dict] = []
    epochs_log: list[dict] = []
    pending: list[tuple[int, dict]] = []
    best = {"accuracy": -1.0, "epoch": 0, "state": None}
    rng = np.random.default_rng(config.seed)
    step = 0
    bar = _progress(total_steps, config.progress and main_process, "train")
    say = bar.write if not bar.disable else log  # keeps the bar intact on a terminal

    def flush():
        rows = jax.device_get([m for _, m in pending])
        for (s, _), row in zip(pending, rows, strict=True):
            row = {"step": s, **_scalars(row)}
            history.append(row)
            if metrics_file:
                metrics_file.write(_json_line(row) + "\n")
        if pending:
            bar.update(len(pending))
            last = history[-1]
            bar.set_postfix(
                loss=f"{last['loss']:.3f}",
                acc=f"{last['accuracy']:.3f}",
                gnorm=f"{last['grad_norm']:.2f}",
            )
        pending.clear()

    try:
        for epoch in range(1, epochs + 1):
            t_epoch = time.perf_counter()
            for tokens, labels, weights in data_lib.batches(
                dataset.train, batch_size, rng, drop_last=True, buckets=buckets
            ):
                if step >= total_steps:
                    break
                scale = np.float32(grad_scale(step) if grad_scale else 1.0)
                tokens, labels, weights = shard_batch((tokens, labels, weights), sharded)
                # Warm-up of the average: 1/2, 2/3, ... until it reaches config.ema.
                decay = np.float32(min(config.ema, (1 + step) / (2 + step)))
                model_state, opt_state, ema, metrics = train_step(
                    model_def,
                    opt_def,
                    model_state,
                    opt_state,
                    ema,
                    tokens,
                    labels,
                    weights,
                    scale,
                    decay,
                )
                pending.append((step, metrics))
                step += 1
                if len(pending) >= 10:
                    flush()
            flush()
            if not validate:
                continue
            val = evaluate(model_def, model_state, ema, dataset.val, batch_size, sharded)
            recent = history[-steps_per_epoch:]
            row = {
                "epoch": epoch,
                "step": step,
                "train_loss": float(np.mean([r["loss"] for r in recent])),
                "train_accuracy": float(np.mean([r["accuracy"] for r in recent])),
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "seconds": time.perf_counter() - t_epoch,
            }
            epochs_log.append(row)
            if metrics_file:
                metrics_file.write(_json_line(row) + "\n")
                metrics_file.flush()
            improved = val["accuracy"] > best["accuracy"]
            say(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_accuracy']:.3f} | val loss {val['loss']:.4f} acc "
                f"{val['accuracy']:.3f}{' (best)' if improved else ''} [{row['seconds']:.0f}s]"
            )
            if improved:
                # (on the host with one process; with several, a copy on the devices)
                snapshot = (
                    jax.device_get((model_state, ema))
                    if jax.process_count() == 1
                    else jax.tree.map(jnp.copy, (model_state, ema))
                )
                best.update(accuracy=val["accuracy"], epoch=epoch, state=snapshot)
            elif early_stopping and epoch - best["epoch"] >= config.patience:
                say(f"early stopping: no validation improvement for {config.patience} epochs")
                break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    params_finite = bool(all_finite(nnx.state(nnx.merge(model_def, model_state), nnx.Param)))
    if early_stopping and best["state"] is not None:
        model_state, ema = (
            jax.device_put(best["state"], replicated) if jax.process_count() == 1 else best["state"]
        )
    test = evaluate(model_def, model_state, ema, dataset.test, batch_size, sharded)
    val = evaluate(model_def, model_state, ema, dataset.val, batch_size, sharded)
    model = nnx.merge(model_def, to_host(model_state))
    if ema is not None:
        nnx.update(model, to_host(ema))
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val["accuracy"],
        "best_epoch": best["epoch"],
        "steps": step,
        "seconds": time.perf_counter() - t_start,
        "devices": n_dev,
        "params_finite": params_finite,  # at the end of training (not the best epoch)
        **pretrain_info,
    }
    log(
        f"test accuracy {test['accuracy']:.4f} (best validation epoch {best['epoch']}, "
        f"{step} steps, {results['seconds']:.0f}s)"
    )
    if write_files:
        if main_process:
            (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        if config.checkpoint:
            # Every process calls this, as orbax requires with several; the parameters are
            # host (NumPy) arrays, the same in every process, which orbax has process 0 write:
            # the same checkpoint as from one process, loadable on any device layout.
            save_checkpoint(run_dir / "checkpoint", model)
        if config.plot and main_process:
            plot_run(history, epochs_log, run_dir / "training.png", config)
            plot_stability(history, run_dir / "stability.png")
        written = ["metrics.jsonl"] + ["checkpoint/"] * config.checkpoint
        written += ["training.png", "stability.png"] * config.plot + ["results.json"]
        log(f"wrote {run_dir}/: {', '.join(written)}")
    results.update(history=history, epochs=epochs_log, model=model)
    return results


def plot_run(history: list[dict], epochs_log: list[dict], path: Path, config: Config) -> None:
    """Loss (training batches, validation per epoch) and pre-clip gradient norm over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["loss"] for r in history], lw=0.6, alpha=0.5, label="train (batch)")
    val_label = "validation (averaged weights)" if config.ema > 0 else "validation"
    ax1.plot(
        [e["step"] for e in epochs_log], [e["val_loss"] for e in epochs_log], "o-", label=val_label
    )
    for e in epochs_log:
        ax1.annotate(
            f"{e['val_accuracy']:.3f}",
            (e["step"], e["val_loss"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax1.set(xlabel="step", ylabel="cross-entropy", title="loss (labels: validation accuracy)")
    ax1.legend()
    ax2.semilogy(
        steps,
        [float(r["grad_norm"]) for r in history],
        lw=0.6,
        label="gradient norm (before clipping)",
    )
    if config.optimizer != "robust_adamw":
        ax2.axhline(config.max_norm, color="k", ls="--", lw=0.8, label="max_norm")
    ax2.set(xlabel="step", title="global gradient norm")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    config = parse_args(argv)
    try:
        return train(config)
    except (data_lib.DataFormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
