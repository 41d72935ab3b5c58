"""Saving the trained parameters (orbax), and loading a run folder back for predictions.

import checkpoints
model, encoder, info = checkpoints.load_checkpoint("runs/text_classifier/<run>")
checkpoints.predict(model, encoder, ["a gorgeous , witty film"])
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import data as data_lib
import jax
import jax.numpy as jnp
import numpy as np
from config import Config
from flax import nnx
from model import TextClassifier, build_model


def save_checkpoint(path: Path, model: nnx.Module) -> None:
    """Writes ``model``'s parameters (only: not the dropout RNG state) to ``path``."""
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
    build = functools.partial(build_model, config, encoder, len(enc_info["class_names"]))
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
