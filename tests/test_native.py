"""The native kernels: row-sparse Adagrad (the same bits as torch's fused kernel on
gathered rows) and the softmax cross-entropy rows (float64 references, to float32
rounding); bounds checked, cached, and a torch fallback where they cannot be built."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hrnn_lit.ops import native
from hrnn_lit.ops.optim import SparseRowOptimizer


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh ``native.load`` with its cache under tmp_path; the usual one afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HRNN_LIT_NATIVE", raising=False)
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def torch_rows(p, acc, idx, g, lr, eps, wd):
    """The torch path: gather, fused Adagrad on the copies, write back."""
    pr, ar = p.index_select(0, idx), acc.index_select(0, idx)
    torch._fused_adagrad_(
        [pr], [g.clone()], [ar], [torch.zeros(())], lr=lr, lr_decay=0.0, weight_decay=wd,
        eps=eps, maximize=False,
    )  # fmt: skip
    p.index_copy_(0, idx, pr)
    acc.index_copy_(0, idx, ar)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch's threads (the kernel splits large updates over them, under OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("d", [1, 7, 16, 100, 300])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_same_bits_as_torch_fused_adagrad(fresh, threads, d, wd):
    if native.load() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(d)
    n = 2000  # 1500 rows x d >= 32768 elements: the split path for d >= 22
    p = torch.randn(n, d, generator=gen)
    acc = torch.rand(n, d, generator=gen) * 3
    ref_p, ref_acc, p0 = p.clone(), acc.clone(), p.clone()
    for step in range(3):
        m = (123, 1500, 1)[step]
        idx = torch.randperm(n, generator=gen)[:m].sort().values
        g = torch.randn(m, d, generator=gen) * 10 ** (step - 1)
        assert native.supports(p, acc, idx, g)
        assert native.adagrad_rows(p, acc, idx, g, 0.1, 1e-6, wd)
        torch_rows(ref_p, ref_acc, idx, g, 0.1, 1e-6, wd)
        assert torch.equal(p, ref_p) and torch.equal(acc, ref_acc)
    assert not torch.equal(p[idx], p0[idx])


def test_out_of_range_row_raises_and_writes_nothing(fresh):
    if native.load() is None:
        pytest.skip("no C compiler here")
    p, acc = torch.randn(10, 4), torch.zeros(10, 4)
    before = p.clone()
    for bad in (10, -1):
        idx = torch.tensor([0, 3, bad])
        with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
            native.adagrad_rows(p, acc, idx, torch.ones(3, 4), 0.1, 1e-6, 0.0)
        assert torch.equal(p, before) and torch.equal(acc, torch.zeros(10, 4))


def test_unsupported_tensors_are_left_to_torch():
    p, acc, idx, g = torch.randn(10, 4), torch.zeros(10, 4), torch.tensor([1, 2]), torch.ones(2, 4)
    assert native.supports(p, acc, idx, g)
    assert not native.supports(p.double(), acc.double(), idx, g.double())
    assert not native.supports(p, acc, idx.int(), g)
    assert not native.supports(p.T, acc.T, idx, torch.ones(2, 10))  # not row-major
    assert not native.supports(p, acc, idx, torch.ones(3, 4))


def xent_reference(y, target, bias):
    """(row losses, gradient rows) in float64: softmax(y + bias) - one-hot(target)."""
    y = y.double()
    logits = y if bias is None else y + bias.double()
    lse = torch.logsumexp(logits, dim=1)
    rows = torch.arange(y.shape[0])
    grad = torch.softmax(logits, dim=1)
    grad[rows, target] -= 1.0
    return lse - y[rows, target], grad


@pytest.mark.parametrize("m", [1, 15, 16, 17, 100, 2176])
def test_softmax_xent_matches_float64_within_float32_rounding(fresh, threads, m):
    if native.load() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(m)
    B = 64  # 64 x 2176 rows: split over the threads
    y = torch.randn(B, m, generator=gen) * 8
    y[0] = 0.0  # a flat row
    y[1, 0] = 1e4 if m > 1 else 0.0  # exp underflows for every other column
    target = torch.randint(0, m, (B,), generator=gen)
    bias = torch.zeros(m)
    bias[m // 2] = -1e9  # a masked column
    if m > 2:
        bias[1] = math.log(3.0)  # a column that occurs 3 times
    for b in (None, bias):
        got = y.clone()
        row_loss, sums = native.softmax_xent(got, target, b)
        ref_loss, ref_grad = xent_reference(y, target, b)
        torch.testing.assert_close(row_loss.double(), ref_loss, rtol=2e-6, atol=1e-5)
        grad = got.double() / sums.double()[:, None]
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
        assert (sums >= 1).all()
    if m > 1:
        keep = target != m // 2  # a masked column's softmax weight is exactly 0
        assert (got[keep, m // 2] == 0).all()


def test_softmax_xent_gives_the_same_bits_at_any_thread_count(fresh):
    if native.load() is None:
        pytest.skip("no C compiler here")
    y = torch.randn(128, 2176, generator=torch.Generator().manual_seed(0)) * 5
    target = torch.arange(128)
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = y.clone()
            runs.append((got, *native.softmax_xent(got, target)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_softmax_xent_checks_its_targets_and_inputs(fresh):
    if native.load() is None:
        pytest.skip("no C compiler here")
    y = torch.randn(3, 5)
    before = y.clone()
    for bad in (5, -1):
        with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
            native.softmax_xent(y, torch.tensor([0, bad, 1]))
        assert torch.equal(y, before)
    target = torch.tensor([0, 1, 2])
    assert native.softmax_xent(y.double(), target) is None  # the torch path's
    assert native.softmax_xent(y.T.contiguous().T, target) is None
    assert native.softmax_xent(y, target.int()) is None
    assert native.softmax_xent(y, target, torch.zeros(4)) is None
    assert torch.equal(y, before)


def gru_reference(gi, gh, h):
    """(h_new, rz, n) in float64 with torch's ops."""
    gi, gh, h = gi.double(), gh.double(), h.double()
    K = h.shape[1]
    rz = torch.sigmoid(gi[:, : 2 * K] + gh[:, : 2 * K])
    n = torch.tanh(gi[:, 2 * K :] + rz[:, :K] * gh[:, 2 * K :])
    return n + rz[:, K:] * (h - n), rz, n


