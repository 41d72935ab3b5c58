"""Benchmark of the end-to-end train step of the example text classifier: adaptx vs optax.

One jitted, donated step = forward + backward + optimizer update on a fixed synthetic
batch (random token ids with random lengths, random labels), for each optimizer
recipe and its nearest optax equivalent:

* ``adamw``: ``adaptx.adamw(lr, weight_decay, max_norm=1, mask)`` vs
  ``optax.chain(optax.clip_by_global_norm(1), optax.adamw(lr, weight_decay, mask=mask))``;
* ``robust_adamw``: ``adaptx.robust_adamw(lr, weight_decay, mask)``
  vs ``optax.apply_if_finite(<the optax adamw chain>, 10)``;
* ``adam_atan2``: ``adaptx.adam_atan2(lr, weight_decay, mask, max_norm=1)`` vs the
  optax adamw chain above;
* ``sgd``: ``adaptx.sgd(lr, 0.9, max_norm=1)`` vs
  ``optax.chain(optax.clip_by_global_norm(1), optax.sgd(lr, 0.9))``;
* ``grad-only``: forward + backward with no update, the floor under every recipe.

The adaptx steps also return ``adaptx.telemetry(optimizer)`` with the loss, as a
training loop that logs it would. The model is ``TextClassifier`` from
``examples/text_classifier/model.py``; if that file is missing, a small self-contained
Flax NNX classifier (embedding, one transformer block, pooling, MLP head) stands in.
Variants run in interleaved rounds, like ``update_step.py``; reported per variant:
median [min-max] step time, the paired per-round ratio to the optax variant of the same
recipe, and compile time (trace + lowering + XLA compile) measured apart.

>>> sorted(RECIPES)
['adam_atan2', 'adamw', 'grad-only', 'robust_adamw', 'sgd']
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaptx

HERE = Path(__file__).resolve().parent
MODEL_PATH = HERE.parent / "examples" / "text_classifier" / "model.py"
RECIPES = ("adamw", "robust_adamw", "adam_atan2", "sgd", "grad-only")
LR, WD, MAX_NORM = 2e-3, 1e-4, 1.0


# --------------------------------------------------------------------------------------
# Model


class _Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=nnx.make_attention_mask(mask, mask))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))


class FallbackClassifier(nnx.Module):
    """Embedding -> one pre-norm transformer block -> masked mean pooling -> MLP head.

    ``encoder="mean"`` drops the transformer block (embedding bag + MLP: compiles in a
    second, for smoke tests).

    >>> m = FallbackClassifier(50, 2, embed_dim=8, hidden_dim=8, encoder="mean",
    ...                        rngs=nnx.Rngs(0))
    >>> m(jnp.array([[5, 6, 0, 0]]), deterministic=True).shape
    (1, 2)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int = 128,
        hidden_dim: int = 128,
        heads: int = 4,
        encoder: str = "transformer",
        rngs: nnx.Rngs,
        **unused,
    ):
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.block = _Block(embed_dim, heads, rngs=rngs) if encoder != "mean" else None
        self.hidden = nnx.Linear(embed_dim, hidden_dim, rngs=rngs)
        self.out = nnx.Linear(hidden_dim, num_classes, rngs=rngs)

    def __call__(self, tokens, *, deterministic: bool):
        del deterministic
        mask = tokens > 0
        h = self.embed(tokens)
        if self.block is not None:
            h = self.block(h, mask)
        m = mask[..., None].astype(h.dtype)
        pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return self.out(jax.nn.relu(self.hidden(pooled)))


def load_model_class(which: str = "example"):
    """The example's ``TextClassifier`` if present, else :class:`FallbackClassifier`."""
    if which == "example" and MODEL_PATH.exists():
        spec = importlib.util.spec_from_file_location("adaptx_bench_example_model", MODEL_PATH)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
            return mod.TextClassifier, str(MODEL_PATH.relative_to(HERE.parent))
        except Exception as e:  # noqa: BLE001 - an example mid-edit must not break the bench
            print(
                f"could not import {MODEL_PATH} ({type(e).__name__}: {e}); using the fallback model"
            )
    return FallbackClassifier, "bench/train_step.py:FallbackClassifier"


