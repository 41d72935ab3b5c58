"""The steps outside JAX: PyTorch's fused AdamW and the hand-written C floor.

Both run the core pipelines only (``clip+adamw``, ``adamw``, ``clip``, ``sgd-floor``),
on copies of the same numpy params and grads as the JAX variants.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bench.update.config import B1, B2, EPS, LR, MAX_NORM, WD
from bench.update.memory import probe_step
from bench.update.variants import Variant


class _Timed(Variant):
    """The first call stands in for a compile; memory is the RSS growth of one step."""

    def compile(self):
        t0 = time.perf_counter()
        self.step()
        self.info.update({"first_call_s": time.perf_counter() - t0})

    def memory_probe(self):
        self.info.update(probe_step(self.step, device=False))


class TorchVariant(_Timed):
    impl = "torch"

    def __init__(self, torch, pipeline, np_params, np_grads):
        super().__init__()
        self.torch, self.pipeline = torch, pipeline
        leaves_p = jax.tree.leaves(np_params)
        leaves_g = jax.tree.leaves(np_grads)
        # Same device as JAX: CUDA when JAX runs on a GPU and torch sees one, else CPU.
        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.params = [
            torch.nn.Parameter(torch.from_numpy(np.array(p)).to(self.device)) for p in leaves_p
        ]
        for p, g in zip(self.params, leaves_g, strict=True):
            p.grad = torch.from_numpy(np.array(g)).to(self.device)
        self.grads = [p.grad for p in self.params]
        self.opt = None
        if pipeline in ("clip+adamw", "adamw"):
            self.opt, mode = self._adamw()
            clip = "clip_grad_norm_(foreach=True) + " if pipeline == "clip+adamw" else ""
            self.desc = f"{clip}AdamW({mode}) on {self.device.type}"
        elif pipeline == "clip":
            self.desc = "clip_grad_norm_(foreach=True) + _foreach_add_"
        else:
            self.desc = "_foreach_add_(alpha=-lr)"

    def _adamw(self):
        torch = self.torch
        for kw in ({"fused": True}, {"foreach": True}):
            opt = torch.optim.AdamW(
                self.params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **kw
            )
            try:
                opt.step()  # probe support; also the first step (warm-up)
                return opt, ", ".join(f"{k}=True" for k in kw)
            except (RuntimeError, TypeError):
                continue
        return torch.optim.AdamW(
            self.params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD
        ), "default"

    def step(self):
        torch = self.torch
        with torch.no_grad():
            if self.pipeline in ("clip+adamw", "clip"):
                torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
            if self.opt is not None:
                self.opt.step()
            elif self.pipeline == "clip":
                torch._foreach_add_([p.data for p in self.params], self.grads)
            else:
                torch._foreach_add_([p.data for p in self.params], self.grads, alpha=-LR)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def close(self):
        self.params = self.grads = self.opt = None


class CVariant(_Timed):
    impl = "c"

    def __init__(self, cmod, lib, pipeline, np_params, np_grads):
        super().__init__()
        self.pipeline = pipeline
        leaves_p = [np.array(x) for x in jax.tree.leaves(np_params)]
        leaves_g = [np.array(x) for x in jax.tree.leaves(np_grads)]
        arrays = {"p": leaves_p, "g": leaves_g}
        if pipeline in ("clip+adamw", "adamw"):
            arrays["m"] = [np.zeros_like(x) for x in leaves_p]
            arrays["v"] = [np.zeros_like(x) for x in leaves_p]
        self.tree = cmod.Tree(lib, arrays)
        self.t = 0
        omp = f"OpenMP x{lib.threads}" if lib.openmp else "1 thread"
        self.desc = f"gcc {' '.join(lib.flags[:3])}, {omp}"

    def step(self):
        if self.pipeline in ("clip+adamw", "adamw"):
            self.t += 1
            self.tree.adamw(LR, B1, B2, EPS, WD, MAX_NORM, self.t, self.pipeline == "clip+adamw")
        elif self.pipeline == "clip":
            self.tree.axpy(1.0, MAX_NORM, True)
        else:
            self.tree.axpy(-LR, MAX_NORM, False)

    def close(self):
        self.tree = None
