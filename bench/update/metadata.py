"""What a run records about itself: machine, versions, commit, load, settings, methods.

>>> sorted(versions())[:3]
['adaptx', 'jax', 'jaxlib']
>>> device_info()["platform"] in ("cpu", "gpu", "tpu")
True
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys

import jax
import numpy as np
import optax

import adaptx
from bench.update.config import B1, B2, BENCH_DIR, EPS, LR, MAX_NORM, RECIPES, WD

MEMORY_METHOD = (
    "xla_peak_bytes: XLA's static memory analysis of the compiled step (arguments + "
    "outputs - donated aliases + temporaries); rss_peak_delta_bytes: process RSS "
    "sampled every ~0.2 ms during one isolated step, minus RSS before it (CPU); "
    "device_peak_bytes_in_use: the accelerator allocator's running peak when the "
    "backend reports one"
)
BYTES_METHOD = "float32 passes over the tree required by the math (see PASSES) x 4 bytes x params"
CEILING_METHOD = "donated in-place x = a*x + b over as many float32 as the tree holds: 2 passes"


def versions() -> dict[str, str | None]:
    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "adaptx": adaptx.__version__,
        "numpy": np.__version__,
    }
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        out["jaxlib"] = None
    out["torch"] = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
    return out


def git_info() -> dict | None:
    """The commit the library was measured at, and whether adaptx/ had local changes."""
    import subprocess

    root = BENCH_DIR.parent

    def git(*cmd):
        return subprocess.run(
            ["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "adaptx")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "adaptx_local_changes": bool(dirty)}


def device_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "jax_device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_meta(args, argv, torch, clib) -> dict:
    """The ``meta`` of a measuring run (``loadavg_end`` is added when it ends)."""
    return {
        "script": "bench/update_step.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        "device": device_info(),
        "versions": versions(),
        "git": git_info(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "c_floor": (
            None
            if clib is None
            else {"flags": clib.flags, "openmp": clib.openmp, "threads": clib.threads}
        ),
        "recipes_available": list(RECIPES),
        "loadavg_start": loadavg(),
        "hyperparameters": {
            "lr": LR,
            "b1": B1,
            "b2": B2,
            "eps": EPS,
            "weight_decay": WD,
            "max_norm": MAX_NORM,
        },
        "memory_method": MEMORY_METHOD,
        "bytes_method": BYTES_METHOD,
        "ceiling_method": CEILING_METHOD,
    }