def build_model(cls, args):
    wanted = {
        "encoder": args.encoder,
        "embed_dim": args.embed_dim,
        "hidden_dim": args.hidden_dim,
        "max_len": args.max_len,
        "layers": args.layers,
    }
    params = inspect.signature(cls.__init__).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if takes_all or k in params}
    return cls(args.vocab_size, args.num_classes, rngs=nnx.Rngs(args.seed), **kwargs)


def decay_mask(params):
    """Weight decay on matrices only (not biases, norms or embeddings), as in the example."""
    return jax.tree.map_with_path(
        lambda path, p: p.ndim >= 2 and "embed" not in jax.tree_util.keystr(path), params
    )


# --------------------------------------------------------------------------------------
# Optimizers and steps


def schedule(total_steps: int = 1000):
    return optax.warmup_cosine_decay_schedule(0.0, LR, 50, total_steps, end_value=0.1 * LR)


def optimizers(recipe: str) -> dict[str, optax.GradientTransformation | None]:
    lr = schedule()

    def optax_adamw():
        return optax.chain(
            optax.clip_by_global_norm(MAX_NORM), optax.adamw(lr, weight_decay=WD, mask=decay_mask)
        )

    if recipe == "adamw":
        return {
            "optax": optax_adamw(),
            "adaptx": adaptx.adamw(lr, weight_decay=WD, max_norm=MAX_NORM, mask=decay_mask),
        }
    if recipe == "robust_adamw":
        return {
            "optax": optax.apply_if_finite(optax_adamw(), 10),
            "adaptx": adaptx.robust_adamw(lr, weight_decay=WD, mask=decay_mask),
        }
    if recipe == "adam_atan2":
        return {
            "optax": optax_adamw(),
            "adaptx": adaptx.adam_atan2(lr, weight_decay=WD, mask=decay_mask, max_norm=MAX_NORM),
        }
    if recipe == "sgd":
        return {
            "optax": optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.sgd(lr, 0.9)),
            "adaptx": adaptx.sgd(lr, momentum=0.9, max_norm=MAX_NORM),
        }
    if recipe == "grad-only":
        return {"none": None}
    raise ValueError(recipe)


def loss_fn(model, tokens, labels):
    logits = model(tokens, deterministic=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(graphdef, with_optimizer: bool, telemetry: bool):
    def step(state, tokens, labels):
        if with_optimizer:
            model, optimizer = nnx.merge(graphdef, state)
        else:
            model = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, labels)
        metrics = {"loss": loss}
        if with_optimizer:
            optimizer.update(model, grads)
            if telemetry:
                metrics.update(adaptx.telemetry(optimizer))
            return nnx.state((model, optimizer)), metrics
        # No update: keep the gradients alive so the backward pass is not pruned.
        metrics["grad_sq"] = sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))
        return nnx.state(model), metrics

    return jax.jit(step, donate_argnums=0)


