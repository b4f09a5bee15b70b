"""Optional native CPU kernels: the optimiser's row-sparse Adagrad step, the softmax
cross-entropy of a training step's score rows, the GRU cell's gates forward and back, and
the distinct items of each step of a chunk. Why each exists, with its measured effect:
docs/benchmarks.md.

- ``adagrad_rows`` updates the touched rows of a table and its accumulator where they lie,
  in one pass (torch has no in-place row update: its path gathers the rows, runs the fused
  kernel on the copies and writes both back). Same arithmetic as torch's fused CPU
  Adagrad, so the same bits at any thread count (tests/test_native.py).
- ``softmax_xent_rows`` makes two passes per score row while it sits in cache (maximum;
  exp and sum) and leaves the normalisation to the caller's row weights; its exp is
  Cephes' single-precision polynomial, so results match torch's to rounding.
- ``gru_forward`` / ``gru_backward``: the GRU cell in one pass over the rows each way
  (sigmoid and tanh from the same exp, within 2 float32 epsilons); rows are independent
  (evaluation steps subsets of them, evaluation/replay.py). ``core._NativeGRUCell`` wraps
  them as an autograd Function, so they never sit on an autograd path without a backward.
- ``distinct_rows`` marks each row's values in a bitset and reads them back in order,
  instead of sorting.

The kernels are plain C (no torch headers), compiled on first use with the system C
compiler (``$CC``, else ``cc``) into a per-user cache and loaded with ctypes. Large calls
split their rows over torch's OpenMP threads (``_openmp_flags``). Where no compiler is
found, the build fails or ``HRNN_LIT_NATIVE=0`` is set, ``load()`` returns None and the
callers keep the torch path.
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
#include <stdlib.h>
#include <string.h>

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
    if (i + 4 < m) /* the rows 4 ahead, into cache (the tables are larger than it) */
      for (int64_t j = 0; j < d; j += 16) {
        __builtin_prefetch(p + idx[i + 4] * d + j, 1);
        __builtin_prefetch(acc + idx[i + 4] * d + j, 1);
      }
    for (int64_t j = 0; j < d; j++) {
      float gj = wd != 0.0f ? fmaf(pr[j], wd, gr[j]) : gr[j];
      float a = fmaf(gj, gj, ar[j]);
      ar[j] = a;
      pr[j] = pr[j] - (lr * gj) / (sqrtf(a) + eps);
    }
  }
  return 0;
}

/* The sorted distinct values of each row of x [t, w] (values in [0, n)), from a bitset of
   n bits per thread: row i's values go to values[offsets[i] .. offsets[i + 1]) (values has
   room for t * w), each entry's index among them to inverse [t, w], and, where counts is
   not NULL, each value's number of entries to counts (aligned with values), entry j of
   row i counting valid[i * b + j] for j < b (valid not NULL), else 1. Returns 0; -1
   (nothing written) if a value is outside [0, n); -2 if scratch memory is not there. */
CLONES
int distinct_rows(const int64_t *x, int64_t t, int64_t w, int64_t n, const uint8_t *valid,
                  int64_t b, int64_t *values, int64_t *offsets, int64_t *inverse,
                  int64_t *counts) {
  for (int64_t i = 0; i < t * w; i++)
    if (x[i] < 0 || x[i] >= n) return -1;
  int failed = 0;
  int64_t words = n / 64 + 1;
#pragma omp parallel if (t * w >= 32768)
  {
    uint64_t *bits = calloc(words, sizeof *bits);
    int32_t *rank = malloc(n * sizeof *rank);
    if (!bits || !rank) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < t; i++) {
        const int64_t *xr = x + i * w;
        int64_t *vr = values + i * w, *ir = inverse + i * w, k = 0;
        for (int64_t j = 0; j < w; j++) bits[xr[j] >> 6] |= 1ull << (xr[j] & 63);
        for (int64_t q = 0; q < words; q++)
          for (uint64_t m = bits[q]; m; m &= m - 1) {
            int64_t v = q * 64 + __builtin_ctzll(m);
            rank[v] = (int32_t)k;
            vr[k++] = v;
          }
        for (int64_t j = 0; j < k; j++) bits[vr[j] >> 6] = 0;
        for (int64_t j = 0; j < w; j++) ir[j] = rank[xr[j]];
        offsets[i + 1] = k;
        if (counts) {
          int64_t *cr = counts + i * w;
          for (int64_t j = 0; j < k; j++) cr[j] = 0;
          for (int64_t j = 0; j < w; j++) cr[ir[j]] += (valid && j < b) ? valid[i * b + j] : 1;
        }
      }
    }
    free(bits);
    free(rank);
  }
  if (failed) return -2;
  offsets[0] = 0;
  for (int64_t i = 0; i < t; i++) { /* rows to their places (left moves: in order) */
    int64_t k = offsets[i + 1], at = offsets[i];
    memmove(values + at, values + i * w, k * sizeof *values);
    if (counts) memmove(counts + at, counts + i * w, k * sizeof *counts);
    offsets[i + 1] = at + k;
  }
  return 0;
}

/* exp(x) for x <= 0: Cephes' expf polynomial (within 2 ulp); 0 below -87 (no denormals). */
static inline float exp_nonpos(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
  float r = fmaf(k, -0.693359375f, xc);
  r = fmaf(k, 2.12194440e-4f, r);
  float q = 1.9875691500e-4f;
  q = fmaf(q, r, 1.3981999507e-3f);
  q = fmaf(q, r, 8.3334519073e-3f);
  q = fmaf(q, r, 4.1665795894e-2f);
  q = fmaf(q, r, 1.6666665459e-1f);
  q = fmaf(q, r, 5.0000001201e-1f);
  q = fmaf(q, r * r, r) + 1.0f;
  int32_t bits = ((int32_t)k + 127) << 23; /* 2^k */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : q * scale;
}

#define LANES 16 /* partial maxima and sums: one vector, the same order on every target */

/* Softmax cross-entropy of the rows of y [b, m] (row-major) with logits y + bias (bias
   [m], or NULL for none) and target columns target[b]. Overwrites row i of y with
   e = exp(logit - max) and subtracts the row's sum s from e[target], so that the gradient
   of the row's loss is y[i] / s; writes sums[i] = s and row_loss[i] = max + log s -
   y[i, target] (the score before the bias). Returns 0, or -1 (nothing written) if a target
   is outside [0, m). */
CLONES
int softmax_xent_rows(float *y, const float *bias, const int64_t *target, int64_t b,
                      int64_t m, float *sums, float *row_loss) {
  for (int64_t i = 0; i < b; i++)
    if (target[i] < 0 || target[i] >= m) return -1;
#pragma omp parallel for schedule(static) if (b * m >= 65536)
  for (int64_t i = 0; i < b; i++) {
    float *row = y + i * m;
    float pos = row[target[i]], top = -INFINITY, s = 0.0f;
    float mx[LANES], sm[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;
    if (bias)
      for (int64_t j = 0; j < m; j++) row[j] += bias[j];
    int64_t j = 0;
    for (; j + LANES <= m; j += LANES)
      for (int l = 0; l < LANES; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
    for (int l = 0; j + l < m; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
    for (int l = 0; l < LANES; l++) top = mx[l] > top ? mx[l] : top;
    for (j = 0; j + LANES <= m; j += LANES)
      for (int l = 0; l < LANES; l++) {
        float e = exp_nonpos(row[j + l] - top);
        row[j + l] = e;
        sm[l] += e;
      }
    for (int l = 0; j + l < m; l++) {
      float e = exp_nonpos(row[j + l] - top);
      row[j + l] = e;
      sm[l] += e;
    }
    for (int l = 0; l < LANES; l++) s += sm[l];
    row[target[i]] -= s;
    sums[i] = s;
    row_loss[i] = top + logf(s) - pos;
  }
  return 0;
}
static inline float sigmoid_f(float x) {
  float e = exp_nonpos(x < 0.0f ? x : -x); /* exp(-|x|) */
  float d = 1.0f / (1.0f + e);
  return x < 0.0f ? e * d : d;
}

/* tanh: Cephes' tanhf (odd polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1)). */
static inline float tanh_f(float x) {
  float a = x < 0.0f ? -x : x, x2 = x * x;
  float q = -5.70498872745e-3f;
  q = fmaf(q, x2, 2.06390887954e-2f);
  q = fmaf(q, x2, -5.37397155531e-2f);
  q = fmaf(q, x2, 1.33314422036e-1f);
  q = fmaf(q, x2, -3.33332819422e-1f);
  float small = fmaf(q * x2, x, x);
  float e = exp_nonpos(-2.0f * a);
  float big = (1.0f - e) / (1.0f + e);
  big = x < 0.0f ? -big : big;
  return a < 0.625f ? small : big;
}

/* One row of gru_forward (restrict: the pointers never alias, so the loops vectorise). */
static inline void gru_forward_row(const float *restrict gi, const float *restrict gh,
                                   const float *restrict h, int64_t k, float *restrict h_new,
                                   float *restrict rz, float *restrict n) {
  for (int64_t j = 0; j < 2 * k; j++) rz[j] = sigmoid_f(gi[j] + gh[j]);
  for (int64_t j = 0; j < k; j++) {
    float nj = tanh_f(fmaf(rz[j], gh[2 * k + j], gi[2 * k + j]));
    n[j] = nj;
    h_new[j] = fmaf(rz[k + j], h[j] - nj, nj);
  }
}

/* GRU cell (gate order r, z, n) on rows of gi, gh [rows, 3k] (biases included) and
   h [rows, k]: rz [rows, 2k] = sigmoid(gi + gh) of the first 2k columns,
   n = tanh(gi_n + r gh_n), h_new = n + z (h - n). */
CLONES
void gru_forward(const float *gi, const float *gh, const float *h, int64_t rows, int64_t k,
                 float *h_new, float *rz, float *n) {
#pragma omp parallel for schedule(static) if (rows * k >= 8192)
  for (int64_t i = 0; i < rows; i++)
    gru_forward_row(gi + i * 3 * k, gh + i * 3 * k, h + i * k, k, h_new + i * k,
                    rz + i * 2 * k, n + i * k);
}

/* One row of gru_backward. */
static inline void gru_backward_row(const float *restrict dh, const float *restrict h,
                                    const float *restrict rz, const float *restrict n,
                                    const float *restrict gh, int64_t k, float *restrict da,
                                    float *restrict dgh) {
  const float *restrict r = rz, *restrict z = rz + k, *restrict h_n = gh + 2 * k;
  for (int64_t j = 0; j < k; j++) {
    float an = dh[j] * (1.0f - z[j]) * (1.0f - n[j] * n[j]);
    float az = dh[j] * (h[j] - n[j]) * (z[j] * (1.0f - z[j]));
    float ar = an * h_n[j] * (r[j] * (1.0f - r[j]));
    da[j] = ar, da[k + j] = az, da[2 * k + j] = an;
    dgh[j] = ar, dgh[k + j] = az, dgh[2 * k + j] = an * r[j];
  }
}

/* The gates' pre-activation gradients da, dgh [rows, 3k] from d h_new [rows, k]:
   a_n = dh (1 - z)(1 - n^2), a_z = dh (h - n) z (1 - z), a_r = a_n gh_n r (1 - r);
   da = [a_r, a_z, a_n], dgh = [a_r, a_z, a_n r]. */
CLONES
void gru_backward(const float *dh, const float *h, const float *rz, const float *n,
                  const float *gh, int64_t rows, int64_t k, float *da, float *dgh) {
#pragma omp parallel for schedule(static) if (rows * k >= 8192)
  for (int64_t i = 0; i < rows; i++)
    gru_backward_row(dh + i * k, h + i * k, rz + i * 2 * k, n + i * k, gh + i * 3 * k, k,
                     da + i * 3 * k, dgh + i * 3 * k);
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
            f"hrnn_lit: native CPU kernels unavailable ({e}); using torch ops "
            "(slower CPU training; set HRNN_LIT_NATIVE=0 to silence)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    f = lib.adagrad_rows
    f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_float] * 3
    f.restype = ctypes.c_int
    f = lib.softmax_xent_rows
    f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
    f.restype = ctypes.c_int
    f = lib.distinct_rows
    f.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]
    f.argtypes += [ctypes.c_void_p] * 4
    f.restype = ctypes.c_int
    f = lib.gru_forward
    f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3
    f.restype = None
    f = lib.gru_backward
    f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
    f.restype = None
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


def softmax_xent(
    y: Tensor, target: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """Softmax cross-entropy of the rows of y [B, M] (CPU float32, contiguous; overwritten)
    with logits y + bias [M] and target columns target [B] (int64): (row losses [B], row
    sums s [B]), with y set to the rows' loss gradients times s. None (y untouched) where
    the library is unavailable or the tensors are not of that kind."""
    if not (
        _plain(y)
        and y.dim() == 2
        and target.dtype == torch.int64
        and target.shape == (y.shape[0],)
        and (bias is None or (_plain(bias) and bias.shape == (y.shape[1],)))
    ):
        return None
    lib = load()
    if lib is None:
        return None
    B, M = y.shape
    target = target.contiguous()
    sums, row_loss = y.new_empty(B), y.new_empty(B)
    rc = lib.softmax_xent_rows(
        y.data_ptr(), None if bias is None else bias.data_ptr(), target.data_ptr(), B, M,
        sums.data_ptr(), row_loss.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise IndexError(f"softmax_xent_rows: a target column is outside [0, {M})")
    return row_loss, sums


def _plain(*tensors: Tensor) -> bool:
    """CPU float32, contiguous."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def gru_supported(gi: Tensor, gh: Tensor, h: Tensor) -> bool:
    """Whether ``gru_forward`` takes these tensors (CPU float32 contiguous, gi and gh
    [R, 3K] for h [R, K]) and the library is available."""
    R, K = h.shape
    return _plain(gi, gh, h) and gi.shape == gh.shape == (R, 3 * K) and load() is not None


