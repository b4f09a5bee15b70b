"""Top-k of score rows with a fixed order: best score first, equal scores in catalogue
order, so a recommendation does not depend on the kernel or the batch it was computed in."""

from __future__ import annotations

import torch
from torch import Tensor


def exclude_items(scores: Tensor, items: list[Tensor]) -> None:
    """Set ``scores[i, items[i]]`` to -inf in place (items nobody should be offered)."""
    if not items:
        return
    rows = torch.repeat_interleave(
        torch.arange(len(items), device=scores.device),
        torch.tensor([x.numel() for x in items], device=scores.device),
    )
    cols = torch.cat(items).to(scores.device)
    scores[rows, cols] = float("-inf")


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Items [N, k] and their scores, best first; ties broken by the lower item index.
    -1 (with a -inf score) where a row has fewer than k items above -inf."""
    n, n_items = scores.shape
    kk = min(k, n_items)
    if n == 0 or kk == 0:
        return scores.new_full((n, k), -1, dtype=torch.long), scores.new_zeros((n, k))
    top = torch.topk(scores, min(kk + 1, n_items), dim=1)  # sorted, best first
    if (top.values[:, 1:] != top.values[:, :-1]).all() and bool(torch.isfinite(top.values).all()):
        # no two of the k + 1 best are equal: the order is the only one (the common case)
        return _padded(top.indices[:, :kk], top.values[:, :kk], k)
    kth = top.values[:, kk - 1 : kk]  # [N, 1] the k-th best score
    # every item at or above the k-th best score, in (row, item) order; sorted by score
    # (stable: equal scores keep item order), then by row (stable: keeps the score order)
    row, col = (scores >= kth).nonzero(as_tuple=True)
    val = scores[row, col]
    order = torch.sort(val, descending=True, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    row, col, val = row[order], col[order], val[order]
    start = torch.searchsorted(row, torch.arange(n, device=row.device))
    pos = torch.arange(row.numel(), device=row.device) - start[row]
    take = pos < kk
    items = scores.new_full((n, k), -1, dtype=torch.long)
    values = scores.new_full((n, k), float("-inf"))
    items[row[take], pos[take]] = col[take]
    values[row[take], pos[take]] = val[take]
    bad = ~torch.isfinite(values) | (values == float("-inf"))
    items[bad] = -1
    return items, values


def _padded(items: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """[N, kk] results widened to k columns with -1 / -inf."""
    if items.shape[1] == k:
        return items, values
    pad = k - items.shape[1]
    return (torch.nn.functional.pad(items, (0, pad), value=-1),
            torch.nn.functional.pad(values, (0, pad), value=float("-inf")))  # fmt: skip