def gru_inputs(R: int, K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gi = torch.randn(R, 3 * K, generator=gen) * 4
    gh = torch.randn(R, 3 * K, generator=gen) * 4
    gh[0] = 0.0  # row 0's gate arguments are gi's: tiny, at tanh's branch point, saturated
    gi[0, 2 * K : 2 * K + 6] = torch.tensor([1e-7, -3e-5, 0.6249, -0.6251, 30.0, -100.0])[:K]
    gi[0, : min(6, 2 * K)] = torch.tensor([1e-7, -3e-5, 0.5, -200.0, 90.0, 0.0])[: 2 * K]
    return gi, gh, torch.randn(R, K, generator=gen)


@pytest.mark.parametrize("K", [1, 5, 16, 100])
def test_gru_forward_rounds_like_torch(fresh, K):
    """Each gate within 2 float32 epsilons (relative) of float64 on the same float32
    arguments (torch's own float32 sigmoid and tanh: within 1), h_new to 1e-5."""
    if native.load() is None:
        pytest.skip("no C compiler here")
    gi, gh, h = gru_inputs(64, K)
    got = native.gru_forward(gi, gh, h)
    ref = gru_reference(gi, gh, h)
    # the gates' arguments as float32 sums (what both float32 paths see), then float64
    rz_arg = gi[:, : 2 * K] + gh[:, : 2 * K]
    n_arg = torch.addcmul(gi[:, 2 * K :], got[1][:, :K], gh[:, 2 * K :])
    eps = torch.finfo(torch.float32).eps
    for x, ref_x in ((got[1], torch.sigmoid(rz_arg.double())), (got[2], n_arg.double().tanh())):
        torch.testing.assert_close(x.double(), ref_x, rtol=2 * eps, atol=1e-30)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=0, atol=1e-5)
    assert got[2][0, 0] == pytest.approx(1e-7, rel=1e-6)  # tanh(x) = x to the last bits
    assert ((got[1] >= 0) & (got[1] <= 1)).all() and (got[2].abs() <= 1).all()


