"""Losses against hand-computed values on a tiny score matrix."""

from __future__ import annotations

import math

import pytest
import torch

from hrnn_lit.ops.losses import (
    bpr,
    bpr_max,
    cross_entropy,
    cross_entropy_grad,
    cross_entropy_grad_distinct,
    top1,
    top1_max,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# 2 slots + 1 sampled item; positives on the diagonal
S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]])


def test_top1_by_hand():
    valid = torch.tensor([True, True])
    r0 = ((sig(0 - 1) + sig(0)) + (sig(-1 - 1) + sig(1))) / 2
    r1 = ((sig(0.5 - 2) + sig(0.25)) + (sig(1 - 2) + sig(1))) / 2
    assert top1(S, valid).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_bpr_by_hand():
    valid = torch.tensor([True, True])
    r0 = -(math.log(sig(1 - 0)) + math.log(sig(1 + 1))) / 2
    r1 = -(math.log(sig(2 - 0.5)) + math.log(sig(2 - 1))) / 2
    assert bpr(S, valid).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_cross_entropy_by_hand():
    valid = torch.tensor([True, True])
    r0 = -(1 - math.log(math.e**1 + math.e**0 + math.e**-1))
    r1 = -(2 - math.log(math.e**0.5 + math.e**2 + math.e**1))
    assert cross_entropy(S, valid).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


@pytest.mark.parametrize("loss", [top1, bpr, cross_entropy, top1_max, bpr_max])
def test_masked_slot_is_ignored_everywhere(loss):
    """An empty slot's row is ignored and its column is no negative for anyone."""
    valid = torch.tensor([True, False])
    only_row0 = torch.tensor([[1.0, -1.0]])  # row 0 against its target and the sample
    assert loss(S, valid).item() == pytest.approx(loss(only_row0, torch.tensor([True])).item())
    garbage = S.clone()
    garbage[1] = 1e6
    garbage[0, 1] = 1e6
    assert loss(garbage, valid).item() == pytest.approx(loss(S, valid).item())


def softmax_negs(row: list[float], pos_idx: int) -> list[float]:
    e = [math.exp(v) if j != pos_idx else 0.0 for j, v in enumerate(row)]
    z = sum(e)
    return [x / z for x in e]


def test_top1_max_by_hand():
    valid = torch.tensor([True, True])
    total = 0.0
    for i, row in enumerate(S.tolist()):
        w = softmax_negs(row, i)
        total += sum(w[j] * (sig(row[j] - row[i]) + sig(row[j] ** 2)) for j in range(3) if j != i)
    assert top1_max(S, valid).item() == pytest.approx(total / 2, rel=1e-6)


def test_bpr_max_by_hand():
    valid = torch.tensor([True, True])
    total = 0.0
    for i, row in enumerate(S.tolist()):
        w = softmax_negs(row, i)
        p = sum(w[j] * sig(row[i] - row[j]) for j in range(3) if j != i)
        total += -math.log(p) + 0.5 * sum(w[j] * row[j] ** 2 for j in range(3) if j != i)
    assert bpr_max(S, valid, bpreg=0.5).item() == pytest.approx(total / 2, rel=1e-6)


@pytest.mark.parametrize("loss", [top1, bpr, cross_entropy, top1_max, bpr_max])
@pytest.mark.parametrize("n_sample", [0, 2])
def test_step_with_only_empty_slots_has_zero_loss_and_finite_grads(loss, n_sample):
    scores = torch.randn(3, 3 + n_sample, requires_grad=True)
    value = loss(scores, torch.tensor([False, False, False]))
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(scores.grad).all() and (scores.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_on_distinct_columns_equals_the_full_matrix(dtype):
    """Scores of the distinct candidates with their multiplicities give the [B, B+S]
    matrix's loss, and each distinct column's gradient is the sum of its occurrences'.
    Targets repeat, samples repeat and hit targets; empty slot 3's target (item 9) occurs
    nowhere else, empty slot 4's (item 2) is also sampled."""
    g = torch.Generator().manual_seed(0)
    per_item = torch.randn(6, 12, generator=g, dtype=torch.float64).to(dtype) * 3  # [B, items]
    tgt = torch.tensor([4, 4, 7, 9, 2, 0])
    cand = torch.cat([tgt, torch.tensor([2, 7, 11, 11, 4, 5, 2])])
    valid = torch.tensor([True, True, True, False, False, True])
    B = tgt.numel()
    loss, grad, scale = cross_entropy_grad(per_item[:, cand].clone(), valid)
    full = grad.double() * scale.double()[:, None]  # [B, N]
    ref = cross_entropy(per_item[:, cand].double(), valid)
    uniq, inv = torch.unique(cand, return_inverse=True)
    occurs = torch.ones(cand.numel(), dtype=dtype)
    occurs[:B] = valid
    counts = torch.zeros(uniq.numel(), dtype=dtype).index_add_(0, inv, occurs)
    assert counts.tolist() == [1, 2, 3, 1, 2, 0, 2]  # items 0, 2, 4, 5, 7, 9, 11
    d_loss, d_grad, d_scale = cross_entropy_grad_distinct(
        per_item[:, uniq].clone(), valid, inv[:B], counts
    )
    got = d_grad.double() * d_scale.double()[:, None]  # [B, M]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_loss.double(), ref, **tol)
    torch.testing.assert_close(loss.double(), ref, **tol)
    summed = torch.zeros(B, uniq.numel(), dtype=torch.float64).index_add_(1, inv, full)
    torch.testing.assert_close(got, summed, **tol)
    assert (got[:, 5] == 0).all() and (got[3:5] == 0).all()  # item 9; the empty rows
