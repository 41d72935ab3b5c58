"""A small Flax NNX text classifier: embedding -> encoder -> mean+max pooling -> MLP head.

Encoders:
  * ``"lstm"``: bidirectional LSTM. Both directions run in one ``lax.scan`` (the input
    projections for every time step are one matmul up front), which keeps it fast on CPU.
  * ``"transformer"``: a small pre-norm transformer encoder with learned positions.
  * ``"rnn"``: a plain (Elman, tanh) RNN whose recurrent matrix is orthogonal times
    ``recurrent_scale``; with a scale above 1 it is the classic exploding-gradient setup
    used by ``compare.py --model rnn``.

Usage (see ``train.py`` for training and ``checkpoints.load_checkpoint`` for a trained
one; :func:`build_model` makes the one a ``config.Config`` describes)::

    model = TextClassifier(vocab_size, num_classes=2, rngs=nnx.Rngs(0))
    logits = model(token_ids, deterministic=True)  # [batch, num_classes]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:  # (annotations only: this file imports nothing of the example's)
    from config import Config
    from data import Encoder

ENCODERS = ("lstm", "transformer", "rnn")


def _fused_scan(cell, x_proj: jax.Array, mask: jax.Array, h0) -> jax.Array:
    """Runs ``cell`` over time. x_proj: [T, ..., F] precomputed input projections, mask [T, ...]

    Padded steps (mask 0) leave the carry unchanged, so a reversed right-padded sequence
    starts from the zero state at its first real token.
    """

    def step(carry, inputs):
        xp, m = inputs
        new_carry, out = cell(carry, xp)
        m = m[..., None]
        carry = jax.tree.map(lambda n, o: m * n + (1 - m) * o, new_carry, carry)
        return carry, out * m

    _, outs = jax.lax.scan(step, h0, (x_proj, mask))
    return outs


class BiLSTM(nnx.Module):
    """Bidirectional LSTM; returns [B, T, 2 * hidden] (forward and backward states)."""

    def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        init = nnx.initializers.lecun_normal()
        orth = nnx.initializers.orthogonal()
        # Direction axis first: [2, in, 4H] input and [2, H, 4H] recurrent weights.
        self.w_in = nnx.Param(
            jax.vmap(lambda k: init(k, (in_dim, 4 * hidden)))(jax.random.split(rngs.params(), 2))
        )
        self.w_rec = nnx.Param(
            jax.vmap(lambda k: orth(k, (hidden, 4 * hidden)))(jax.random.split(rngs.params(), 2))
        )
        bias = jnp.zeros((2, 4 * hidden)).at[:, hidden : 2 * hidden].set(1.0)  # forget gate 1
        self.bias = nnx.Param(bias)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h = self.hidden
        # Backward direction sees the time-reversed sequence.
        xs = jnp.stack([x, x[:, ::-1]])  # [2, B, T, D]
        ms = jnp.stack([mask, mask[:, ::-1]]).astype(x.dtype)  # [2, B, T]
        proj = jnp.einsum("kbtd,kdf->tkbf", xs, self.w_in[...]) + self.bias[...][:, None]
        w_rec = self.w_rec[...]

        def cell(carry, xp):
            c, hh = carry
            z = xp + jnp.einsum("kbh,khf->kbf", hh, w_rec)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            hh = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, hh), hh

        zeros = jnp.zeros((2, b, h), x.dtype)
        outs = _fused_scan(cell, proj, jnp.moveaxis(ms, 2, 0), (zeros, zeros))  # [T,2,B,H]
        fwd, bwd = outs[:, 0], outs[::-1, 1]
        return jnp.moveaxis(jnp.concatenate([fwd, bwd], axis=-1), 0, 1)


class ElmanRNN(nnx.Module):
    """h_t = tanh(W x_t + U h_{t-1} + b), U orthogonal times ``recurrent_scale``."""

    def __init__(self, in_dim: int, hidden: int, *, recurrent_scale: float = 1.0, rngs: nnx.Rngs):
        self.w_in = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_dim, hidden)))
        self.w_rec = nnx.Param(
            recurrent_scale * nnx.initializers.orthogonal()(rngs.params(), (hidden, hidden))
        )
        self.bias = nnx.Param(jnp.zeros((hidden,)))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        proj = jnp.einsum("btd,dh->tbh", x, self.w_in[...]) + self.bias[...]
        w_rec = self.w_rec[...]

        def cell(h, xp):
            h = jnp.tanh(xp + h @ w_rec)
            return h, h

        h0 = jnp.zeros(proj.shape[1:], x.dtype)
        outs = _fused_scan(cell, proj, mask.T.astype(x.dtype), h0)
        return jnp.swapaxes(outs, 0, 1)


class EncoderBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask, deterministic):
        attn_mask = nnx.make_attention_mask(mask, mask)
        y = self.attn(self.norm1(x), mask=attn_mask, deterministic=True)
        x = x + self.drop(y, deterministic=deterministic)
        y = self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))
        return x + self.drop(y, deterministic=deterministic)


class Transformer(nnx.Module):
    def __init__(
        self, dim: int, max_len: int, layers: int, heads: int, dropout: float, *, rngs: nnx.Rngs
    ):
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
        self.blocks = nnx.List(
            [EncoderBlock(dim, heads, dropout, rngs=rngs) for _ in range(layers)]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x, mask, deterministic):
        x = x + self.pos[...][: x.shape[1]]
        for block in self.blocks:
            x = block(x, mask, deterministic)
        return self.norm(x)


class TextClassifier(nnx.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        encoder: str = "lstm",
        embed_dim: int = 128,
        hidden_dim: int = 128,
        max_len: int = 64,
        embed_dropout: float = 0.5,
        dropout: float = 0.5,
        word_dropout: float = 0.0,
        layers: int = 1,
        heads: int = 4,
        embed_init_std: float = 0.1,
        recurrent_scale: float = 1.0,
        bigram_vocab_size: int = 0,
        rngs: nnx.Rngs,
    ):
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {ENCODERS}")
        self.encoder_name = encoder
        self.word_dropout = word_dropout
        self.embed = nnx.Embed(
            vocab_size, embed_dim, embedding_init=nnx.initializers.normal(embed_init_std), rngs=rngs
        )
        self.bigram_embed = (
            nnx.Embed(
                bigram_vocab_size,
                embed_dim,
                embedding_init=nnx.initializers.normal(embed_init_std),
                rngs=rngs,
            )
            if bigram_vocab_size
            else None
        )
        self.embed_drop = nnx.Dropout(embed_dropout, rngs=rngs)
        if encoder == "lstm":
            self.encoder = BiLSTM(embed_dim, hidden_dim, rngs=rngs)
            feat = 2 * hidden_dim
        elif encoder == "rnn":
            self.encoder = ElmanRNN(
                embed_dim, hidden_dim, recurrent_scale=recurrent_scale, rngs=rngs
            )
            feat = hidden_dim
        else:
            self.encoder = Transformer(embed_dim, max_len, layers, heads, dropout, rngs=rngs)
            feat = embed_dim
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.hidden = nnx.Linear(2 * feat, hidden_dim, rngs=rngs)
        self.out = nnx.Linear(hidden_dim, num_classes, rngs=rngs)
        self.rngs = rngs

    def __call__(self, tokens: jax.Array, *, deterministic: bool) -> jax.Array:
        """tokens: int [B, T] word ids, or [B, 2, T] word and bigram ids (0 = padding)."""
        if tokens.ndim == 3:
            tokens, bigram_ids = tokens[:, 0], tokens[:, 1]
        else:
            bigram_ids = None
        mask = tokens > 0
        x = self.embed(tokens)
        if self.bigram_embed is not None and bigram_ids is not None:
            x = x + self.bigram_embed(bigram_ids)
        if self.word_dropout > 0 and not deterministic:
            # Drop whole words (replace by zeros) with probability ``word_dropout``.
            keep = jax.random.bernoulli(self.rngs.dropout(), 1 - self.word_dropout, tokens.shape)
            x = x * keep[..., None]
        x = self.embed_drop(x, deterministic=deterministic)
        if self.encoder_name == "transformer":
            h = self.encoder(x, mask, deterministic)
        else:
            h = self.encoder(x, mask)
        m = mask[..., None].astype(h.dtype)
        mean = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        mx = jnp.where(m > 0, h, -1e9).max(1)
        mx = jnp.where(m.sum(1) > 0, mx, 0.0)
        z = self.drop(jnp.concatenate([mean, mx], axis=-1), deterministic=deterministic)
        z = self.drop(jax.nn.relu(self.hidden(z)), deterministic=deterministic)
        return self.out(z)


class BagOfEmbeddings(nnx.Module):
    """Mean of the known words' (+ bigrams') embeddings, then a linear layer.

    Fast enough to fit on 25,000 IMDB reviews in seconds; its embedding tables have the same
    shapes as :class:`TextClassifier`'s, so they can initialise it (``pretrain.pretrain``).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int,
        bigram_vocab_size: int = 0,
        embed_init_std: float = 0.1,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(embed_init_std)
        self.embed = nnx.Embed(vocab_size, embed_dim, embedding_init=init, rngs=rngs)
        self.bigram_embed = (
            nnx.Embed(bigram_vocab_size, embed_dim, embedding_init=init, rngs=rngs)
            if bigram_vocab_size
            else None
        )
        self.out = nnx.Linear(embed_dim, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        words = tokens[:, 0] if tokens.ndim == 3 else tokens
        known = (words > 1).astype(jnp.float32)[..., None]  # neither padding nor unknown
        x = self.embed(words)
        if self.bigram_embed is not None:
            x = x + self.bigram_embed(tokens[:, 1])
        return self.out((x * known).sum(1) / jnp.maximum(known.sum(1), 1.0))


def bigram_vocab_size(encoder: Encoder) -> int:
    """Entries of ``encoder``'s bigram vocabulary; 0 when it has none."""
    return len(encoder.bigram_vocab) if encoder.bigram_vocab is not None else 0


def build_model(config: Config, encoder: Encoder, num_classes: int) -> TextClassifier:
    """The :class:`TextClassifier` that ``config`` describes, for ``encoder``'s vocabularies."""
    return TextClassifier(
        len(encoder.vocab),
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
        bigram_vocab_size=bigram_vocab_size(encoder),
        rngs=nnx.Rngs(config.seed),
    )
