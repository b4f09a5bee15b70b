"""The ranking loss of a step's candidates in one op: scores and loss forward, and in
backward the gradients of the queries and, for the item tables, coalesced row-sparse
gradients with one row per distinct candidate.

For a network whose scores are a linear form of its state (``api.ScoreFactors``:
act(sum_k q_k . W_k[item] + b[item])), the op gathers each distinct candidate's rows once
and, with cross-entropy, scores each distinct candidate once (its multiplicity enters the
softmax as a log-count logit bias: popularity samples repeat items). The loss gradient
with respect to the scores comes from ``losses.loss_and_grad`` (hand-written for
cross-entropy and TOP1), computed in forward. ``ranking_loss`` is the same loss on a
score matrix any network made (its gradient hand-written where available).

The loss is the mean over the step's valid slots (``losses``). ``logq_bias`` [N] (the logQ
correction of each candidate column) is subtracted from the training scores before the
loss; on distinct candidates a column's multiplicity becomes the sum of exp(-bias) over its
occurrences. ``mm_dtype`` (bfloat16 under bf16-mixed): the two [B, N] products of the
backward run in that dtype; scores and loss stay float32."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from hrnn_lit.nets.api import ScoreFactors
from hrnn_lit.ops.activations import activation, activation_derivative
from hrnn_lit.ops.candidates import Candidates
from hrnn_lit.ops.losses import LOSSES, distinct_loss_and_grad, loss_and_grad
from hrnn_lit.ops.tables import row_sums, sparse_rows


@functools.cache
def _loss_fns(name: str, bpreg: float):
    kwargs = {"bpreg": bpreg} if name == "bpr-max" else {}
    return loss_and_grad(name, **kwargs), distinct_loss_and_grad(name, **kwargs)


class _SampledLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, cand_ids, uniq, inverse, counts, valid, logq_bias, bias, *pairs):
        loss_name, bpreg, act_name, mm_dtype = spec
        loss_grad, distinct_loss = _loss_fns(loss_name, bpreg)
        queries, tables = pairs[0::2], pairs[1::2]
        B = valid.numel()
        scored = uniq if distinct_loss is not None else cand_ids  # columns [M] or [N]
        w_rows = [w.index_select(0, scored) for w in tables]  # [M, D_k]
        b_rows = bias.index_select(0, scored).view(-1)  # [M]
        s = torch.addmm(b_rows, queries[0], w_rows[0].T)  # [B, M]
        for q, w in zip(queries[1:], w_rows[1:]):
            s.addmm_(q, w.T)
        y = activation(act_name)(s)
        d_act = activation_derivative(act_name, y)
        if distinct_loss is None:  # may overwrite y; loss: mean over valid slots
            if logq_bias is not None:
                y = y.sub(logq_bias)
            loss, ds, row_scale = loss_grad(y, valid)
        else:  # the slots' targets' columns, the columns' multiplicities
            if logq_bias is not None:  # occurrences weighted by exp(-bias)
                counts = _weighted_counts(inverse, valid, logq_bias, counts.numel())
            loss, ds, row_scale = distinct_loss(y, valid, inverse[:B], counts)
            if logq_bias is not None:  # the target's logit is its score minus its bias
                loss = loss + (logq_bias[:B] * valid).sum() / valid.sum().clamp(min=1)
        if d_act is not None:
            ds.mul_(d_act)  # d loss / d s = ds * row_scale[:, None]
        ctx.distinct = distinct_loss is not None
        ctx.mm_dtype = mm_dtype
        ctx.shapes = [w.shape for w in tables], bias.shape
        row_scale = torch.ones(()) if row_scale is None else row_scale
        ctx.save_for_backward(ds, row_scale, uniq, inverse, *queries, *w_rows)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        ds, row_scale, uniq, inverse, *rest = ctx.saved_tensors
        k = len(rest) // 2
        queries, w_rows = rest[:k], rest[k:]
        B = ds.shape[0]
        r = (row_scale.to(ds.dtype) * g).expand(B)[:, None]  # [B, 1]
        lp = ctx.mm_dtype  # the [B, N] products' dtype (None: ds's own)
        ds_lp = ds if lp is None else ds.to(lp)

        def mm(a: Tensor, b: Tensor) -> Tensor:  # a (from ds_lp) @ b, in ds's dtype
            return a @ b if lp is None else (a @ b.to(lp)).to(ds.dtype)

        def per_item(x: Tensor) -> Tensor:  # per score column -> per distinct item
            return x if ctx.distinct else row_sums(x, inverse, uniq.numel())

        table_shapes, bias_shape = ctx.shapes
        need = ctx.needs_input_grad
        d_bias = sparse_rows(uniq, per_item(ds.T @ r), bias_shape) if need[7] else None
        grads = []
        for i, (q, w, shape) in enumerate(zip(queries, w_rows, table_shapes)):
            dq = mm(ds_lp, w).mul_(r) if need[8 + 2 * i] else None  # [B, D]
            dw = None
            if need[9 + 2 * i]:
                dw = sparse_rows(uniq, per_item(mm(ds_lp.T, q * r)), shape)
            grads += [dq, dw]
        return None, None, None, None, None, None, None, d_bias, *grads


def _weighted_counts(inverse: Tensor, valid: Tensor, logq_bias: Tensor, size: int) -> Tensor:
    """Each distinct candidate's occurrences among the valid columns, each weighted by
    exp(-logq_bias) of its column: [size], logq_bias's dtype."""
    occurs = torch.ones_like(logq_bias)
    occurs[: valid.numel()] = valid
    weights = torch.exp(-logq_bias).mul_(occurs)
    return weights.new_zeros(size).index_add_(0, inverse, weights)


