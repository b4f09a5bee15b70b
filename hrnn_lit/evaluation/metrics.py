"""Ranks from full-catalogue scores and top-K metrics from ranks (docs/design.md §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

TIES = ("conservative", "optimistic")


def target_ranks(scores: Tensor, targets: Tensor, ties: str = "conservative") -> Tensor:
    """1-based rank of each row's target among all columns of ``scores`` [N, n_items].

    conservative: items scoring equal to the target rank above it (rank = #(s >= s_t));
    optimistic (the reference code): they rank below it (rank = 1 + #(s > s_t)).
    A non-finite target score gets rank n_items + 1 (never a hit) and is counted by the
    caller via ``torch.isfinite``.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    scores = scores.detach()
    target_score = scores.gather(1, targets[:, None])
    bad = ~torch.isfinite(target_score.squeeze(1))
    # s >= t written as 0/1 in the scores' own type and summed: faster than a bool
    # tensor and its sum on CPU (counts stay exact while n_items < 2**24)
    hit = torch.empty_like(scores)
    compare = torch.ge if ties == "conservative" else torch.gt
    ranks = compare(scores, target_score, out=hit).sum(1).long()
    if ties == "optimistic":
        ranks += 1
    return ranks.masked_fill(bad, scores.shape[1] + 1)


def metrics_from_ranks(ranks: Tensor, ks: list[int] | tuple[int, ...], prefix: str = "") -> dict:
    """Recall@K, MRR@K and NDCG@K averaged over events (one target per event)."""
    r = ranks.to(torch.float64)
    n = max(r.numel(), 1)
    out = {}
    for k in ks:
        hit = r <= k
        out[f"{prefix}recall@{k}"] = hit.sum().item() / n
        out[f"{prefix}mrr@{k}"] = torch.where(hit, 1.0 / r, 0.0).sum().item() / n
        out[f"{prefix}ndcg@{k}"] = (
            torch.where(hit, math.log(2.0) / torch.log(r + 1.0), 0.0).sum().item() / n
        )
    return out
