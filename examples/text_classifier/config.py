"""The run's settings: :class:`Config`, whose every field is a command-line flag.

``parse_args`` builds the parser from the fields: ``max_len`` is ``--max-len``, a bool is
``--plot`` / ``--no-plot``, and each field's ``help`` metadata is its ``--help`` text.
Fork the example by adding a field here; it becomes a flag, lands in ``config.json``, and
``checkpoints.load_checkpoint`` reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def _flag(default: Any, help: str) -> Any:
    """A dataclass field with a default and the flag's ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    """Every field is also a command-line flag (``--max-len 64``)."""

    # Data
    dataset: str = _flag("rotten_tomatoes", "built-in data: rotten_tomatoes | imdb")
    data: str | None = _flag(None, "your own CSV/JSONL with text and label columns")
    limit: int | None = _flag(
        None, "use a random subset of this many examples (quick runs); None: all"
    )
    max_len: int = _flag(48, "tokens per example (longer ones are cut, shorter ones padded)")
    vocab_size: int = _flag(30_000, "at most this many words in the vocabulary")
    min_count: int = _flag(2, "words seen fewer times in the training split are unknown")
    bigrams: int = _flag(100_000, "> 0: also embed word bigrams (at most this many); 0: off")
    # Model
    encoder: str = _flag("lstm", "lstm | transformer | rnn")
    embed_dim: int = _flag(64, "width of the word (and bigram) embeddings")
    hidden_dim: int = _flag(64, "LSTM / RNN units per direction, and the head's hidden layer")
    layers: int = _flag(1, "transformer blocks (transformer only)")
    embed_dropout: float = _flag(0.5, "dropout rate on the embeddings")
    word_dropout: float = _flag(
        0.0, "in training, zero whole words' embeddings with this probability"
    )
    dropout: float = _flag(0.5, "dropout rate in the encoder (transformer) and the head")
    recurrent_scale: float = _flag(1.0, "rnn only: recurrent matrix = orthogonal * this")
    embed_init_std: float = _flag(0.1, "standard deviation of the initial embeddings")
    # Rotten Tomatoes only: initialise the embeddings from a bag-of-embeddings sentiment model
    # fitted on the package's IMDB reviews (pretrain.py).
    pretrain_epochs: int = _flag(
        2, "Rotten Tomatoes only: epochs of IMDB embedding pretraining (0: from scratch)"
    )
    pretrain_len: int = _flag(256, "IMDB tokens per review used for the pretraining")
    # Optimizer
    optimizer: str = _flag("adamw", "the adaptx recipe: adamw | robust_adamw | sgd")
    lr: float = _flag(2e-3, "peak learning rate (linear warm-up, then cosine decay to 10%%)")
    warmup_steps: int = _flag(50, "steps of linear learning-rate warm-up")
    weight_decay: float = _flag(1e-4, "decoupled weight decay, on matrices only")
    decay_embeddings: bool = _flag(False, "apply the weight decay to the embeddings too")
    max_norm: float = _flag(1.0, "global gradient-norm clip (adamw, sgd)")
    max_nonfinite_steps: int | None = _flag(
        100,
        "the optimizer's guard skips non-finite steps; after this many in a row, the run "
        "stops with adaptx.DivergedError (None: never)",
    )
    per_tensor: bool = _flag(
        False,
        "also record each parameter's gradient norm and the tensor that led each "
        "intervention in metrics.jsonl (adaptx.telemetry(..., per_tensor=True))",
    )
    # Training
    batch_size: int = _flag(64, "global batch (all devices of all processes together)")
    buckets: int = _flag(3, "batch examples of similar length; compile this many lengths")
    epochs: int = _flag(6, "at most this many epochs")
    ema: float = _flag(0.99, "> 0: evaluate and save this moving average of the weights")
    patience: int = _flag(2, "early stopping: epochs without validation improvement")
    seed: int = _flag(0, "seeds the model, the dropout and the batch order")
    nan_from_step: int | None = _flag(
        None, "a broken run, to see it stopped: every gradient from this step on is NaN"
    )
    split_seed: int = _flag(0, "seeds the train/val/test split (independent of --seed)")
    # Output
    out: str = _flag("runs/text_classifier", "folder of the run folders")
    name: str | None = _flag(
        None, "run folder name; None: <dataset or data file>-<encoder>-seed<N>"
    )
    plot: bool = _flag(True, "write training.png and stability.png")
    checkpoint: bool = _flag(True, "write the best parameters to checkpoint/ (orbax)")
    progress: bool = _flag(True, "show a progress bar (on a terminal)")
    # Several processes (hosts): jax.distributed.initialize(); settings left unset are
    # auto-detected (Slurm, Open MPI, Cloud TPU, ...; see the README, "Several hosts").
    distributed: bool = _flag(False, "one process of a multi-process (multi-host) job")
    coordinator: str | None = _flag(
        None, "HOST:PORT of process 0, reachable from every process; None: detected"
    )
    num_processes: int | None = _flag(None, "processes in the job; None: detected")
    process_id: int | None = _flag(
        None, "0 .. num_processes - 1 (process 0 writes the files); None: detected"
    )

    @property
    def run_dir(self) -> Path:
        src = Path(self.data).stem if self.data else self.dataset
        return Path(self.out) / (self.name or f"{src}-{self.encoder}-seed{self.seed}")


DESCRIPTION = "Train a Flax NNX text classifier on movie reviews with an adaptx optimizer."


def field_kind(f: dataclasses.Field) -> type:
    """The type a field's flag parses to: ``int`` for ``int | None``, ``str`` for ``str``."""
    return {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" ")[0], str)


def parse_value(name: str, text: str) -> Any:
    """``text`` as a value of the field ``name`` (``compare.py --set limit=300``).

    >>> parse_value("limit", "300"), parse_value("limit", "none"), parse_value("plot", "no")
    (300, None, False)
    """
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    kind = field_kind(f)
    if f.default is None and text.lower() == "none":
        return None
    return text.lower() in ("1", "true", "yes") if kind is bool else kind(text)


def parse_args(argv=None, defaults: Config | None = None) -> Config:
    """The :class:`Config` that ``argv`` (default: ``sys.argv``) asks for.

    >>> parse_args(["--max-len", "64", "--no-plot"]).max_len
    64
    """
    defaults = defaults or Config()
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        help_text = f.metadata["help"]
        if isinstance(value, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=value, help=help_text
            )
        else:
            parser.add_argument(
                flag, type=field_kind(f), default=value, metavar=f.name.upper(), help=help_text
            )
    return Config(**vars(parser.parse_args(argv)))
