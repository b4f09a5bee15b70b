"""Ranking losses on the [B, B + S] score matrix: positives on the diagonal, the other
valid columns (in-batch targets of other slots, then S sampled items) are negatives.

``row_valid`` [B] masks empty slots (their row is ignored and their target column is not a
negative for anyone). Each loss averages over valid rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masks(scores: Tensor, row_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(positive scores [B], negative mask [B, B+S], number of valid rows)."""
    B, N = scores.shape
    col_valid = torch.cat([row_valid, row_valid.new_ones(N - B)])
    neg = col_valid[None, :].expand(B, N).clone()
    neg[:, :B].fill_diagonal_(False)
    return scores.diagonal(), neg, row_valid.sum().clamp(min=1)


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def cross_entropy(scores: Tensor, row_valid: Tensor) -> Tensor:
    """Softmax over the row's valid columns, -log p(target)."""
    pos, neg, n = _masks(scores, row_valid)
    logits = scores.masked_fill(
        ~(neg | torch.eye(*scores.shape, dtype=torch.bool, device=scores.device)), float("-inf")
    )
    log_p = logits.diagonal() - torch.logsumexp(logits, dim=1)
    return -(log_p * row_valid).sum() / n


def top1(scores: Tensor, row_valid: Tensor) -> Tensor:
    """TOP1: mean over negatives of sigmoid(r_neg - r_pos) + sigmoid(r_neg^2)."""
    pos, neg, n = _masks(scores, row_valid)
    per_neg = torch.sigmoid(scores - pos[:, None]) + torch.sigmoid(scores * scores)
    return (_row_mean(per_neg, neg) * row_valid).sum() / n


def bpr(scores: Tensor, row_valid: Tensor) -> Tensor:
    """BPR: -mean over negatives of log sigmoid(r_pos - r_neg)."""
    pos, neg, n = _masks(scores, row_valid)
    per_neg = -F.logsigmoid(pos[:, None] - scores)
    return (_row_mean(per_neg, neg) * row_valid).sum() / n


def _neg_softmax(scores: Tensor, neg: Tensor) -> Tensor:
    """Softmax over each row's negatives only (zero weight elsewhere)."""
    return torch.softmax(scores.masked_fill(~neg, float("-inf")), dim=1).nan_to_num(0.0)


def top1_max(scores: Tensor, row_valid: Tensor) -> Tensor:
    """TOP1-max (GRU4Rec 2018): TOP1 terms weighted by the softmax over the negatives."""
    pos, neg, n = _masks(scores, row_valid)
    w = _neg_softmax(scores, neg)
    per_row = (w * (torch.sigmoid(scores - pos[:, None]) + torch.sigmoid(scores * scores))).sum(1)
    return (per_row * row_valid).sum() / n


def bpr_max(scores: Tensor, row_valid: Tensor, bpreg: float = 1.0) -> Tensor:
    """BPR-max (GRU4Rec 2018): -log sum_j w_j sigmoid(r_pos - r_j) + bpreg sum_j w_j r_j^2,
    w = softmax over the negatives."""
    pos, neg, n = _masks(scores, row_valid)
    w = _neg_softmax(scores, neg)
    p = (w * torch.sigmoid(pos[:, None] - scores)).sum(1)
    per_row = -torch.log(p + 1e-24) + bpreg * (w * scores * scores).sum(1)
    return (per_row * row_valid).sum() / n


LOSSES = {
    "cross-entropy": cross_entropy,
    "top1": top1,
    "bpr": bpr,
    "top1-max": top1_max,
    "bpr-max": bpr_max,
}
