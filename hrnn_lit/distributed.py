"""Collectives of data-parallel training: every rank calls them at the same point.

hrnn_lit makes one optimiser update per time step, many per Lightning batch, and torch's
DistributedDataParallel reducer supports one backward per forward. So each rank runs a
single-device Trainer, and the module averages gradients across ranks after every backward
(dense grads: one all-reduce; row-sparse item-table grads: one all-gather of the touched
rows), keeping the rows-only updates. The ranks and their process group come from
hrnn_lit/launch.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    """Whether a process group is up (data-parallel ranks)."""
    return dist.is_available() and dist.is_initialized()


def max_rows(net: torch.nn.Module, cand: Tensor, batch_size: int) -> int:
    """At most how many rows of one item table a step touches: its candidates [T, B + S],
    plus the B input items where the input embedding is the output matrix (tied)."""
    tied = getattr(net, "input_mode", None) == "constrained"
    return cand.shape[1] + (batch_size if tied else 0)


def replicate(module: torch.nn.Module, device: torch.device) -> None:
    """Move ``module`` to this rank's device, then give it rank 0's parameters and buffers.

    In this order: NCCL only moves device tensors, and every rank must start identical.
    """
    module.to(device)
    for t in module.state_dict().values():
        dist.broadcast(t, 0)


def gather_cat(t: Tensor) -> Tensor:
    """Concatenate a 1-d tensor of any length from every rank (rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def eval_gather():
    """How evaluation gathers per-event ranks: across data-parallel ranks, or not at all."""
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return gather_cat if parallel else None


def average_gradients(params: list[Tensor], max_rows: int | None = None) -> None:
    """Average every parameter's gradient over the ranks.

    Dense grads (and a has-grad flag each) go in one all-reduce. Row-sparse grads are
    padded to a common row count and all-gathered in one call for indices and one for
    values, then summed as a sparse tensor. The count is ``max_rows`` (what the built-in
    step touches at most) while every rank's tables fit it; a flag in the dense all-reduce
    tells whether one does not (a network may touch any rows, e.g. a history's items), and
    then one more small all-reduce agrees on the largest count. Without ``max_rows`` that
    all-reduce runs every time.
    """
    world = dist.get_world_size()
    dense, sparse = [], []
    for p in params:
        (sparse if p.grad is not None and p.grad.is_sparse else dense).append(p)
    device = params[0].device
    grads = [p.grad.coalesce() for p in sparse]
    most = max((g.indices().shape[1] for g in grads), default=0)
    over = float(bool(sparse) and (max_rows is None or most > max_rows))
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense]
        + [torch.tensor([float(p.grad is not None) for p in dense] + [over], device=device)]
    )
    dist.all_reduce(flat)
    flags, over = flat[-len(dense) - 1 : -1], flat[-1].item() > 0
    offset = 0
    for p, flag in zip(dense, flags.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) / world if flag > 0 else None
        offset += n
    if not sparse:
        return
    rows_each = max_rows
    if over:  # some rank touched more rows than max_rows: pad to the largest count
        count = torch.tensor([most], dtype=torch.long, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        rows_each = int(count.item())
    idx_parts, val_parts = [], []
    for p, g in zip(sparse, grads):
        rows, vals = g.indices()[0], g.values()
        idx = torch.zeros(rows_each, dtype=torch.long, device=device)
        val = torch.zeros(rows_each, p.shape[1], dtype=vals.dtype, device=device)
        idx[: rows.numel()] = rows
        val[: rows.numel()] = vals
        idx_parts.append(idx)
        val_parts.append(val.reshape(-1))
    idx_all, val_all = torch.cat(idx_parts), torch.cat(val_parts)
    idx_g = [torch.zeros_like(idx_all) for _ in range(world)]
    val_g = [torch.zeros_like(val_all) for _ in range(world)]
    dist.all_gather(idx_g, idx_all)
    dist.all_gather(val_g, val_all)
    i_off = v_off = 0
    for p in sparse:
        d = p.shape[1]
        rows = torch.cat([g[i_off : i_off + rows_each] for g in idx_g])
        vals = torch.cat([g[v_off : v_off + rows_each * d].view(rows_each, d) for g in val_g])
        grad = torch.sparse_coo_tensor(rows[None], vals / world, p.shape, check_invariants=False)
        p.grad = grad.coalesce()  # rows are in range by construction: no checks (nor warning)
        i_off += rows_each
        v_off += rows_each * d


def over_ranks(values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (``op="max"``: their maximum) over the ranks; as they are on one
    process. A CPU tensor: gloo carries it on GPU groups too (launch.py)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def check_in_sync(module: torch.nn.Module) -> None:
    """Raise if the ranks' parameters differ (they must stay identical after every step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    total = torch.stack([p.detach().double().sum() for p in module.parameters()])
    parts = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, total)
    if not all(torch.equal(parts[0], q) for q in parts[1:]):
        raise RuntimeError("data-parallel ranks hold different parameters after training")
