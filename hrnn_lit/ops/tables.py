"""Rows of an item table with a row-sparse gradient.

``rows(weight, items)`` is ``weight[items]``; its gradient for ``weight`` is a coalesced
sparse tensor with one row per distinct item (occurrences summed), which the row-sparse
optimisers, clipping and data-parallel averaging read without sorting anything. An
``nn.Embedding(sparse=True)`` gives one gradient row per occurrence instead."""

from __future__ import annotations

import collections

import torch
from torch import Tensor


def distinct(items: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``torch.unique(items, return_inverse=True)`` of items [N] in [0, n): the sorted
    distinct items and each entry's index into them."""
    return torch.unique(items, return_inverse=True)


_KNOWN: collections.deque = collections.deque(maxlen=16)  # row indices made here, held


def sparse_rows(rows: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """A coalesced sparse gradient of a table of ``shape`` from distinct sorted ``rows``
    [M] and their gradient rows ``values`` [M, D]."""
    indices = rows[None]
    _KNOWN.append(indices)
    return torch.sparse_coo_tensor(
        indices, values, shape, is_coalesced=True, check_invariants=False
    )


def known_distinct(idx: Tensor) -> bool:
    """Whether ``idx`` [M] (a gradient's row indices, which autograd hands on without the
    coalesced flag) is one of the last row-index tensors ``sparse_rows`` made: distinct and
    sorted by construction. Those tensors are held here, so their memory is not reused: a
    tensor at the same address with the same length is the same indices."""
    ptr = idx.data_ptr()
    for k in reversed(_KNOWN):  # the newest first: this step's
        if k.data_ptr() == ptr:
            return k.numel() == idx.numel() and idx.stride(-1) == 1
    return False


def row_sums(per_occurrence: Tensor, inverse: Tensor, m: int) -> Tensor:
    """Gradient rows [m, D] of distinct items from per-occurrence rows [N, D]."""
    out = per_occurrence.new_zeros(m, per_occurrence.shape[1])
    return out.index_add_(0, inverse, per_occurrence)


class _Rows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, items: Tensor) -> Tensor:
        ctx.save_for_backward(items)
        ctx.shape = weight.shape
        return weight.index_select(0, items)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (items,) = ctx.saved_tensors
        uniq, inv = distinct(items, ctx.shape[0])
        return sparse_rows(uniq, row_sums(grad, inv, uniq.numel()), ctx.shape), None


def rows(weight: Tensor, items: Tensor) -> Tensor:
    """``weight[items]`` [N, D] with a row-sparse gradient for ``weight`` (module docstring)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _Rows.apply(weight, items)
    return weight.index_select(0, items)
