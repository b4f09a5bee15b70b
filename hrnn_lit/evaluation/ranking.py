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

With ``rank_cap`` (the largest K of the metrics) ranks above it are not resolved: they come
back as rank_cap + 1, which changes no Recall/MRR/NDCG@K with K <= rank_cap. A row leaves
the product as soon as its count passes the cap, so the products shrink block by block:
most targets are known to miss the top K after the first few thousand items.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.errors import NumericalError
from hrnn_lit.evaluation.metrics import TIES, target_ranks

ACTS = ("linear", "tanh", "relu")
MIN_ROWS = 32  # fewer rows (or columns): one plain product, as score_all computes it
TARGET_ROWS = 128  # rows per product that gives the target scores
BLOCK_BYTES = 4 << 20  # scores per column block (cache-sized; docs/benchmarks.md)


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


def block_scores(buf, h, weight, bias, u, user_weight, act, lo, hi) -> tuple[Tensor, Tensor]:
    """The scores [m, hi - lo] of items lo..hi-1 for the rows ``h`` (and ``u``), written into
    ``buf`` (grown when too small: returned with them), activated in place."""
    m = h.shape[0]
    if buf.numel() < m * (hi - lo):
        buf = torch.empty(m * (hi - lo), dtype=buf.dtype)
    s = buf[: m * (hi - lo)].view(m, hi - lo)  # contiguous
    torch.addmm(bias[lo:hi].T, h, weight[lo:hi].T, out=s)
    if user_weight is not None:
        s.add_(u @ user_weight[lo:hi].T)
    return _act(s, act, inplace=True), buf


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
    rank_cap: int | None = None,
) -> Tensor:
    """1-based rank [N] of each target among all items, for scores
    ``act(h @ weight.T + bias.T (+ user @ user_weight.T))``: the same ranks as
    ``target_ranks(linear_scores(...), targets, ties)`` on all N rows at once.

    h [N, H]; targets [N]; weight [n_items, H]; bias [n_items, 1]; user [N, U] and
    user_weight [n_items, U] optional; act one of ``ACTS``. Rows go in blocks of at most
    ``max_rows`` (on CPU nearly equal ones, so none is tiny unless N is; elsewhere also at
    most 32 MB of scores, each scored in full); ``block_cols``: items per column block on
    CPU (default: about BLOCK_BYTES of scores). ``rank_cap``: ranks above it come back as
    rank_cap + 1 (None: all exact); a non-finite target score still gives n_items + 1.
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
                ranks = _blocked_ranks(*args, *uargs, block_cols, rank_cap)
        if ranks is None:  # plain path (also where a target score was off its block's)
            ranks = target_ranks(linear_scores(args[0], weight, bias, *uargs), args[1], ties)
        parts.append(cap_ranks(ranks, rank_cap, n_items))
    return torch.cat(parts) if parts else targets.new_zeros(0)


def check_finite_catalogue(weight: Tensor, bias: Tensor, user_weight: Tensor | None) -> None:
    """Stop (one line) when an item's output weights or bias are not finite: its score would
    be NaN and silently never rank above a target (``catalogue_ranks`` itself ranks such
    scores as documented; the caller checks once per evaluation pass)."""
    for name, t in (("weight", weight), ("bias", bias), ("user weight", user_weight)):
        if t is None:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = torch.nonzero(bad.reshape(t.shape[0], -1).any(1)).flatten()
            shown = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if rows.numel() > 5 else "")
            raise NumericalError(
                f"evaluation: the output {name} of {rows.numel()} item(s) is not finite (item "
                f"index {shown}): every score of such an item is NaN/inf; refusing to report "
                "metrics"
            )


def cap_ranks(ranks: Tensor, rank_cap: int | None, n_items: int) -> Tensor:
    """Ranks above ``rank_cap`` as rank_cap + 1, keeping n_items + 1 (non-finite score)."""
    if rank_cap is None:
        return ranks
    return torch.where((ranks > rank_cap) & (ranks <= n_items), rank_cap + 1, ranks)


def _blocked_ranks(h, targets, weight, bias, ties, user, user_weight, act, block_cols, cap):
    """Ranks counted column block by column block, None where a target score differs from
    its block's value. With ``cap``, rows whose count passes it leave the product (their
    rank is only known to exceed it); once fewer than MIN_ROWS are left, those finish on
    the plain path."""
    n_rows, n_items = h.shape[0], weight.shape[0]
    t = _target_scores(h, targets, weight, bias, user, user_weight, act)
    compare = torch.Tensor.ge_ if ties == "conservative" else torch.Tensor.gt_
    # rank = count (conservative) or count + 1 (optimistic); rank > cap <=> count > limit
    limit = None if cap is None else cap - (ties != "conservative")
    count = torch.zeros(n_rows, dtype=torch.float64)
    seen = torch.full_like(t, float("nan"))  # each target's score as its column block gave it
    plain = torch.zeros(n_rows, dtype=torch.long)  # ranks of rows finished on the plain path
    done_plain = torch.zeros(n_rows, dtype=torch.bool)
    alive = torch.arange(n_rows)  # rows still counted
    a_h, a_t, a_tg, a_u = h, t, targets, user
    a_count, a_seen = count.clone(), seen.clone()
    buf = torch.empty(0, dtype=t.dtype)
    lo = 0
    while lo < n_items and alive.numel():
        m = alive.numel()
        if m < MIN_ROWS:  # too few rows for the blocked kernels: the plain path, in full
            scores = linear_scores(a_h, weight, bias, a_u, user_weight, act)
            plain[alive] = target_ranks(scores, a_tg, ties)
            done_plain[alive] = True
            alive, a_count, a_seen = alive[:0], a_count[:0], a_seen[:0]
            break
        cols = max(block_cols or BLOCK_BYTES // (4 * m), MIN_ROWS)
        hi = lo + _splits(n_items - lo, cols)[1]
        s, buf = block_scores(buf, a_h, weight, bias, a_u, user_weight, act, lo, hi)
        local = a_tg - lo
        inside = (local >= 0) & (local < hi - lo)
        own = s.gather(1, local.clamp(0, hi - lo - 1)[:, None])[:, 0]
        a_seen = torch.where(inside, own, a_seen)
        a_count.add_(compare(s, a_t[:, None]).sum(1))
        lo = hi
        if limit is not None and lo < n_items:
            out = a_count > limit
            if bool(out.any()):
                count[alive[out]], seen[alive[out]] = a_count[out], a_seen[out]
                keep = ~out
                alive, a_h, a_t, a_tg = alive[keep], a_h[keep], a_t[keep], a_tg[keep]
                a_count, a_seen = a_count[keep], a_seen[keep]
                a_u = a_u[keep] if a_u is not None else None
    count[alive], seen[alive] = a_count, a_seen
    return final_ranks(t, count, seen, alive, done_plain, plain, ties, n_items)


def final_ranks(t, count, seen, alive, done_plain, plain, ties, n_items) -> Tensor | None:
    """The ranks of a blocked pass from its counts (None where a target score the blocks
    gave differs from ``t``: the caller takes the plain path)."""
    finite = torch.isfinite(t)
    full = torch.zeros(t.shape[0], dtype=torch.bool)
    full[alive] = True  # counted over every column: their own target's included
    checked = (full | ~seen.isnan()) & ~done_plain & finite
    if bool((checked & (seen != t)).any()):
        return None
    ranks = count.long() if ties == "conservative" else count.long() + 1
    ranks = torch.where(done_plain, plain, ranks)
    return ranks.masked_fill_(~finite, n_items + 1)


def sparse_ranks(
    sorted_base: Tensor,
    base: Tensor,
    rows: Tensor,
    items: Tensor,
    values: Tensor,
    targets: Tensor,
    ties: str = "conservative",
) -> Tensor:
    """Ranks [N] of targets [N] for scores that are ``base`` [n_items] in every row except
    the entries (rows [E], items [E]) -> values [E] (an item at most once per row): the
    ranks ``target_ranks`` gives on that score matrix, with O(E + N log n_items) work.
    ``sorted_base``: ``base`` sorted ascending (computed once per pass by the caller).
    Scores must be finite (the caller checks them).

    A row's count of items scoring >= (or >) its target's score s is the base's count,
    found by binary search, minus the row's entries' base scores that count, plus their
    own scores that count."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    n_items = base.numel()
    own = items == targets[rows]  # the entries that hold their row's target
    target_score = base[targets].index_put((rows[own],), values[own])  # [N]
    optimistic = ties == "optimistic"
    count = n_items - torch.searchsorted(sorted_base, target_score, right=optimistic)
    compare = torch.gt if optimistic else torch.ge
    s = target_score[rows]
    delta = compare(values, s).long() - compare(base[items], s).long()  # [E]
    count = count.index_add(0, rows, delta)
    ranks = count + 1 if optimistic else count
    return ranks.masked_fill(~torch.isfinite(target_score), n_items + 1)


def bound_misses(
    h: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor,
    rows: Tensor,
    items: Tensor,
    rank_cap: int,
    user: Tensor | None = None,
    user_weight: Tensor | None = None,
    act: str = "linear",
    max_rows: int = 1024,
) -> Tensor:
    """[N] bool: the targets known to rank above ``rank_cap`` (conservative ties) from a
    lower bound of the scores (``api.ScoreBound``): more than ``rank_cap`` items score at
    least the target on the linear form ``act(h @ weight.T + bias.T (+ user @
    user_weight.T))`` (``catalogue_ranks``, so rows leave the product early), and the
    target is not among its row's entries (rows [E], items [E]), where the scores may
    exceed the bound. The other targets need their scores."""
    n_items = weight.shape[0]
    ranks = catalogue_ranks(
        h, targets, weight, bias, "conservative", user, user_weight, act, max_rows=max_rows,
        rank_cap=rank_cap,
    )  # fmt: skip
    listed = torch.zeros_like(targets, dtype=torch.bool)
    listed[rows[items == targets[rows]]] = True
    return (ranks > rank_cap) & (ranks <= n_items) & ~listed
