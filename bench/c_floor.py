"""Optional hand-written C reference for the optimizer step (the "C floor").

Compiled at run time with ``gcc -O3 -march=native`` (OpenMP when available) into a
temporary shared library and called through ``ctypes``. Every kernel streams each
array exactly as often as the math requires (AdamW + clip: one read of ``g`` for the
norm, then one pass reading ``g, p, m, v`` and writing ``p, m, v``), so its time is a
practical floor for the step on this machine. :func:`load` returns ``None`` when no C
compiler is found; nothing else in ``bench/`` depends on it.

>>> lib = load()
>>> if lib is not None:
...     x = np.ones(5, np.float32)
...     lib.triad(x, 2.0, 1.0)
...     print(x)
... else:
...     print(np.full(5, 3.0, np.float32))
[3. 3. 3. 3. 3.]
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
  return n;
#else
  (void)n;
  return 1;
#endif
}

/* Work is split into chunks (leaf, start, end) precomputed by the caller, so trees of
   many small leaves and single huge leaves both spread over the threads. */
static double sumsq(int64_t nch, const int64_t* cl, const int64_t* cs, const int64_t* ce,
                    float* const* g) {
  double total = 0.0;
  #pragma omp parallel for schedule(static) reduction(+:total)
  for (int64_t c = 0; c < nch; c++) {
    const float* x = g[cl[c]];
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = cs[c]; i < ce[c]; i++) acc += x[i] * x[i];
    total += acc;
  }
  return total;
}

static float clip_scale(int64_t nch, const int64_t* cl, const int64_t* cs, const int64_t* ce,
                        float* const* g, float max_norm) {
  double norm = sqrt(sumsq(nch, cl, cs, ce, g));
  return norm > max_norm ? (float)(max_norm / norm) : 1.0f;
}

/* p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), moments of s * g; s = clip scale or 1. */
void adamw(int64_t nch, const int64_t* cl, const int64_t* cs, const int64_t* ce,
           float* const* g, float* const* p, float* const* m, float* const* v,
           float lr, float b1, float b2, float eps, float wd, float max_norm, int64_t t,
           int clip) {
  const float s = clip ? clip_scale(nch, cl, cs, ce, g, max_norm) : 1.0f;
  const float k1 = (float)(1.0 / (1.0 - pow(b1, (double)t)));
  const float k2 = (float)(1.0 / (1.0 - pow(b2, (double)t)));
  #pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nch; c++) {
    const int64_t l = cl[c];
    const float* restrict gg = g[l];
    float* restrict pp = p[l];
    float* restrict mm = m[l];
    float* restrict vv = v[l];
    #pragma omp simd
    for (int64_t i = cs[c]; i < ce[c]; i++) {
      const float gi = gg[i] * s;
      const float mi = b1 * mm[i] + (1.0f - b1) * gi;
      const float vi = b2 * vv[i] + (1.0f - b2) * gi * gi;
      mm[i] = mi;
      vv[i] = vi;
      pp[i] -= lr * (k1 * mi / (sqrtf(k2 * vi) + eps) + wd * pp[i]);
    }
  }
}

/* p += s * g (the clip pipeline, applied); s = 1 and alpha = -lr gives plain SGD. */
void axpy(int64_t nch, const int64_t* cl, const int64_t* cs, const int64_t* ce,
          float* const* g, float* const* p, float alpha, float max_norm, int clip) {
  const float s = alpha * (clip ? clip_scale(nch, cl, cs, ce, g, max_norm) : 1.0f);
  #pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nch; c++) {
    const int64_t l = cl[c];
    const float* restrict gg = g[l];
    float* restrict pp = p[l];
    #pragma omp simd
    for (int64_t i = cs[c]; i < ce[c]; i++) pp[i] += s * gg[i];
  }
}

/* x = a * x + b in place: the bandwidth ceiling (one read, one write per element). */
void triad(float* x, int64_t n, float a, float b) {
  #pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; i++) x[i] = a * x[i] + b;
}
"""

CHUNK = 1 << 15


class CLib:
    """The compiled kernels, with NumPy-facing wrappers."""

    def __init__(self, path: Path, openmp: bool, flags: list[str]):
        self._lib = ctypes.CDLL(str(path))
        self.openmp = openmp
        self.flags = flags
        i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        self._lib.set_threads.argtypes = [ctypes.c_int]
        self._lib.adamw.argtypes = (
            [i64, vp, vp, vp, vp, vp, vp, vp] + [f32] * 6 + [i64, ctypes.c_int]
        )
        self._lib.axpy.argtypes = [i64, vp, vp, vp, vp, vp, f32, f32, ctypes.c_int]
        self._lib.triad.argtypes = [vp, i64, f32, f32]
        self.threads = self._lib.set_threads(os.cpu_count() or 1)

    def triad(self, x: np.ndarray, a: float, b: float) -> None:
        self._lib.triad(x.ctypes.data, x.size, a, b)


class Tree:
    """Flat lists of float32 NumPy arrays plus the chunk table the kernels iterate over."""

    def __init__(self, lib: CLib, arrays: dict[str, list[np.ndarray]]):
        self.lib = lib
        self.arrays = arrays  # keep alive
        sizes = [a.size for a in next(iter(arrays.values()))]
        cl, cs, ce = [], [], []
        for leaf, n in enumerate(sizes):
            for start in range(0, n, CHUNK):
                cl.append(leaf)
                cs.append(start)
                ce.append(min(n, start + CHUNK))
        self.nch = len(cl)
        self.chunks = [np.asarray(x, np.int64) for x in (cl, cs, ce)]
        self.ptrs = {
            k: (ctypes.c_void_p * len(v))(*[a.ctypes.data for a in v]) for k, v in arrays.items()
        }

    def _c(self):
        return [self.nch] + [c.ctypes.data for c in self.chunks]

    def adamw(self, lr, b1, b2, eps, wd, max_norm, t, clip):
        p = self.ptrs
        self.lib._lib.adamw(
            *self._c(), p["g"], p["p"], p["m"], p["v"], lr, b1, b2, eps, wd, max_norm, t, int(clip)
        )

    def axpy(self, alpha, max_norm, clip):
        p = self.ptrs
        self.lib._lib.axpy(*self._c(), p["g"], p["p"], alpha, max_norm, int(clip))


_CACHE: dict[str, CLib | None] = {}


def load(cc: str | None = None) -> CLib | None:
    """Compiles and loads the kernels; ``None`` if no working C compiler is found."""
    if "lib" in _CACHE:
        return _CACHE["lib"]
    cc = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    lib = None
    if cc:
        tmp = Path(tempfile.mkdtemp(prefix="adaptx_bench_c_"))
        src = tmp / "floor.c"
        src.write_text(SOURCE)
        base = ["-O3", "-march=native", "-fno-math-errno", "-std=c11", "-shared", "-fPIC"]
        for openmp, extra in ((True, ["-fopenmp"]), (False, ["-fopenmp-simd"]), (False, [])):
            out = tmp / f"floor{'_omp' if openmp else ''}.so"
            cmd = [cc, *base, *extra, str(src), "-o", str(out), "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                lib = CLib(out, openmp, base + extra)
                break
            except (subprocess.SubprocessError, OSError):
                continue
    _CACHE["lib"] = lib
    return lib
