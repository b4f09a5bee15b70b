"""Every training op (hrnn_lit/ops) against plain autograd in float64: values and gradients,
with the C kernels on and off."""

from __future__ import annotations

import pytest
import torch

from hrnn_lit.nets.api import ScoreFactors, linear_scores
from hrnn_lit.ops import native
from hrnn_lit.ops.activations import activation
from hrnn_lit.ops.candidates import chunk_candidates
from hrnn_lit.ops.gru import gru_cell, user_start
from hrnn_lit.ops.losses import LOSSES
from hrnn_lit.ops.optim import _rows
from hrnn_lit.ops.sampled_loss import ranking_loss, sampled_loss
from hrnn_lit.ops.tables import rows

F64 = torch.float64


@pytest.fixture(params=["kernels", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the C kernels where they apply, and with torch's ops only."""
    if request.param == "kernels":
        if native.load() is None:
            pytest.skip("no C compiler here")
    else:
        monkeypatch.setattr(native, "load", lambda: None)
    return request.param


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, inputs, allow_unused=True)
    return [g.to_dense() if g is not None and g.is_sparse else g for g in gs]


def gru_reference(gi, gh, h):
    K = h.shape[1]
    r = torch.sigmoid(gi[:, :K] + gh[:, :K])
    z = torch.sigmoid(gi[:, K : 2 * K] + gh[:, K : 2 * K])
    n = torch.tanh(gi[:, 2 * K :] + r * gh[:, 2 * K :])
    return (1 - z) * n + z * h


def test_gru_cell_equals_float64_autograd(kernels):
    gen = torch.Generator().manual_seed(0)
    gi, gh = torch.randn(7, 3 * 5, generator=gen), torch.randn(7, 3 * 5, generator=gen)
    h = torch.randn(7, 5, generator=gen)
    w = torch.randn(7, 5, generator=gen)  # a weighted sum: every output gets its own gradient
    xs = [x.clone().requires_grad_() for x in (gi, gh, h)]
    ref = [x.double().requires_grad_() for x in (gi, gh, h)]
    out, want = gru_cell(*xs), gru_reference(*ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    for g, r in zip(_grads((out * w).sum(), xs), _grads((want * w.double()).sum(), ref)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_user_start_equals_float64_autograd(kernels, act, dtype):
    """The user-level rule as one op (user GRU, dropout, init projection, dropout) equals
    autograd through torch's GRU cell and linear layer, with gradients for every weight
    and for both input states."""
    gen = torch.Generator().manual_seed(4)
    R, H, U = 6, 5, 4
    gru, init = torch.nn.GRUCell(H, U).to(dtype), torch.nn.Linear(U, H).to(dtype)
    h = torch.randn(R, H, generator=gen).to(dtype).requires_grad_()
    c = torch.randn(R, U, generator=gen).to(dtype).requires_grad_()
    m_user = (torch.rand(R, U, generator=gen) > 0.3).to(dtype) / 0.7
    m_init = (torch.rand(R, H, generator=gen) > 0.2).to(dtype) / 0.8
    up_h, up_c = torch.randn(R, H, generator=gen), torch.randn(R, U, generator=gen)
    h0, c1 = user_start(h, c, gru, init, act, m_user, m_init)
    params = [h, c, *gru.parameters(), *init.parameters()]
    got = _grads((h0 * up_h.to(dtype)).sum() + (c1 * up_c.to(dtype)).sum(), params)
    gru64, init64 = torch.nn.GRUCell(H, U).double(), torch.nn.Linear(U, H).double()
    gru64.load_state_dict(gru.state_dict())
    init64.load_state_dict(init.state_dict())
    h64, c64 = h.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    c_ref = gru64(h64, c64) * m_user.double()
    h_ref = activation(act)(init64(c_ref)) * m_init.double()
    want = _grads((h_ref * up_h.double()).sum() + (c_ref * up_c.double()).sum(),
                  [h64, c64, *gru64.parameters(), *init64.parameters()])  # fmt: skip
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h0.double(), h_ref, **tol)
    torch.testing.assert_close(c1.double(), c_ref, **tol)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, **tol)


def test_rows_gradient_is_coalesced_one_row_per_distinct_item(kernels):
    w = torch.randn(30, 4, dtype=F64, requires_grad=True)
    items = torch.tensor([7, 3, 7, 29, 0, 3])
    up = torch.randn(6, 4, dtype=F64)
    (g,) = torch.autograd.grad((rows(w, items) * up).sum(), [w])
    assert g.is_sparse and g._indices()[0].tolist() == [0, 3, 7, 29]  # sorted, distinct
    want = torch.zeros(30, 4, dtype=F64).index_add_(0, items, up)
    torch.testing.assert_close(g.to_dense(), want)
    idx, values = _rows(g)  # what the optimisers read: no duplicate rows
    assert idx.tolist() == [0, 3, 7, 29] and values.shape == (4, 4)


def test_optimiser_rows_coalesce_a_gradient_with_repeated_rows():
    g = torch.sparse_coo_tensor(torch.tensor([[5, 2, 5]]), torch.ones(3, 2), (8, 2),
                                check_invariants=True)
    idx, values = _rows(g)
    assert idx.tolist() == [2, 5] and values.tolist() == [[1, 1], [2, 2]]


def test_chunk_candidates_equal_torch_unique_per_step(kernels):
    gen = torch.Generator().manual_seed(1)
    cand = torch.randint(0, 40, (5, 12), generator=gen)
    valid = torch.rand(5, 4, generator=gen) > 0.3
    for c, ids, v in zip(chunk_candidates(cand, valid, 40), cand, valid):
        uniq, inv = torch.unique(ids, return_inverse=True)
        assert torch.equal(c.ids, ids) and torch.equal(c.uniq, uniq)
        assert torch.equal(c.inverse, inv)
        occurs = torch.cat([v.long(), torch.ones(8, dtype=torch.long)])
        assert torch.equal(c.counts, torch.zeros_like(uniq).index_add_(0, inv, occurs))


CASES = [
    (loss, act, logq, user)
    for loss in LOSSES
    for act, logq, user in [("linear", 0, 0), ("elu-0.5", 1, 1), ("tanh", 1, 0)]
]


@pytest.mark.parametrize("loss,act,logq,user", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampled_loss_equals_float64_autograd(kernels, loss, act, logq, user, dtype):
    """The fused op's loss and gradients (queries dense, item tables row-sparse) equal
    autograd through the scores (``linear_scores``) and the loss in torch ops, with
    repeated candidates, an empty slot and the logQ correction."""
    gen = torch.Generator().manual_seed(2)
    n, B, S, H, U = 25, 6, 10, 4, 3
    tables = [torch.randn(n, H, generator=gen), torch.randn(n, 1, generator=gen)]
    queries = [torch.randn(B, H, generator=gen)]
    if user:
        tables.append(torch.randn(n, U, generator=gen))
        queries.append(torch.randn(B, U, generator=gen))
    targets = torch.randint(0, n, (B,), generator=gen)
    cand = torch.cat([targets, torch.randint(0, 8, (S,), generator=gen)])  # repeats
    valid = torch.tensor([True, True, False, True, True, True])
    bias = torch.rand(B + S, generator=gen) if logq else None

    def factors(xs, qs):
        return ScoreFactors(tuple(qs), (xs[0], *xs[2:]), xs[1], act)

    xs = [t.to(dtype).requires_grad_() for t in tables]
    qs = [q.to(dtype).requires_grad_() for q in queries]
    steps = chunk_candidates(cand[None], valid[None], n)
    got = sampled_loss(factors(xs, qs), steps[0], valid, loss, 0.7,
                       None if bias is None else bias.to(dtype))  # fmt: skip
    rx = [t.double().requires_grad_() for t in tables]
    rq = [q.double().requires_grad_() for q in queries]
    s = linear_scores(factors(rx, rq), cand)
    if bias is not None:
        s = s - bias.double()
    kwargs = {"bpreg": 0.7} if loss == "bpr-max" else {}
    want = LOSSES[loss](s, valid, **kwargs)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), want, **tol)
    for g, r in zip(_grads(got * 0.75, xs + qs), _grads(want * 0.75, rx + rq)):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ranking_loss_equals_float64_autograd(kernels, loss):
    gen = torch.Generator().manual_seed(3)
    scores = activation("tanh")(torch.randn(5, 9, generator=gen) * 2)
    valid = torch.tensor([True, False, True, True, True])
    x = scores.clone().requires_grad_()
    r = scores.double().requires_grad_()
    got = ranking_loss(x, valid, loss, 0.5)
    want = LOSSES[loss](r, valid, **({"bpreg": 0.5} if loss == "bpr-max" else {}))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(got * 3, [x])[0].double(), _grads(want * 3, [r])[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