def _own_buffers(state):
    """Copies every leaf, so no two leaves share a buffer (required for donation)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


class Variant:
    def __init__(self, recipe, impl, tx, model_cls, args, batch):
        self.recipe, self.impl = recipe, impl
        self.name = f"{recipe}/{impl}"
        model = build_model(model_cls, args)
        self.n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.n_leaves = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
        if tx is None:
            graphdef, self.state = nnx.split(model)
        else:
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
            graphdef, self.state = nnx.split((model, optimizer))
        self.state = _own_buffers(self.state)
        self.fn = make_step(graphdef, tx is not None, telemetry=impl == "adaptx")
        self.tokens, self.labels = batch
        self.times: list[float] = []
        self.info: dict = {}

    def compile(self, events):
        with _quiet(), events.collect() as ev:
            t0 = time.perf_counter()
            self.step()
            first = time.perf_counter() - t0
        self.info = {k: ev.get(k, 0.0) for k in events.NAMES.values()}
        self.info["compile_s"] = sum(self.info.values())
        self.info["first_call_s"] = first
        self.info["loss_finite"] = bool(np.isfinite(float(self.metrics["loss"])))

    def step(self):
        self.state, self.metrics = self.fn(self.state, self.tokens, self.labels)
        jax.block_until_ready((self.state, self.metrics))


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        yield


def synthetic_batch(args):
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.max_len // 4, args.max_len + 1, args.batch_size)
    tokens = rng.integers(2, args.vocab_size, (args.batch_size, args.max_len))
    tokens = np.where(np.arange(args.max_len)[None] < lengths[:, None], tokens, 0)
    labels = rng.integers(0, args.num_classes, args.batch_size)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)


# --------------------------------------------------------------------------------------
# The run


def _update_step_module():
    spec = importlib.util.spec_from_file_location(
        "adaptx_bench_update_step_for_train", HERE / "update_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"comma-separated subset of {','.join(RECIPES)}",
    )
    p.add_argument(
        "--model",
        choices=("example", "fallback"),
        default="example",
        help="the example's TextClassifier (fallback if missing) or the built-in one",
    )
    p.add_argument(
        "--encoder",
        default="lstm",
        help="example: lstm | transformer | rnn; fallback: transformer | mean",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=56)
    p.add_argument("--vocab-size", type=int, default=30_000)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 20; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; quick 1)")
    p.add_argument(
        "--out",
        default=str(HERE / "results" / "train_step"),
        help="output path prefix: writes PREFIX.json and PREFIX.md",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model and batch: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_len, args.vocab_size = 8, 16, 500
        args.embed_dim = args.hidden_dim = 16
    if args.reps is None:
        args.reps = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    us = _update_step_module()
    events = us.compile_events()
    model_cls, model_src = load_model_class(args.model)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"unknown recipe {r!r}; choose from {','.join(RECIPES)}")
    batch = synthetic_batch(args)
    meta = {
        "script": "bench/train_step.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "model": model_src,
        "device": us.device_info(),
        "versions": us.versions(),
        "git": us.git_info(),
        "loadavg_start": us._loadavg(),
    }
    meta["versions"].pop("torch", None)
    print(f"device: {meta['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"model: {model_src}, encoder {args.encoder}")

    variants = []
    for recipe in recipes:
        for impl, tx in optimizers(recipe).items():
            v = Variant(recipe, impl, tx, model_cls, args, batch)
            v.compile(events)
            variants.append(v)
            print(f"  compiled {v.name}: {v.info['compile_s']:.2f} s")
    meta["params"], meta["leaves"] = variants[0].n_params, variants[0].n_leaves
    print(f"{meta['leaves']} parameter leaves, {meta['params']:,} params")

    rounds = []
    for r in range(args.warmup + args.reps):
        k = r % len(variants)
        times = {}
        with _quiet():
            for v in variants[k:] + variants[:k]:
                t0 = time.perf_counter()
                v.step()
                times[v.name] = time.perf_counter() - t0
        if r >= args.warmup:
            rounds.append(times)
    meta["loadavg_end"] = us._loadavg()

    cells = []
    for v in variants:
        ts = [r[v.name] for r in rounds]
        cell = {
            "recipe": v.recipe,
            "impl": v.impl,
            **us.summarize(ts),
            **v.info,
            "loss_finite_end": bool(np.isfinite(float(v.metrics["loss"]))),
        }
        for ref in (f"{v.recipe}/optax", "grad-only/none"):
            if ref != v.name and all(ref in r for r in rounds):
                ratios = [r[v.name] / r[ref] for r in rounds]
                key = "vs_optax" if ref.endswith("optax") else "vs_grad_only"
                cell[key] = {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                }
        cells.append(cell)
    results = {"meta": meta, "cells": cells}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return results


def markdown(results: dict) -> str:
    m = results["meta"]
    d, c = m["device"], m["config"]
    lines = [
        f"Device: {d.get('cpu_model', d['device_kind'])} ({d['platform']}, {d['cpu_count']} "
        f"cores); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f"; {m['date']}; load average {m['loadavg_start']} at start, {m['loadavg_end']} at end.",
        f"Model: {m['model']} (encoder {c['encoder']}, embed {c['embed_dim']}, hidden "
        f"{c['hidden_dim']}, vocab {c['vocab_size']}; {m['leaves']} leaves, {m['params']:,} "
        f"params); batch {c['batch_size']} x {c['max_len']} tokens. {c['reps']} timed "
        f"interleaved rounds after {c['warmup']} warm-up rounds.",
        "",
        "| recipe | impl | step ms median [min-max] | x optax (paired) | x grad-only | "
        "compile s | first call s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in results["cells"]:

        def r(key, x=x):
            v = x.get(key)
            return "" if v is None else f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"

        lines.append(
            f"| {x['recipe']} | {x['impl']} | {x['median_ms']:.2f} "
            f"[{x['min_ms']:.2f}-{x['max_ms']:.2f}] | {r('vs_optax')} | "
            f"{r('vs_grad_only')} | {x['compile_s']:.2f} | {x['first_call_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
