"""The repeat shares (docs/design.md §6): how many of the items a user had before are in
each scored event's top K, computed in the same column blocks as ``ranking``'s ranks.

An item is in the top K when its own rank, by the run's tie rule, is at most K (as a
target's), and the count is at most K. So only each row's K+1 largest scores and the
scores of its user's earlier items are needed: conservative, rank(j) <= K iff
s_j > (the (K+1)-th largest score); optimistic, iff s_j >= (the K-th largest).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.evaluation.metrics import TIES, target_ranks
from hrnn_lit.evaluation.ranking import (
    ACTS,
    BLOCK_BYTES,
    MIN_ROWS,
    _splits,
    _target_scores,
    block_scores,
    cap_ranks,
    final_ranks,
    linear_scores,
)


def top_values(scores: Tensor, k: int) -> Tensor:
    """[N, k] the k largest scores of each row, descending, padded with -inf."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).values
    if top.shape[1] < k:
        top = torch.nn.functional.pad(top, (0, k - top.shape[1]), value=float("-inf"))
    return top


def repeat_counts(
    top: Tensor, pair_rows: Tensor, pair_scores: Tensor, ks, ties: str = "conservative"
) -> Tensor:
    """[N, len(ks)] how many of each row's earlier items (pairs: row [P], score [P]) are in
    its top K, for each K of ``ks``; ``top``: the rows' max(ks) + 1 largest scores."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    n = top.shape[0]
    out = torch.zeros(n, len(ks), dtype=torch.long, device=top.device)
    for i, k in enumerate(ks):
        if ties == "conservative":
            inside = pair_scores > top.select(1, k).index_select(0, pair_rows)
        else:
            inside = pair_scores >= top.select(1, k - 1).index_select(0, pair_rows)
        out[:, i].index_add_(0, pair_rows, inside.long()).clamp_(max=k)
    return out


def dense_repeat_counts(
    scores: Tensor, pair_rows: Tensor, pair_items: Tensor, ks, ties: str = "conservative"
) -> Tensor:
    """``repeat_counts`` from the full score matrix [N, n_items]."""
    top = top_values(scores, max(ks) + 1)
    own = scores.reshape(-1).index_select(0, pair_rows * scores.shape[1] + pair_items)
    return repeat_counts(top, pair_rows, own, ks, ties)


def catalogue_ranks_repeat(
    h: Tensor,
    targets: Tensor,
    pair_rows: Tensor,
    pair_items: Tensor,
    weight: Tensor,
    bias: Tensor,
    ks,
    ties: str = "conservative",
    user: Tensor | None = None,
    user_weight: Tensor | None = None,
    act: str = "linear",
    max_rows: int = 1024,
    block_cols: int | None = None,
    rank_cap: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``catalogue_ranks`` (same arguments and ranks) and, from the same column blocks of
    the product, ``repeat_counts`` [N, len(ks)] for the pairs (row [P] ascending, item [P]:
    each row's earlier items). A row leaves the product once its rank passes ``rank_cap`` and
    none of its pairs can reach its top max(ks) + 1 any more (the pairs' items are scored
    first); a row block with a target score off its block's value, or too small for the
    blocked kernels, is scored in full (the plain path)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    n_rows, n_items = h.shape[0], weight.shape[0]
    if user_weight is None:
        user = None
    cpu = h.device.type == "cpu"
    if not cpu:
        rows = max(1, min(max_rows, (32 << 20) // (4 * n_items)))
        bounds = list(range(0, n_rows, rows)) + [n_rows]
    else:
        bounds = _splits(n_rows, max(1, max_rows))
    pair_bounds = torch.searchsorted(pair_rows, torch.tensor(bounds, device=pair_rows.device))
    pair_bounds = pair_bounds.tolist()
    ranks_parts, count_parts = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        hb, tb = h[lo:hi], targets[lo:hi]
        ub = None if user is None else user[lo:hi]
        pr = pair_rows[pair_bounds[i] : pair_bounds[i + 1]] - lo
        pi = pair_items[pair_bounds[i] : pair_bounds[i + 1]]
        out = None
        if cpu and hi - lo >= MIN_ROWS and n_items >= 2 * MIN_ROWS:
            with torch.no_grad():
                out = _blocked_ranks_repeat(
                    hb, tb, pr, pi, weight, bias, ties, ub, user_weight, act, block_cols,
                    rank_cap, ks,
                )  # fmt: skip
        if out is None:  # plain path (also where a target score was off its block's)
            scores = linear_scores(hb, weight, bias, ub, user_weight, act)
            out = target_ranks(scores, tb, ties), dense_repeat_counts(scores, pr, pi, ks, ties)
        ranks_parts.append(cap_ranks(out[0], rank_cap, n_items))
        count_parts.append(out[1])
    if not ranks_parts:
        return targets.new_zeros(0), torch.zeros(0, len(ks), dtype=torch.long)
    return torch.cat(ranks_parts), torch.cat(count_parts)


def _blocked_ranks_repeat(h, targets, p_row, p_item, weight, bias, ties, user, user_weight,
                          act, block_cols, cap, ks):  # fmt: skip
    """``_blocked_ranks`` (the same counting, checks and plain finish) that also keeps each
    row's max(ks) + 1 largest scores and its pairs' scores; (ranks, counts) or None.

    The columns go in another order: first the items of any pair (ascending), then the
    others, as copies of the catalogue's rows (each score is still computed from its own
    row and column: the same bits). Once the pairs' items are done, every pair's score is
    known, and a row whose rank passed the cap leaves when its (max(ks) + 1)-th largest
    score so far is above all of its pairs' (none can be in its top K); a row without pairs
    leaves as in ``_blocked_ranks``."""
    n_rows, n_items = h.shape[0], weight.shape[0]
    k1 = max(ks) + 1
    t = _target_scores(h, targets, weight, bias, user, user_weight, act)
    items = torch.unique(p_item)  # sorted
    n_first = items.numel()
    if 0 < n_first < n_items:  # the pairs' items first
        rest = torch.ones(n_items, dtype=torch.bool)
        rest[items] = False
        order = torch.cat([items, rest.nonzero().view(-1)])
        pos = torch.empty(n_items, dtype=torch.long)
        pos[order] = torch.arange(n_items)
        o_weight, o_bias = weight.index_select(0, order), bias.index_select(0, order)
        o_user_weight = None if user_weight is None else user_weight.index_select(0, order)
        t_pos, p_pos = pos.index_select(0, targets), pos.index_select(0, p_item)
    else:
        o_weight, o_bias, o_user_weight, t_pos, p_pos = weight, bias, user_weight, targets, p_item
    has_pair = torch.zeros(n_rows, dtype=torch.bool)
    has_pair[p_row] = True
    compare = torch.Tensor.ge_ if ties == "conservative" else torch.Tensor.gt_
    limit = None if cap is None else cap - (ties != "conservative")
    count = torch.zeros(n_rows, dtype=torch.float64)
    seen = torch.full_like(t, float("nan"))
    p_score = torch.full((p_item.numel(),), float("nan"), dtype=h.dtype)
    plain = torch.zeros(n_rows, dtype=torch.long)
    plain_count = torch.zeros(n_rows, len(ks), dtype=torch.long)
    done_plain = torch.zeros(n_rows, dtype=torch.bool)
    alive = torch.arange(n_rows)
    where = torch.arange(n_rows)  # row -> its index among the alive rows (-1: gone)
    p_where = p_row.clone()  # each pair's row among the alive rows
    a_h, a_t, a_tg, a_u, a_pair = h, t, t_pos, user, has_pair
    a_count, a_seen, a_best = count.clone(), seen.clone(), None
    a_bound = torch.full((n_rows,), float("-inf"), dtype=h.dtype)  # <= each row's k1-th
    cand_rows, cand_slots, cand_values = [], [], []  # each score >= its row's bound then
    n_cand = torch.zeros(n_rows, dtype=torch.long)  # candidates of each row so far
    buf = torch.empty(0, dtype=t.dtype)
    lo = 0
    while lo < n_items and alive.numel():
        m = alive.numel()
        if m < MIN_ROWS:  # too few rows for the blocked kernels: the plain path, in full
            scores = linear_scores(a_h, weight, bias, a_u, user_weight, act)
            plain[alive] = target_ranks(scores, targets.index_select(0, alive), ties)
            mine = (p_where >= 0).nonzero().view(-1)
            plain_count[alive] = dense_repeat_counts(
                scores, p_where.index_select(0, mine), p_item.index_select(0, mine), ks, ties
            )
            done_plain[alive] = True
            alive, a_count, a_seen = alive[:0], a_count[:0], a_seen[:0]
            break
        cols = max(block_cols or BLOCK_BYTES // (4 * m), MIN_ROWS)
        end = n_first if lo < n_first else n_items  # a block ends where the pairs' items do
        hi = lo + _splits(end - lo, cols)[1]
        s, buf = block_scores(buf, a_h, o_weight, o_bias, a_u, o_user_weight, act, lo, hi)
        if lo < n_first:
            sel = ((p_pos >= lo) & (p_pos < hi) & (p_where >= 0)).nonzero().view(-1)
            flat = p_where.index_select(0, sel) * (hi - lo) + p_pos.index_select(0, sel) - lo
            p_score.index_copy_(0, sel, s.reshape(-1).index_select(0, flat))
        a_bound, at = _candidates(s, a_bound, k1)
        local_rows = at // (hi - lo)  # ascending
        per_row = torch.bincount(local_rows, minlength=m)
        first = torch.cumsum(per_row, 0) - per_row
        rows = alive.index_select(0, local_rows)
        cand_rows.append(rows)
        cand_slots.append(n_cand.index_select(0, rows) + torch.arange(at.numel())
                          - first.index_select(0, local_rows))  # fmt: skip
        cand_values.append(s.reshape(-1).index_select(0, at))
        n_cand.index_add_(0, alive, per_row)
        local = a_tg - lo
        inside = (local >= 0) & (local < hi - lo)
        own = s.gather(1, local.clamp(0, hi - lo - 1)[:, None])[:, 0]
        a_seen = torch.where(inside, own, a_seen)
        a_count.add_(compare(s, a_t[:, None]).sum(1))  # (s is overwritten)
        lo = hi
        if limit is None or lo >= n_items:
            continue
        if a_best is None and lo >= n_first:  # every pair's score is known: its row's best
            best = torch.full((n_rows,), float("-inf"), dtype=h.dtype)
            a_best = best.scatter_reduce(0, p_row, p_score, "amax").index_select(0, alive)
        out = a_count > limit
        out &= ~a_pair if a_best is None else ~a_pair | (a_bound > a_best)
        if bool(out.any()):
            gone = alive[out]
            count[gone], seen[gone] = a_count[out], a_seen[out]
            keep = ~out
            alive, a_h, a_t, a_tg = alive[keep], a_h[keep], a_t[keep], a_tg[keep]
            a_count, a_seen, a_bound = a_count[keep], a_seen[keep], a_bound[keep]
            a_pair = a_pair[keep]
            a_best = a_best[keep] if a_best is not None else None
            a_u = a_u[keep] if a_u is not None else None
            where[gone] = -1
            where[alive] = torch.arange(alive.numel())
            p_where = where.index_select(0, p_row)
    count[alive], seen[alive] = a_count, a_seen
    width = max(int(n_cand.max()), k1)
    top = torch.full((n_rows, width), float("-inf"), dtype=h.dtype)
    if cand_rows:
        flat = torch.cat(cand_rows) * width + torch.cat(cand_slots)
        top.view(-1).index_copy_(0, flat, torch.cat(cand_values))
    top = top.topk(k1, dim=1).values
    ranks = final_ranks(t, count, seen, alive, done_plain, plain, ties, n_items)
    if ranks is None:
        return None
    counts = repeat_counts(top, p_row, p_score, ks, ties)
    return ranks, torch.where(done_plain[:, None], plain_count, counts)


def _candidates(s: Tensor, bound: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The scores of the block ``s`` [m, c] that may be among their row's k largest: each
    row's bound [m] (a lower bound of its k-th largest score) raised to the smallest of the
    maxima of k groups of the block's columns (k groups: at least k scores above it), and
    the flat indices of the scores >= it (ascending: row-major)."""
    m, c = s.shape
    if c >= k:  # (a view of each row's first k * size scores, no copy)
        size = c // k
        groups = s.as_strided((m, k, size), (s.stride(0), size, 1))
        bound = torch.maximum(bound, groups.amax(2).amin(1))
    return bound, (s >= bound[:, None]).view(-1).nonzero().view(-1)
