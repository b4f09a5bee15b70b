"""Ranks and metrics against brute-force computations."""

from __future__ import annotations

import math

import pytest
import torch

from hrnn_lit.evaluation.metrics import metrics_from_ranks, target_ranks


def brute_rank(row: list[float], target: int, ties: str) -> int:
    t = row[target]
    higher = sum(1 for j, s in enumerate(row) if s > t)
    equal_others = sum(1 for j, s in enumerate(row) if s == t and j != target)
    return 1 + higher + (equal_others if ties == "conservative" else 0)


@pytest.mark.parametrize("ties", ["conservative", "optimistic"])
def test_ranks_match_brute_force_with_ties(ties):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200, 30), generator=g).float()  # many ties
    targets = torch.randint(0, 30, (200,), generator=g)
    ranks = target_ranks(scores, targets, ties)
    expected = [brute_rank(scores[i].tolist(), int(targets[i]), ties) for i in range(200)]
    assert ranks.tolist() == expected


def test_saturated_scores_conservative_vs_optimistic():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    target = torch.tensor([2])
    assert target_ranks(scores, target, "conservative").item() == 3
    assert target_ranks(scores, target, "optimistic").item() == 1


def test_non_finite_target_is_never_a_hit():
    scores = torch.tensor([[0.1, float("nan"), 0.3]])
    assert target_ranks(scores, torch.tensor([1]), "optimistic").item() == 4


@pytest.mark.parametrize("ties", ["conservative", "optimistic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranks_with_non_finite_other_scores(ties, dtype):
    """NaN scores of other items never rank above the target, +inf always, -inf never;
    a non-finite target ranks n_items + 1."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(-3, 4, (300, 25), generator=g).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    where = torch.rand(300, 25, generator=g) < 0.15
    scores[where] = special[torch.randint(0, 3, (int(where.sum()),), generator=g)]
    targets = torch.randint(0, 25, (300,), generator=g)
    ranks = target_ranks(scores, targets, ties)
    for i in range(300):
        row, t = scores[i].tolist(), int(targets[i])
        expected = brute_rank(row, t, ties) if math.isfinite(row[t]) else 26
        assert ranks[i].item() == expected, (i, row, t)


def test_metrics_by_hand():
    ranks = torch.tensor([1, 2, 5, 6, 30])
    m = metrics_from_ranks(ranks, [5, 20], prefix="test/")
    assert m["test/recall@5"] == pytest.approx(3 / 5)
    assert m["test/mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert m["test/ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["test/recall@20"] == pytest.approx(4 / 5)
    assert m["test/mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6) / 5)


def test_metrics_random_against_loop():
    g = torch.Generator().manual_seed(1)
    ranks = torch.randint(1, 50, (500,), generator=g)
    m = metrics_from_ranks(ranks, [10])
    r = ranks.tolist()
    assert m["recall@10"] == pytest.approx(sum(x <= 10 for x in r) / 500)
    assert m["mrr@10"] == pytest.approx(sum(1 / x for x in r if x <= 10) / 500)
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(x + 1) for x in r if x <= 10) / 500)
