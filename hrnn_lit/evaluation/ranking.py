"""Ranks of targets among the whole catalogue for a linear scorer, computed block by block
without materialising the [N, n_items] score matrix (CPU evaluation's hot loop).

Scores are ``act(h @ W.T + b (+ c @ U.T))`` exactly as ``RecurrentCore.score_all`` computes
them; ranks follow ``metrics.target_ranks`` (conservative = #(s >= s_t), optimistic =
1 + #(s > s_t), a non-finite target score gives n_items + 1).

The catalogue is scored in column blocks small enough to stay in cache, and each block is
compared with the target scores and counted right away. The ranks are the same as those of
the full score matrix because (1) a BLAS computes each element of a matrix product from
its row and column only, in a fixed order over the shared dimension, so a column block of
the product equals the same columns of the full product bit for bit (shown for this
build by tests/test_eval_speed_paths.py); tiny products, where BLAS libraries switch to
other kernels, take the plain path instead; (2) every target score used for counting is
checked against the value its own column block produced, and a row block where any differs
is recomputed by the plain path, so a target is never compared with a value of its own
score that the product did not give.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.evaluation.metrics import TIES, target_ranks

ACTS = ("linear", "tanh", "relu")
MIN_ROWS = 32  # fewer rows (or columns): one plain product, as score_all computes it
TARGET_ROWS = 128  # rows per product that gives the target scores
BLOCK_BYTES = 4 << 20  # scores per column block (measured: 2-4 MB is fastest at H=100)


def linear_scores(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    user: Tensor | None = None,
    user_weight: Tensor | None = None,
    act: str = "linear",
) -> Tensor:
    """Scores [N, n_items], op for op as ``RecurrentCore.score_all`` (the plain path)."""
    s = torch.addmm(bias.T, h, weight.T)
    if user_weight is not None:
        s = s + user @ user_weight.T
    return _act(s, act, inplace=False)


def _act(s: Tensor, act: str, inplace: bool) -> Tensor:
    if act == "linear":
        return s
    if act == "tanh":
        return s.tanh_() if inplace else torch.tanh(s)
    if act == "relu":
        return s.relu_() if inplace else torch.relu(s)
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def _splits(n: int, size: int) -> list[int]:
    """Bounds of ceil(n / size) nearly equal parts of range(n)."""
    k = max(1, -(-n // size))
    return [n * i // k for i in range(k + 1)]


def _target_scores(h, targets, weight, bias, user, user_weight, act) -> Tensor:
    """Each row's score of its own target, from products of >= MIN_ROWS rows and columns
    (the diagonal of h_part @ W[targets_part].T): the same kernels as the full product."""
    parts = []
    bounds = _splits(h.shape[0], TARGET_ROWS)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        tg = targets[lo:hi]
        s = torch.addmm(bias[tg].T, h[lo:hi], weight[tg].T).diagonal()
        if user_weight is not None:
            s = s + (user[lo:hi] @ user_weight[tg].T).diagonal()
        parts.append(s)
    return _act(torch.cat(parts), act, inplace=True)


def catalogue_ranks(
    h: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor,
    ties: str = "conservative",
    user: Tensor | None = None,
    user_weight: Tensor | None = None,
    act: str = "linear",
    max_rows: int = 1024,
    block_cols: int | None = None,
) -> Tensor:
    """1-based rank [N] of each target among all items, for scores
    ``act(h @ weight.T + bias.T (+ user @ user_weight.T))``: the same ranks as
    ``target_ranks(linear_scores(...), targets, ties)`` on all N rows at once.

    h [N, H]; targets [N]; weight [n_items, H]; bias [n_items, 1]; user [N, U] and
    user_weight [n_items, U] optional; act one of ``ACTS``. Rows go in blocks of at most
    ``max_rows`` (on CPU nearly equal ones, so none is tiny unless N is; elsewhere also at
    most 32 MB of scores, each scored in full); ``block_cols``: items per column block on
    CPU (default: about BLOCK_BYTES of scores).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    n_rows, n_items = h.shape[0], weight.shape[0]
    if user_weight is None:
        user = None
    if h.device.type != "cpu":
        rows = max(1, min(max_rows, (32 << 20) // (4 * n_items)))
        bounds = list(range(0, n_rows, rows)) + [n_rows]
    else:
        bounds = _splits(n_rows, max(1, max_rows))
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        args = (h[lo:hi], targets[lo:hi], weight, bias, ties)
        uargs = (None if user is None else user[lo:hi], user_weight, act)
        ranks = None
        if h.device.type == "cpu" and hi - lo >= MIN_ROWS and n_items >= 2 * MIN_ROWS:
            with torch.no_grad():
                ranks = _blocked_ranks(*args, *uargs, block_cols)
        if ranks is None:  # plain path (also where a target score was off its block's)
            ranks = target_ranks(linear_scores(args[0], weight, bias, *uargs), args[1], ties)
        parts.append(ranks)
    return torch.cat(parts) if parts else targets.new_zeros(0)


def _blocked_ranks(h, targets, weight, bias, ties, user, user_weight, act, block_cols):
    n_rows, n_items = h.shape[0], weight.shape[0]
    cols = block_cols or BLOCK_BYTES // (4 * n_rows)
    bounds = _splits(n_items, max(cols, MIN_ROWS))
    width = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    t = _target_scores(h, targets, weight, bias, user, user_weight, act)
    t_col = t[:, None]
    buf = torch.empty(n_rows * width, dtype=t.dtype)
    ubuf = torch.empty(n_rows * width, dtype=t.dtype) if user_weight is not None else None
    count = torch.zeros(n_rows, dtype=torch.float64)
    seen = torch.full_like(t, float("nan"))  # each target's score as its column block gave it
    compare = torch.Tensor.ge_ if ties == "conservative" else torch.Tensor.gt_
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = buf[: n_rows * (hi - lo)].view(n_rows, hi - lo)  # contiguous
        torch.addmm(bias[lo:hi].T, h, weight[lo:hi].T, out=s)
        if ubuf is not None:
            u = ubuf[: n_rows * (hi - lo)].view(n_rows, hi - lo)
            torch.mm(user, user_weight[lo:hi].T, out=u)
            s.add_(u)
        _act(s, act, inplace=True)
        local = targets - lo
        inside = (local >= 0) & (local < hi - lo)
        seen = torch.where(inside, s.gather(1, local.clamp(0, hi - lo - 1)[:, None])[:, 0], seen)
        count.add_(compare(s, t_col).sum(1))
    finite = torch.isfinite(t)
    if bool(((seen != t) & finite).any()):
        return None
    ranks = count.long() if ties == "conservative" else count.long() + 1
    return ranks.masked_fill_(~finite, n_items + 1)