def sampled_loss(
    factors: ScoreFactors,
    cand: Candidates,
    valid: Tensor,
    loss: str,
    bpreg: float = 1.0,
    logq_bias: Tensor | None = None,
    mm_dtype: torch.dtype | None = None,
) -> Tensor:
    """The loss (mean over valid slots [B]) of the candidates' scores (module docstring)."""
    pairs = [x for pair in zip(factors.queries, factors.tables) for x in pair]
    spec = (loss, float(bpreg), factors.act, mm_dtype)
    return _SampledLoss.apply(
        spec, cand.ids, cand.uniq, cand.inverse, cand.counts, valid, logq_bias,
        factors.bias, *pairs,
    )  # fmt: skip


class _RankingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, valid: Tensor, loss_grad) -> Tensor:
        loss, ds, row_scale = loss_grad(scores.clone(), valid)
        ctx.save_for_backward(ds, torch.ones(()) if row_scale is None else row_scale)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        ds, row_scale = ctx.saved_tensors
        scale = row_scale.to(ds.dtype) * g
        return ds * (scale[:, None] if scale.dim() else scale), None, None


def ranking_loss(scores: Tensor, valid: Tensor, loss: str, bpreg: float = 1.0) -> Tensor:
    """The loss (mean over valid slots) of scores [B, B + S] any network made, with the
    hand-written gradient of ``losses.loss_and_grad`` where the loss has one."""
    if loss in ("cross-entropy", "top1"):
        return _RankingLoss.apply(scores, valid, _loss_fns(loss, float(bpreg))[0])
    kwargs = {"bpreg": bpreg} if loss == "bpr-max" else {}
    return LOSSES[loss](scores, valid, **kwargs)


class _DistinctRankingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, valid, target, counts, loss_grad) -> Tensor:
        loss, ds, row_scale = loss_grad(scores.clone(), valid, target, counts)
        ctx.save_for_backward(ds, torch.ones(()) if row_scale is None else row_scale)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        return *_RankingLoss.backward(ctx, g), None, None


def distinct_ranking_loss(
    scores: Tensor,
    cand: Candidates,
    valid: Tensor,
    loss: str,
    bpreg: float = 1.0,
    logq_bias: Tensor | None = None,
) -> Tensor:
    """The loss (mean over valid slots [B]) of the [B, N] scores ``scores[:, cand.inverse]``
    (minus ``logq_bias`` [N]), given only the scores [B, M] of the step's distinct
    candidates ``cand.uniq`` (a network's ``score_distinct``). Cross-entropy stays on the M
    columns (a column's multiplicity as a log-count logit bias, as the fused op does); the
    other losses take the [B, N] matrix (``ranking_loss``)."""
    distinct = _loss_fns(loss, float(bpreg))[1]
    if distinct is None:
        full = scores.index_select(1, cand.inverse)
        if logq_bias is not None:
            full = full - logq_bias.to(full.dtype)
        return ranking_loss(full, valid, loss, bpreg)
    B, counts = valid.numel(), cand.counts
    if logq_bias is not None:
        counts = _weighted_counts(cand.inverse, valid, logq_bias.to(scores.dtype), counts.numel())
    out = _DistinctRankingLoss.apply(scores, valid, cand.inverse[:B], counts, distinct)
    if logq_bias is not None:  # the target's logit is its score minus its bias
        out = out + (logq_bias[:B] * valid).sum() / valid.sum().clamp(min=1)
    return out


def loss_function(loss: str, bpreg: float = 1.0, reference: bool = False):
    """``loss(scores, valid)`` of a score matrix: ``ranking_loss`` (hand-written gradients
    where the loss has them), or with ``reference`` the loss in plain torch ops."""
    from hrnn_lit.ops.losses import LOSSES

    if reference:
        return functools.partial(LOSSES[loss], **({"bpreg": bpreg} if loss == "bpr-max" else {}))
    return functools.partial(ranking_loss, loss=loss, bpreg=bpreg)
