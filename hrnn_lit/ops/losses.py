"""Ranking losses on the [B, B + S] score matrix: positives on the diagonal, the other
valid columns (in-batch targets of other slots, then S sampled items) are negatives.

``row_valid`` [B] masks empty slots (their row is ignored and their target column is not a
negative for anyone). Each loss averages over valid rows.

Training needs the loss and its gradient with respect to the scores (``loss_and_grad``):
cross-entropy and TOP1 have hand-written gradients (a few passes over [B, B+S], no autograd
graph, the per-row weights returned apart); the other losses get theirs from autograd on the
score matrix alone. Cross-entropy also has a form on the distinct candidates only
(``distinct_loss_and_grad``): a step's popularity samples repeat items, and the step's
products and gathers shrink by as much.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from hrnn_lit.ops import native

# Masked logits get a large finite value, not -inf: a step whose slots are all empty (DDP
# padding) then gives a zero loss with zero, finite gradients instead of NaNs.
_MASKED = -1e9


def _masks(scores: Tensor, row_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(positive scores [B], negative mask [B, B+S], number of valid rows)."""
    B, N = scores.shape
    col_valid = torch.cat([row_valid, row_valid.new_ones(N - B)])
    neg = col_valid[None, :].expand(B, N).clone()
    neg[:, :B].fill_diagonal_(False)
    return scores.diagonal(), neg, row_valid.sum().clamp(min=1)


def _negatives_mean(per_col: Tensor, row_valid: Tensor) -> Tensor:
    """Mean over each valid row's negatives of ``per_col`` [B, B+S], then over valid rows.

    Negatives = valid columns except the row's own target: the sum over valid columns minus
    the diagonal term, divided by their count minus one (no [B, B+S] mask is built).
    """
    B, N = per_col.shape
    col_valid = torch.cat([row_valid, row_valid.new_ones(N - B)]).to(per_col.dtype)
    n_neg = (col_valid.sum() - 1).clamp(min=1)
    per_row = (per_col @ col_valid - per_col.diagonal()) / n_neg
    return (per_row * row_valid).sum() / row_valid.sum().clamp(min=1)


def cross_entropy(scores: Tensor, row_valid: Tensor) -> Tensor:
    """Softmax over the row's valid columns, -log p(target)."""
    B, N = scores.shape
    col_valid = torch.cat([row_valid, row_valid.new_ones(N - B)])
    logits = scores.masked_fill(~col_valid, _MASKED)  # a valid row keeps its target
    rows = torch.arange(B, device=scores.device)
    per_row = F.cross_entropy(logits, rows, reduction="none")  # fused log-softmax
    return (per_row * row_valid).sum() / row_valid.sum().clamp(min=1)


def top1(scores: Tensor, row_valid: Tensor) -> Tensor:
    """TOP1: mean over negatives of sigmoid(r_neg - r_pos) + sigmoid(r_neg^2)."""
    pos = scores.diagonal()
    per_col = torch.sigmoid(scores - pos[:, None]) + torch.sigmoid(scores * scores)
    return _negatives_mean(per_col, row_valid)


def bpr(scores: Tensor, row_valid: Tensor) -> Tensor:
    """BPR: -mean over negatives of log sigmoid(r_pos - r_neg)."""
    pos = scores.diagonal()
    return _negatives_mean(-F.logsigmoid(pos[:, None] - scores), row_valid)


def _neg_softmax(scores: Tensor, neg: Tensor) -> Tensor:
    """Softmax over each row's negatives only (zero weight elsewhere)."""
    return torch.softmax(scores.masked_fill(~neg, _MASKED), dim=1) * neg


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


