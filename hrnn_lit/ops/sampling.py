"""Extra negative samples drawn by popularity^alpha, in bulk for a whole chunk of steps."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MAX_BUCKETS = 1 << 22  # guide table: at most 16 MB of int32


def _guide(cdf: Tensor) -> tuple[int, Tensor, Tensor] | None:
    """A guide table for inverse-CDF draws: K equal buckets of [0, 1); per bucket k the item
    ``searchsorted(cdf, u, right=True)`` gives just below the bucket (``lo[k]``), and per
    item i the next item of non-zero weight (``nxt[i]``). K is the first of 16n, 32n, ...
    for which every bucket, widened by half a bucket each side, holds at most one item
    boundary: then for u in bucket k the item is nxt[lo[k]] where cdf[lo[k]] <= u, else
    lo[k]. The margin covers float32 rounding of u * K (<= 1/8 of a bucket for K <= 2^22)
    and of the edges. None where no K up to ``MAX_BUCKETS`` qualifies (then every draw
    searches)."""
    nxt = torch.searchsorted(cdf, cdf, right=True)  # skips zero-weight items
    K = 16 * cdf.numel()
    while K <= MAX_BUCKETS:
        k = torch.arange(K, dtype=torch.float64)
        lo = torch.searchsorted(cdf, ((k - 0.5) / K).to(cdf.dtype), right=True)
        hi = torch.searchsorted(cdf, ((k + 1.5) / K).to(cdf.dtype), right=True)
        if bool((hi <= nxt[lo]).all()):
            return K, lo.to(torch.int32), nxt.to(torch.int32)
        K *= 2
    return None


class PopularitySampler:
    """Draws item indices with P(i) proportional to count_i ** alpha (alpha=0: uniform).

    A draw is ``searchsorted(cdf, u, right=True)`` of a uniform u; with the guide table
    (``_guide``) it takes one table lookup and one comparison instead of a binary search
    (x5 faster for 131k draws over 20k items on our CPU), with the same result for every u.
    """

    def __init__(self, counts: np.ndarray, alpha: float = 0.5):
        counts = torch.as_tensor(counts, dtype=torch.float64).clamp(min=0)
        weights = torch.where(counts > 0, counts**alpha, 0.0)  # 0 ** 0 would be 1
        if weights.sum() <= 0:
            raise ValueError("item counts must not all be zero")
        cdf = torch.cumsum(weights, 0)
        self.cdf = (cdf / cdf[-1]).to(torch.float32)
        self.cdf[-1] = 1.0
        guide = _guide(self.cdf)
        self.buckets, self.lo, self.nxt = guide if guide is not None else (0, None, None)

    def to(self, device: torch.device) -> PopularitySampler:
        self.cdf = self.cdf.to(device)
        if self.lo is not None:
            self.lo, self.nxt = self.lo.to(device), self.nxt.to(device)
        return self

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        return self.items(torch.rand(shape, device=self.cdf.device, generator=generator))

    def items(self, u: Tensor) -> Tensor:
        """The item of each u in [0, 1): ``searchsorted(cdf, u, right=True)``."""
        n = self.cdf.numel()
        if self.lo is None:
            return torch.searchsorted(self.cdf, u, right=True).clamp_(max=n - 1)
        K = self.buckets
        i = self.lo[(u * K).long().clamp_(max=K - 1)].long()
        return torch.where(self.cdf[i] <= u, self.nxt[i].long(), i).clamp_(max=n - 1)