def test_gru_backward_matches_torch_ops(fresh):
    """The kernel's gate gradients equal float64 autograd through the cell's torch ops."""
    if native.load() is None:
        pytest.skip("no C compiler here")
    gi, gh, h = gru_inputs(32, 7)
    dh = torch.randn(32, 7, generator=torch.Generator().manual_seed(1))
    _, rz, n = native.gru_forward(gi, gh, h)
    got = native.gru_backward(dh, h, rz, n, gh)
    ref = [x.double().requires_grad_() for x in (gi, gh)]
    K = h.shape[1]
    r_z = torch.sigmoid(ref[0][:, : 2 * K] + ref[1][:, : 2 * K])
    cand = torch.tanh(ref[0][:, 2 * K :] + r_z[:, :K] * ref[1][:, 2 * K :])
    h_new = (1 - r_z[:, K:]) * cand + r_z[:, K:] * h.double()
    want = torch.autograd.grad(h_new, ref, dh.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    assert native.gru_backward(dh.double(), h, rz, n, gh) is None


def test_gru_rows_do_not_depend_on_the_other_rows_or_threads(fresh):
    """Evaluation steps subsets of the rows (evaluation/loop.py): a row's bits must not
    depend on which rows it is stepped with, nor on the thread count (the kernels split
    large calls over threads)."""
    if native.load() is None:
        pytest.skip("no C compiler here")
    gi, gh, h = gru_inputs(1024, 100)  # 102,400 elements: the threaded path
    dh = torch.randn(1024, 100, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fwd = native.gru_forward(gi, gh, h)
            runs.append((*fwd, *native.gru_backward(dh, h, fwd[1], fwd[2], gh)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    rows = torch.tensor([3, 500, 1023])
    sub = native.gru_forward(gi[rows], gh[rows], h[rows])
    assert all(torch.equal(a, b[rows]) for a, b in zip(sub, runs[0]))


def test_gru_kernels_leave_unsupported_tensors_to_torch(fresh):
    gi, gh, h = gru_inputs(4, 3)
    assert native.gru_forward(gi.double(), gh.double(), h.double()) is None
    assert native.gru_forward(gi[:, :6], gh[:, :6], h) is None  # wrong width
    assert native.gru_forward(gi, gh, torch.randn(4, 6)[:, :3]) is None  # not contiguous


@pytest.mark.parametrize("shape", [(64, 2176, 20_000), (5, 3, 1), (4, 400, 200_000), (3, 0, 5)])
def test_distinct_rows_equals_torch_unique_per_row(fresh, threads, shape):
    if native.load() is None:
        pytest.skip("no C compiler here")
    T, W, n = shape
    gen = torch.Generator().manual_seed(W)
    x = torch.randint(0, n, (T, W), generator=gen)
    if W:
        x[0] = n - 1  # one value, at the top of the range
    valid = torch.rand(T, min(W, 9), generator=gen) < 0.6
    values, inverse, offsets, counts = native.distinct_rows(x, n, valid, counts=True)
    assert len(offsets) == T + 1 and offsets[0] == 0 and offsets[-1] == values.numel()
    for t in range(T):
        ref_values, ref_inverse = torch.unique(x[t], return_inverse=True)
        assert torch.equal(values[offsets[t] : offsets[t + 1]], ref_values)
        assert torch.equal(inverse[t], ref_inverse)
        weight = torch.ones(W, dtype=torch.long)
        weight[: valid.shape[1]] = valid[t]
        ref_counts = torch.zeros(ref_values.numel(), dtype=torch.long)
        ref_counts.index_add_(0, ref_inverse, weight)
        assert torch.equal(counts[offsets[t] : offsets[t + 1]], ref_counts)
    assert native.distinct_rows(x, n)[3] is None


def test_distinct_rows_checks_its_values(fresh):
    if native.load() is None:
        pytest.skip("no C compiler here")
    for bad in (10, -1):
        with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
            native.distinct_rows(torch.tensor([[1, 2], [bad, 3]]), 10)
    assert native.distinct_rows(torch.tensor([[1, 2]], dtype=torch.int32), 10) is None
    # beyond 512 values per entry of a row a sort is faster: left to torch
    assert native.distinct_rows(torch.tensor([[1, 2]]), 1024) is not None
    assert native.distinct_rows(torch.tensor([[1, 2]]), 1025) is None


def train(steps: int = 8, wd: float = 0.0):
    """A sparse table and a dense layer under SparseRowOptimizer (plain Adagrad)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    lin = torch.nn.Linear(8, 1)
    opt = SparseRowOptimizer(
        list(emb.parameters()) + list(lin.parameters()), lr=0.1, weight_decay=wd
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 20, (12,), generator=g)  # repeats; rows 20.. untouched
        opt.zero_grad()
        (lin(emb(idx)) ** 2).sum().backward()
        opt.step()
    return emb.weight.detach().clone(), lin.weight.detach().clone(), opt


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_optimizer_gives_the_same_bits_with_and_without_native(fresh, monkeypatch, wd):
    if native.load() is None:
        pytest.skip("no C compiler here")
    calls = []
    real = native.adagrad_rows
    monkeypatch.setattr(native, "adagrad_rows", lambda *a: calls.append(1) or real(*a))
    with_native = train(wd=wd)
    assert len(calls) == 8  # every step's table update went native
    monkeypatch.setenv("HRNN_LIT_NATIVE", "0")
    native.load.cache_clear()
    without = train(wd=wd)
    assert len(calls) == 16 and native.load() is None  # asked, declined
    assert torch.equal(with_native[0], without[0]) and torch.equal(with_native[1], without[1])
    assert not torch.equal(with_native[0][:20], torch.nn.Embedding(50, 8).weight[:20])
    assert with_native[2].state_dict()["state"].keys() == without[2].state_dict()["state"].keys()


def test_without_a_compiler_warns_once_and_trains_with_torch_ops(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-hrnn")
    with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler-hrnn'"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None  # cached: no second warning
        emb, _, _ = train()
    monkeypatch.delenv("CC")
    native.load.cache_clear()
    if native.load() is not None:
        assert torch.equal(emb, train()[0])


def test_a_failing_build_warns_and_leaves_no_library(fresh, monkeypatch):
    bad = fresh / "bad.c"
    bad.write_text("this is not C;")
    monkeypatch.setattr(native, "SOURCE_FILE", bad)
    with pytest.warns(RuntimeWarning, match="failed"):
        assert native.load() is None
    assert not list((fresh / "hrnn_lit" / "native").glob("*.so"))


def test_the_c_source_is_a_file_and_its_text_is_in_the_cache_key(fresh, monkeypatch):
    """The kernels' source is the package's .c file (shipped as package data); an edit
    of its text builds a new library instead of loading the old one."""
    assert native.SOURCE_FILE.suffix == ".c" and native.SOURCE_FILE.is_file()
    assert native.SOURCE_FILE.parent == Path(native.__file__).parent
    assert "int adagrad_rows(" in native.SOURCE_FILE.read_text()
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        pytest.skip("no C compiler here")
    lib = native._build(cc)
    edited = fresh / "edited.c"
    edited.write_text(native.SOURCE_FILE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE_FILE", edited)
    other = native._build(cc)
    assert other != lib and other.exists() and lib.exists()


def test_the_build_is_cached(fresh, monkeypatch):
    if native.load() is None:
        pytest.skip("no C compiler here")
    (lib,) = (fresh / "hrnn_lit" / "native").glob("rows-*.so")

    def no_compiler(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    native.load.cache_clear()
    assert native.load() is not None
    assert native._build(os.environ.get("CC") or "cc") == lib


def test_a_damaged_cached_build_is_dropped_and_rebuilt(fresh):
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        pytest.skip("no C compiler here")
    lib = native._build(cc)  # built, not loaded (overwriting a loaded library would crash)
    lib.write_bytes(b"not a shared library")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert native.load() is None
    assert not lib.exists()
    native.load.cache_clear()
    assert native.load() is not None and lib.exists()


def test_processes_building_at_once_all_get_the_library(fresh):
    """A first multi-process run (e.g. DDP) builds in every process at once: each compiles
    in its own temporary folder and moves the result into place atomically."""
    if native.load() is None:
        pytest.skip("no C compiler here")
    for lib in (fresh / "hrnn_lit" / "native").glob("*.so"):
        lib.unlink()  # (loaded here from its old inode; the children build a new one)
    code = "from hrnn_lit.ops import native; import sys; sys.exit(native.load() is None)"
    env = dict(os.environ, XDG_CACHE_HOME=str(fresh))
    procs = [
        subprocess.Popen([sys.executable, "-W", "error", "-c", code], env=env) for _ in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert len(list((fresh / "hrnn_lit" / "native").glob("*.so"))) == 1
    assert not [p for p in (fresh / "hrnn_lit" / "native").iterdir() if p.is_dir()]
