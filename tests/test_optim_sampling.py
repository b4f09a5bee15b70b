"""Sparse-row optimiser against dense references; sampler against popularity^alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrnn_lit.ops.optim import SparseRowOptimizer, clip_grad_norm_
from hrnn_lit.ops.sampling import PopularitySampler


def run_steps(sparse: bool, opt_fn, n_steps: int = 6):
    """A tiny model: an embedding table + a dense layer; the same data for both variants."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, sparse=sparse)
    lin = torch.nn.Linear(4, 1)
    opt = opt_fn(list(emb.parameters()) + list(lin.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        idx = torch.randint(0, 6, (5,), generator=g)  # rows 6.. never touched; repeats
        loss = (lin(emb(idx)) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return emb.weight.detach().clone(), lin.weight.detach().clone()


def test_sparse_adagrad_equals_torch_dense_adagrad():
    ours = run_steps(True, lambda p: SparseRowOptimizer(p, "adagrad", lr=0.1, eps=1e-10))
    ref = run_steps(
        False, lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, initial_accumulator_value=0)
    )
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)


def test_sparse_adam_equals_torch_sparse_adam_on_rows():
    ours = run_steps(True, lambda p: SparseRowOptimizer(p, "adam", lr=0.01, eps=1e-8))

    def ref_opt(params):
        emb_w, lin_w, lin_b = params
        return _Both(
            torch.optim.SparseAdam([emb_w], lr=0.01), torch.optim.Adam([lin_w, lin_b], lr=0.01)
        )

    ref = run_steps(True, ref_opt)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)


class _Both:
    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def brute_momentum_wd(n_steps: int = 6, lr=0.1, mom=0.9, wd=0.01, eps=1e-6):
    """Dense per-row loop of the reference update, applied only to touched rows."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4)
    lin = torch.nn.Linear(4, 1)
    params = [emb.weight, lin.weight, lin.bias]
    acc = [torch.zeros_like(p) for p in params]
    vel = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        idx = torch.randint(0, 6, (5,), generator=g)
        for p in params:
            p.grad = None
        (lin(emb(idx)) ** 2).sum().backward()
        with torch.no_grad():
            for k, p in enumerate(params):
                rows = sorted(set(idx.tolist())) if k == 0 else None
                for r in rows if rows is not None else [None]:
                    sl = (r,) if r is not None else (slice(None),)
                    grad = p.grad[sl] + wd * p[sl]
                    acc[k][sl] += grad * grad
                    upd = lr * grad / (acc[k][sl].sqrt() + eps)
                    vel[k][sl] = mom * vel[k][sl] - upd
                    p[sl] += vel[k][sl]
    return emb.weight.detach(), lin.weight.detach()


def test_sparse_adagrad_momentum_weight_decay_touches_only_rows():
    ours = run_steps(
        True, lambda p: SparseRowOptimizer(p, "adagrad", lr=0.1, momentum=0.9, weight_decay=0.01)
    )
    ref = brute_momentum_wd()
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    untouched = torch.nn.Embedding(20, 4).weight.detach()[6:]
    assert torch.equal(ours[0][6:], untouched), "rows never touched never change"


def test_clip_grad_norm_sparse_and_dense():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    (lin(emb(torch.tensor([0, 0, 2]))) * 100).sum().backward()
    params = [emb.weight, lin.weight, lin.bias]
    total = clip_grad_norm_(params, 1.0)
    assert total > 1.0
    after = torch.stack(
        [emb.weight.grad.coalesce().values().norm(), lin.weight.grad.norm(), lin.bias.grad.norm()]
    ).norm()
    assert after == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sampler_follows_popularity_power(alpha):
    counts = np.array([1, 4, 9, 16, 100, 0, 30])
    sampler = PopularitySampler(counts, alpha)
    torch.manual_seed(0)
    draws = sampler.draw((200_000,))
    freq = torch.bincount(draws, minlength=counts.size).double() / draws.numel()
    expected = counts.astype(float) ** alpha * (counts > 0)
    expected /= expected.sum()
    assert freq[5] == 0, "an item with zero count is never drawn"
    np.testing.assert_allclose(freq.numpy(), expected, atol=0.005)
    assert sampler.draw((3, 7)).shape == (3, 7)


def _counts(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "zipf":  # a long tail, some items never seen
        c = (1e5 / np.arange(1, 3001) ** 1.1).astype(np.int64)
        c[rng.choice(3000, 300, replace=False)] = 0
        return c
    if kind == "huge_range":  # 2000 items within one bucket: no guide table
        return np.r_[np.ones(2000, np.int64), 10**12]
    return rng.integers(0, 50, 5000)


@pytest.mark.parametrize("kind,alpha", [("zipf", 0.5), ("zipf", 1.0), ("zipf", 0.0),
                                        ("flat", 0.5), ("huge_range", 1.0)])  # fmt: skip
def test_sampler_items_equal_the_binary_search_for_every_u(kind, alpha):
    """The guide table gives searchsorted(cdf, u, right=True) for random u and for the
    float32 values at and next to every bucket edge and every item boundary."""
    sampler = PopularitySampler(_counts(kind), alpha)
    cdf = sampler.cdf
    assert (sampler.lo is None) == (kind == "huge_range")
    K = max(sampler.buckets, 1)
    edges = (torch.arange(K + 1, dtype=torch.float64) / K).float()
    points = torch.cat(
        [edges, cdf, torch.rand(1_000_000, generator=torch.Generator().manual_seed(0))]
    )
    up = torch.nextafter(points, torch.tensor(2.0))
    down = torch.nextafter(points, torch.tensor(-1.0))
    u = torch.cat([points, up, down, torch.tensor([0.0])])
    u = u[(u >= 0) & (u < 1)]
    expected = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
    assert torch.equal(sampler.items(u), expected)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_dense_adagrad_equals_the_per_tensor_update(monkeypatch, weight_decay):
    """Dense tensors go through torch's fused CPU Adagrad kernel; the update is the one of
    the per-tensor path (sparse rows are unaffected)."""
    import hrnn_lit.ops.optim as optim

    def make(p):
        return SparseRowOptimizer(p, "adagrad", lr=0.1, weight_decay=weight_decay)

    fused = run_steps(True, make)
    monkeypatch.setattr(optim, "_FUSED", False)
    plain = run_steps(True, make)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_rows_of_our_ops_skip_the_sort_check_and_others_are_coalesced():
    """A row-sparse gradient made by ``ops.tables`` reaches ``.grad`` without its coalesced
    flag; the optimiser recognises its indices as ours (no check), while an index tensor
    with the same values made elsewhere is checked, and unsorted or repeated rows (e.g.
    ``nn.Embedding(sparse=True)``) are summed before the update."""
    from hrnn_lit.ops import optim, tables

    w = torch.nn.Parameter(torch.zeros(6, 2))
    tables.rows(w, torch.tensor([4, 1, 4])).sum().backward()
    assert not w.grad.is_coalesced()
    idx = w.grad._indices()[0]
    assert tables.known_distinct(idx) and idx.tolist() == [1, 4]
    assert not tables.known_distinct(idx.clone())
    assert not tables.known_distinct(torch.tensor([1, 4]))

    emb = torch.nn.Embedding(6, 2, sparse=True)
    emb(torch.tensor([4, 1, 4])).sum().backward()
    rows, values = optim._rows(emb.weight.grad)
    assert rows.tolist() == [1, 4]
    assert values.tolist() == [[1.0, 1.0], [2.0, 2.0]]
