"""A chunk's candidate items per time step: the slots' targets (in-batch negatives for the
other slots), then the step's sampled negatives, and their distinct values, computed once
per chunk (one host sync) instead of once per step."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hrnn_lit.ops import native
from hrnn_lit.ops.sampling import PopularitySampler


class Candidates(NamedTuple):
    """One step's candidates: ``ids`` [N] (the B targets first), their distinct values
    ``uniq`` [M], each column's index into them ``inverse`` [N], and each distinct item's
    number of occurrences among the valid columns ``counts`` [M] (int64)."""

    ids: Tensor
    uniq: Tensor
    inverse: Tensor
    counts: Tensor


def _counts(inverse: Tensor, valid: Tensor, size: int) -> Tensor:
    """How often each of ``size`` distinct candidates occurs among the valid columns (the
    B slots' targets where valid [..., B], then the samples), from each column's index
    into them, inverse [..., N] (indices over all rows when batched): int64 [size]."""
    occurs = torch.ones_like(inverse)
    occurs[..., : valid.shape[-1]] = valid
    return torch.zeros(size, dtype=torch.long, device=inverse.device).index_add_(
        0, inverse.reshape(-1), occurs.reshape(-1)
    )


def chunk_unique(x: Tensor, n: int) -> tuple[Tensor, Tensor, list[int]]:
    """``torch.unique(x[t], return_inverse=True)`` of every row of x [T, M] (values in
    [0, n)) in one call, on keys t * n + x: the rows' sorted distinct values concatenated,
    the inverse [T, M] (indices into the row's own values) and the rows' offsets into the
    values as host ints. Row t: ``values[off[t]:off[t + 1]], inverse[t]``."""
    T = x.shape[0]
    base = torch.arange(T, device=x.device)[:, None] * n  # [T, 1]
    keys, inverse = torch.unique(x + base, return_inverse=True)
    row = keys.div(n, rounding_mode="floor")
    starts = torch.zeros(T + 1, dtype=torch.long, device=x.device)
    starts[1:] = torch.bincount(row, minlength=T).cumsum(0)
    return keys - row * n, inverse - starts[:-1, None], starts.tolist()


def chunk_candidates(candidates: Tensor, valid: Tensor, n: int) -> list[Candidates]:
    """``Candidates`` of every time step of a chunk: candidates [T, N] (values in [0, n)),
    valid slots [T, B]. On CPU through ``native.distinct_rows`` (a bitset per row) where it
    applies, else one ``torch.unique`` for the whole chunk."""
    out = native.distinct_rows(candidates, n, valid, counts=True)
    if out is not None:
        values, inverse, offsets, counts = out
    else:
        values, inverse, offsets = chunk_unique(candidates, n)
        shift = torch.tensor(offsets[:-1], device=inverse.device)[:, None]  # [T, 1]
        counts = _counts(inverse + shift, valid, values.numel())
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    return [
        Candidates(ids, uniq, inv, cnt)
        for ids, uniq, inv, cnt in zip(
            candidates.unbind(), values.split(sizes), inverse.unbind(), counts.split(sizes)
        )
    ]


def step_candidates(candidates: Tensor, valid: Tensor, n: int) -> Candidates:
    """``chunk_candidates`` of one step's candidates [N]."""
    return chunk_candidates(candidates[None], valid[None], n)[0]


class CandidateSampler:
    """A chunk's candidates: the slots' targets (in-batch negatives for the other slots),
    then ``n_sample`` items drawn by popularity ** ``alpha``, and their logQ correction
    (``logq * log q(item)``, q the column's drawing weight as in the official GRU4Rec code:
    q = count for the targets, which come from the data; count ** alpha for the samples;
    both unnormalised), subtracted from their training scores. ``counts`` [n_items]."""

    def __init__(self, counts: Tensor, n_sample: int, alpha: float, logq: float):
        self.counts, self.n_sample, self.alpha, self.logq = counts, n_sample, alpha, logq
        self._sampler: PopularitySampler | None = None
        self._log_counts: Tensor | None = None

    def draw(self, target: Tensor) -> Tensor:
        """Candidates [T, B + S] of the targets [T, B]."""
        if self.n_sample == 0:
            return target
        if self._sampler is None:
            self._sampler = PopularitySampler(self.counts.cpu().numpy(), self.alpha)
            self._sampler.to(target.device)
        samples = self._sampler.draw((target.shape[0], self.n_sample))
        return torch.cat([target, samples], dim=1)

    def logq_bias(self, cand: Tensor, B: int, dtype: torch.dtype) -> Tensor | None:
        """The logQ correction [T, B + S] of candidates ``cand`` (None where logq is 0)."""
        if not self.logq:
            return None
        if self._log_counts is None:
            self._log_counts = self.counts.to(torch.float32).clamp(min=1).log()
        log_c = self._log_counts.to(cand.device, dtype)[cand]  # [T, B + S]
        return torch.cat([self.logq * log_c[:, :B], (self.logq * self.alpha) * log_c[:, B:]], 1)
