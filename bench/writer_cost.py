"""What does logging every step through ``adaptx.MetricsWriter`` cost a training loop?

The jitted, donated step of ``adaptx.robust_adamw(1e-3)`` (``update`` + ``apply_updates``)
returns the new parameters, state and its ``adaptx.telemetry`` figures, on a tree of
``bench/update/trees.py``. Rounds of ``--steps`` steps are timed, three ways interleaved:

- ``kept``: the figures are returned and dropped; nothing is fetched (the floor);
- ``writer``: each step's figures go to ``MetricsWriter(every_steps=E).write``, which
  fetches them with one ``jax.device_get`` every ``E`` steps and writes ``metrics.jsonl``;
- ``fetch each step``: ``jax.device_get`` of the figures at every step and one JSON line
  written (a logger that syncs with the device at every step).

Each round ends when the last step's arrays are ready (and, for the writer, after its
flush). Reported per tree: the median step time of ``kept``, each way's round time over
``kept``'s in the same round (median, min-max over rounds), and the ``jax.device_get``
calls per round, counted by wrapping ``jax.device_get``.

    python -m bench.writer_cost                        # the four trees, ~6 min on 2 cores
    python -m bench.writer_cost --quick                # tiny trees, seconds
    python -m bench.writer_cost --out bench/measured/writer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptx
from bench.update.trees import TREE_KINDS, make_numpy_tree, tree_name, tree_shapes

WAYS = ("kept", "writer", "fetch each step")


def compiled_step(tx, params, grads):
    """The jitted, donated step returning ``(params, state, figures)``, compiled."""

    def step(p, s, g):
        u, s = tx.update(g, s, p, value=jnp.float32(1.0))
        return optax.apply_updates(p, u), s, adaptx.telemetry(s)

    state = tx.init(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile(), state


@contextlib.contextmanager
def counting_device_gets():
    """``jax.device_get`` wrapped to count its calls; yields a one-element list."""
    calls, real = [0], jax.device_get

    def counted(tree):
        calls[0] += 1
        return real(tree)

    jax.device_get = counted
    try:
        yield calls
    finally:
        jax.device_get = real


def run_round(way: str, compiled, carry: list, grads, steps: int, every: int, log: Path):
    """``steps`` steps logged ``way``; returns (seconds, device_get calls, new carry)."""
    with counting_device_gets() as calls, contextlib.ExitStack() as stack:
        writer = None
        if way == "writer":
            writer = stack.enter_context(adaptx.MetricsWriter(log, every_steps=every))
        out = stack.enter_context(open(log.with_suffix(".each.jsonl"), "a"))
        t = time.perf_counter()
        for i in range(steps):
            params, state, figures = compiled(*carry, grads)
            carry = [params, state]
            if writer is not None:
                writer.write(i, figures)
            elif way == "fetch each step":
                row = {k: float(v) for k, v in jax.device_get(figures).items()}
                out.write(json.dumps({"step": i, **row}) + "\n")
        if writer is not None:
            writer.flush()
        jax.block_until_ready(carry)
        seconds = time.perf_counter() - t
    return seconds, calls[0], carry


def measure(tree: str, quick: bool, steps: int, every: int, rounds: int, log: Path) -> dict:
    shapes = tree_shapes(tree, quick)
    np_params = make_numpy_tree(shapes, 0, 1.0)
    grads = jax.tree.map(jnp.asarray, make_numpy_tree(shapes, 1, 1e-3))
    cells = {}
    for way in WAYS:
        params = jax.tree.map(jnp.asarray, np_params)
        compiled, state = compiled_step(adaptx.robust_adamw(1e-3), params, grads)
        cells[way] = {"compiled": compiled, "carry": [params, state], "s": [], "gets": []}
    for r in range(rounds + 1):  # one warm-up round, then interleaved timed rounds
        order = WAYS if r % 2 == 0 else WAYS[::-1]
        for way in order:
            c = cells[way]
            s, gets, c["carry"] = run_round(
                way, c["compiled"], c["carry"], grads, steps, every, log / way.replace(" ", "_")
            )
            if r > 0:
                c["s"].append(s)
                c["gets"].append(gets)
    kept = cells["kept"]["s"]
    out = {
        "tree": tree_name(tree, shapes),
        "steps": steps,
        "every_steps": every,
        "kept_step_ms": 1e3 * statistics.median(kept) / steps,
    }
    for way in WAYS[1:]:
        ratios = [w / k for w, k in zip(cells[way]["s"], kept, strict=True)]
        out[way] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "device_gets_per_round": statistics.median(cells[way]["gets"]),
        }
    out["kept_device_gets_per_round"] = statistics.median(cells["kept"]["gets"])
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| tree | step, kept (ms) | writer / kept: median (min-max) | device_get per round "
        "| fetch each step / kept: median (min-max) | device_get per round |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        cells = [f"{r['tree']}", f"{r['kept_step_ms']:.2f}"]
        for way in (r["writer"], r["fetch each step"]):
            cells.append(f"{way['median']:.3f} ({way['min']:.3f}-{way['max']:.3f})")
            cells.append(f"{way['device_gets_per_round']:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=",".join(TREE_KINDS), help="comma-separated trees")
    p.add_argument("--quick", action="store_true", help="tiny trees, few steps")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 50)")
    p.add_argument("--every", type=int, default=None, help="the writer's every_steps (25)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    steps = args.steps or (8 if args.quick else 50)
    every = args.every or (4 if args.quick else 25)
    rounds = args.rounds or (2 if args.quick else 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tree in args.trees.split(","):
            rows.append(measure(tree, args.quick, steps, every, rounds, Path(tmp)))
            print(markdown(rows[-1:]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "numpy": np.__version__}
        meta["date"] = time.strftime("%Y-%m-%d")
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        intro = (
            f"`python -m bench.writer_cost` ({meta['date']}, {meta['device']}, jax "
            f"{meta['jax']}): `adaptx.robust_adamw(1e-3)`'s jitted, donated step returning "
            f"its telemetry, {steps} steps per round, {rounds} interleaved rounds; the "
            f"writer at every_steps={every}. Ratios are round times over the `kept` round's "
            "(figures returned, never fetched); see the script's docstring.\n\n"
        )
        Path(args.out + ".md").write_text(intro + table)
    return rows


if __name__ == "__main__":
    main()