def _row_weights(row_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """[B] weight of each row in the mean over valid rows."""
    w = row_valid.to(dtype)
    return w / w.sum().clamp(min=1)


def softmax_cross_entropy_grad(
    scores: Tensor, row_valid: Tensor, target: Tensor | None, col_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(cross-entropy, per-row gradient, row scales) of the softmax of scores [B, M] +
    col_bias [M] (None: 0) with the target columns target [B] (None: row b's is column b):
    the loss is the mean over valid rows of log-sum-exp(logits) - scores[target] (the score
    before the bias), and d loss / d scores = grad * row_scale[:, None]. Overwrites
    ``scores``.

    Native (``native.softmax_xent``: two passes per row, the normalisation left in the row
    scales) on CPU float32; elsewhere torch's softmax and two row maxima (``amax``; ``max``
    with indices is ~15x slower). There lse comes from the softmax: p_max = exp(m - lse)
    >= 1/M never underflows, so lse = m - log(p_max) is exact where log(p_target) could be
    -inf.
    """
    B = scores.shape[0]
    w = _row_weights(row_valid, scores.dtype)
    if scores.device.type == "cpu":
        t = torch.arange(B) if target is None else target
        out = native.softmax_xent(scores, t, col_bias)
        if out is not None:
            row_loss, sums = out
            return row_loss @ w, scores, w / sums
    if target is None:  # (views: no indexing ops, for CUDA graphs)
        pos = scores.diagonal().clone()
    else:
        rows = torch.arange(B, device=scores.device)
        pos = scores[rows, target]
    if col_bias is not None:
        scores.add_(col_bias)
    m = scores.amax(1)
    p = torch.softmax(scores, dim=1)
    lse = m - torch.log(p.amax(1))
    if target is None:  # softmax - one-hot(target)
        p.diagonal().sub_(1.0)
    else:
        p[rows, target] -= 1.0
    return ((lse - pos) * w).sum(), p, w


def cross_entropy_grad(scores: Tensor, row_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cross-entropy, per-row gradient, row scales) on [B, B+S]: d loss / d scores =
    grad * scale[:, None]. Overwrites ``scores``. Empty slots' target columns get the
    masking bias (nobody's negative); a valid row keeps its own."""
    B, N = scores.shape
    col_bias = scores.new_zeros(N)
    col_bias[:B].masked_fill_(~row_valid, _MASKED)
    return softmax_cross_entropy_grad(scores, row_valid, None, col_bias)


def cross_entropy_grad_distinct(
    scores: Tensor, row_valid: Tensor, target: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``cross_entropy_grad`` of [B, B+S] scores given only their distinct columns: scores
    [B, M] of the M distinct candidates, each row's target among them target [B], and each
    one's number of occurrences among the valid columns counts [M] (the slots' targets of
    valid slots, then the samples). A column that occurs k times adds k exp(s) to the
    softmax's sum, i.e. its logit gets + log k (0 occurrences: masked), and its gradient is
    the sum of its occurrences'. Overwrites ``scores``."""
    col_bias = counts.to(scores.dtype).log_().clamp_(min=_MASKED)
    return softmax_cross_entropy_grad(scores, row_valid, target, col_bias)


def top1_grad(scores: Tensor, row_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(TOP1, per-row gradient, row weights): d loss / d scores = grad * w[:, None]. With
    a = sigmoid(s_j - s_pos), b = sigmoid(s_j^2) over the row's negatives j:
    d/ds_j = a(1-a) + 2 s_j b(1-b); d/ds_pos = -sum_j a(1-a)."""
    B, N = scores.shape
    col = torch.cat([row_valid, row_valid.new_ones(N - B)]).to(scores.dtype)
    n_neg = (col.sum() - 1).clamp(min=1)
    pos = scores.diagonal()
    a = torch.sigmoid(scores - pos[:, None])
    b = torch.sigmoid(scores * scores)
    w = _row_weights(row_valid, scores.dtype)
    per_col = a + b
    loss = (((per_col @ col) - per_col.diagonal()) * w).sum() / n_neg
    da = a.mul_(1 - a).mul_(col)  # a'(s_j - s_pos), negatives' columns only
    da.diagonal().zero_()
    grad = b.mul_(1 - b).mul_(scores).mul_(2 * col).add_(da)
    grad.diagonal().copy_(-da.sum(1))
    return loss, grad, w / n_neg


def _autograd_grad(loss_fn):
    def loss_and_grad(scores: Tensor, row_valid: Tensor) -> tuple[Tensor, Tensor, None]:
        with torch.enable_grad():
            s = scores.detach().requires_grad_()
            loss = loss_fn(s, row_valid)
            (grad,) = torch.autograd.grad(loss, s)
        return loss.detach(), grad, None

    return loss_and_grad


LOSSES = {
    "cross-entropy": cross_entropy,
    "top1": top1,
    "bpr": bpr,
    "top1-max": top1_max,
    "bpr-max": bpr_max,
}

_GRADS = {"cross-entropy": cross_entropy_grad, "top1": top1_grad}


def distinct_loss_and_grad(name: str, **kwargs):
    """The loss ``name``'s gradient on distinct candidates only (``cross_entropy_grad_distinct``:
    ``f(scores, row_valid, target, counts) -> (loss, grad, row_scale)``), or None where
    the loss has no such form (its terms are not a function of column multiplicities)."""
    return cross_entropy_grad_distinct if name == "cross-entropy" and not kwargs else None


def loss_and_grad(name: str, **kwargs):
    """``f(scores, row_valid) -> (loss, grad, row_scale)`` for the loss ``name``:
    d loss / d scores = grad * row_scale[:, None] (row_scale None: grad itself), so that the
    caller can fold the [B] row weights into its smaller matrices instead of another pass
    over [B, B+S]. ``f`` may overwrite ``scores``."""
    if name in _GRADS and not kwargs:
        return _GRADS[name]
    return _autograd_grad(functools.partial(LOSSES[name], **kwargs))
