"""Optional native CPU kernel for the optimiser's row-sparse Adagrad step.

torch has no in-place "update these rows" kernel: the torch path gathers the touched rows of
a table and of its accumulator, runs the fused Adagrad kernel on the copies and writes both
back with ``index_copy_`` (an element-wise kernel, ~2.5x slower than the gather). For (a)'s
output table that is four passes over ~2,000 random 400-byte rows and ~1.2 ms of a 5 ms step
at 1 thread. ``adagrad_rows`` updates the rows where they lie, in one pass.

The kernel is a few lines of plain C (no torch headers), compiled on first use with the
system C compiler (``$CC``, else ``cc``; ~0.2 s) into a per-user cache and loaded with
ctypes. Large updates split their rows over torch's OpenMP threads (``_openmp_flags``).
Its arithmetic is that of torch's fused CPU Adagrad (fused multiply-adds where torch's
build has them), so both paths give the same bits at any thread count
(tests/test_native.py). Where no compiler is found, the build fails or
``HRNN_LIT_NATIVE=0`` is set, ``load()`` returns None and the optimiser keeps the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Adagrad on rows idx[0..m) of p and acc ([n, d], row-major), gradient rows g [m, d]:
   g += wd p; acc += g^2; p -= lr g / (sqrt(acc) + eps). Returns 0, or -1 (nothing
   written) if an index is outside [0, n). Rows must be distinct. */
CLONES
int adagrad_rows(float *p, float *acc, const float *g, const int64_t *idx, int64_t m,
                 int64_t n, int64_t d, float lr, float eps, float wd) {
  for (int64_t i = 0; i < m; i++)
    if (idx[i] < 0 || idx[i] >= n) return -1;
#pragma omp parallel for schedule(static) if (m * d >= 32768)
  for (int64_t i = 0; i < m; i++) {
    float *pr = p + idx[i] * d, *ar = acc + idx[i] * d;
    const float *gr = g + i * d;
    for (int64_t j = 0; j < d; j++) {
      float gj = wd != 0.0f ? fmaf(pr[j], wd, gr[j]) : gr[j];
      float a = fmaf(gj, gj, ar[j]);
      ar[j] = a;
      pr[j] = pr[j] - (lr * gj) / (sqrtf(a) + eps);
    }
  }
  return 0;
}
"""
FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch runs on GNU OpenMP (its ``libgomp.so.1`` is loaded in
    this process): the library then shares torch's runtime and threads (the same soname
    resolves to the loaded copy) and splits its rows over ``torch.get_num_threads()``.
    Elsewhere none (one thread): a second OpenMP runtime's idle threads would take CPU
    from torch's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return ["-fopenmp"] if "/libgomp.so.1" in maps else []


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "hrnn_lit" / "native"


def _build(cc: str) -> Path:
    """The compiled library, from the cache when the same source, flags, compiler and
    platform built it before; written atomically (concurrent processes may race)."""
    flags = FLAGS + _openmp_flags()
    key = hashlib.sha256(
        "\0".join([SOURCE, *flags, cc, platform.machine(), platform.system()]).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"rows-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "rows.c", Path(tmp) / "rows.so"
        src.write_text(SOURCE)
        res = subprocess.run(
            [cc, *flags, str(src), "-o", str(out), "-lm"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} failed: {msg[0] if msg else res.returncode}")
        os.replace(out, lib)
    return lib


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The native library, or None (with one warning saying why) where it cannot be built
    or ``HRNN_LIT_NATIVE=0``."""
    if os.environ.get("HRNN_LIT_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or "cc"
    try:
        if shutil.which(cc) is None:
            raise RuntimeError(f"no C compiler {cc!r} on PATH")
        path = _build(cc)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # a damaged cached build: the next load rebuilds
            raise
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"hrnn_lit: native row-sparse Adagrad unavailable ({e}); using torch ops "
            "(slower CPU training; set HRNN_LIT_NATIVE=0 to silence)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    f = lib.adagrad_rows
    f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_float] * 3
    f.restype = ctypes.c_int
    return lib


def supports(p: Tensor, acc: Tensor, idx: Tensor, g: Tensor) -> bool:
    """Whether ``adagrad_rows`` takes these tensors (CPU float32 tables, int64 rows)."""
    return (
        p.device.type == "cpu"
        and p.dtype == acc.dtype == g.dtype == torch.float32
        and idx.dtype == torch.int64
        and p.dim() == 2
        and p.shape == acc.shape
        and g.shape == (idx.numel(), p.shape[1])
        and p.is_contiguous()
        and acc.is_contiguous()
    )


def adagrad_rows(
    p: Tensor, acc: Tensor, idx: Tensor, g: Tensor, lr: float, eps: float, wd: float
) -> bool:
    """torch's fused Adagrad on rows ``idx`` (distinct) of table p [n, d] and its
    accumulator acc with gradient rows g [m, d], in place. False (nothing done) where the
    library is unavailable; check ``supports`` first."""
    lib = load()
    if lib is None:
        return False
    idx, g = idx.contiguous(), g.contiguous()
    n, d = p.shape
    rc = lib.adagrad_rows(
        p.data_ptr(), acc.data_ptr(), g.data_ptr(), idx.data_ptr(), idx.numel(), n, d,
        lr, eps, wd,
    )  # fmt: skip
    if rc != 0:
        raise IndexError(f"adagrad_rows: a row index is outside [0, {n})")
    return True
