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
  (evaluation steps subsets of them, evaluation/replay.py). ``ops.gru._NativeGRUCell``
  wraps them as an autograd Function, so they never sit on an autograd path without a
  backward.
- ``distinct_rows`` marks each row's values in a bitset and reads them back in order,
  instead of sorting.

The kernels are plain C (no torch headers) in ``native_kernels.c`` beside this file
(shipped as package data), compiled on first use with the system C compiler (``$CC``, else
``cc``) into a per-user cache keyed by the source's text, flags, compiler and platform, and
loaded with ctypes. Large calls
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

SOURCE_FILE = Path(__file__).with_name("native_kernels.c")  # package data
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
    """The compiled library of ``SOURCE_FILE``, from the cache when the same source text,
    flags, compiler and platform built it before; written atomically (concurrent processes
    may race)."""
    flags = FLAGS + _openmp_flags()
    source = SOURCE_FILE.read_text()  # (in the key: an edited source builds anew)
    key = hashlib.sha256(
        "\0".join([source, *flags, cc, platform.machine(), platform.system()]).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"rows-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "rows.c", Path(tmp) / "rows.so"
        src.write_text(source)
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