def gru_forward(gi: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """GRU cell on gi, gh [R, 3K] (biases included) and h [R, K]: (h_new [R, K],
    sigmoid gates rz [R, 2K], candidate n [R, K]) as ``core.gru_gates`` defines them. None
    where the library is unavailable or the tensors are not CPU float32 contiguous."""
    if not gru_supported(gi, gh, h):
        return None
    R, K = h.shape
    lib = load()
    h_new, rz, n = h.new_empty(R, K), h.new_empty(R, 2 * K), h.new_empty(R, K)
    lib.gru_forward(
        gi.data_ptr(), gh.data_ptr(), h.data_ptr(), R, K, h_new.data_ptr(), rz.data_ptr(),
        n.data_ptr(),
    )  # fmt: skip
    return h_new, rz, n


def gru_backward(
    dh: Tensor, h: Tensor, rz: Tensor, n: Tensor, gh: Tensor
) -> tuple[Tensor, Tensor] | None:
    """The gates' pre-activation gradients (d gi, d gh) [R, 3K] of ``gru_forward`` from
    d h_new [R, K], the previous state h, its gates rz and n and the hidden projection gh.
    None where the library is unavailable or the tensors are not CPU float32 contiguous."""
    R, K = h.shape
    if not (
        _plain(dh, h, rz, n, gh)
        and dh.shape == n.shape == (R, K)
        and rz.shape == (R, 2 * K)
        and gh.shape == (R, 3 * K)
    ):
        return None
    lib = load()
    if lib is None:
        return None
    da, dgh = h.new_empty(R, 3 * K), h.new_empty(R, 3 * K)
    lib.gru_backward(
        dh.data_ptr(), h.data_ptr(), rz.data_ptr(), n.data_ptr(), gh.data_ptr(), R, K,
        da.data_ptr(), dgh.data_ptr(),
    )  # fmt: skip
    return da, dgh


def distinct_rows(
    x: Tensor, n: int, valid: Tensor | None = None, counts: bool = False
) -> tuple[Tensor, Tensor, list[int], Tensor | None] | None:
    """``torch.unique(x[t], return_inverse=True)`` of every row of x [T, W] (CPU int64,
    values in [0, n)): (the rows' sorted distinct values concatenated, the inverse [T, W],
    the rows' offsets into the values, and with ``counts`` each value's number of entries in
    its row, an entry j < B counting valid[t, j] (valid [T, B] bool) where given). From a
    bitset per row, not a sort: each row scans n / 64 words, so beyond n = 512 W a sort is
    faster. None there, where the library is unavailable, x is not CPU int64 or there is
    no scratch memory."""
    if not (x.device.type == "cpu" and x.dtype == torch.int64 and x.dim() == 2):
        return None
    if n > 512 * max(x.shape[1], 1):
        return None
    if valid is not None and not (valid.dtype == torch.bool and valid.shape[0] == x.shape[0]):
        return None
    lib = load()
    if lib is None:
        return None
    T, W = x.shape
    x = x.contiguous()
    values, inverse = x.new_empty(T * W), x.new_empty(T, W)
    offsets = torch.empty(T + 1, dtype=torch.int64)
    cnt = x.new_empty(T * W) if counts else None
    v = None if valid is None else valid.contiguous()
    rc = lib.distinct_rows(
        x.data_ptr(), T, W, n, None if v is None else v.data_ptr(),
        0 if v is None else v.shape[1], values.data_ptr(), offsets.data_ptr(),
        inverse.data_ptr(), None if cnt is None else cnt.data_ptr(),
    )  # fmt: skip
    if rc == -1:
        raise IndexError(f"distinct_rows: a value is outside [0, {n})")
    if rc != 0:  # no scratch memory for the bitset
        return None
    off = offsets.tolist()
    return values[: off[-1]], inverse, off, None if cnt is None else cnt[: off[-1]]
