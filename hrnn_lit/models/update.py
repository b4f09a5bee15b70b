"""One training step of the recurrent core, forward and backward by hand.

A step (DESIGN §2: one update per time step, no back-propagation through time) is the
session-GRU step, the scores of the step's targets and sampled negatives, the loss and the
gradients of every parameter the step touched. They are set as ``.grad``: dense for the GRU
weights, and for the item tables a coalesced row-sparse gradient with one row per distinct
item, so the optimiser, gradient clipping and data-parallel averaging see what autograd on
``nn.Embedding(sparse=True)`` would give them, without its per-occurrence rows, sort and
merge. No autograd graph is built on this hot path; autograd only back-propagates into the
user level (HRNN session starts), whose graph ends in the step's starting state.

The loss is the mean over the step's valid slots; the gradient is that of the loss times
the share of valid slots, i.e. of the sum over valid slots / B. The results equal autograd
through ``RecurrentCore.step``, ``score_items`` and that scaled loss (tests/test_update.py).
Shapes: B slots, H session units, U user units, N candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hrnn_lit.models.core import RecurrentCore

LossGrad = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _act_derivative(name: str, y: Tensor) -> Tensor | None:
    """d y / d s of the final activation y = act(s), from y (None: identity)."""
    if name == "linear":
        return None
    if name == "tanh":
        return 1 - y * y
    if name == "relu":
        return y > 0
    raise ValueError(f"unknown final activation {name!r}")


def _rows_grad(shape: torch.Size, uniq: Tensor, inv: Tensor, per_occurrence: Tensor) -> Tensor:
    """Coalesced sparse gradient of a [n_items, D] table: rows of repeated items summed."""
    rows = per_occurrence.new_zeros(uniq.numel(), per_occurrence.shape[1])
    rows.index_add_(0, inv, per_occurrence)
    return torch.sparse_coo_tensor(
        uniq[None], rows, shape, is_coalesced=True, check_invariants=False
    )


@torch.no_grad()
def forward(
    core: RecurrentCore,
    loss_grad: LossGrad,
    item: Tensor,
    h: Tensor,
    c: Tensor,
    candidates: Tensor,
    valid: Tensor,
) -> tuple[Tensor, Tensor, dict]:
    """Session-GRU step on input items [B] from states h [B, H], c [B, U], scores of the
    candidates [N] (targets first), the loss and its gradient. Returns (new h [B, H], loss,
    what ``backward`` needs)."""
    H, B = core.hidden_size, item.numel()
    h_prev, c_in = h.detach(), c.detach()
    gi = core.item_in.weight.index_select(0, item).add_(core.bias_in)  # [B, 3H]
    gh = torch.addmm(core.w_h.bias, h_prev, core.w_h.weight.T)  # [B, 3H]
    if core.user_propagation == "all":
        gi[:, : 2 * H].addmm_(c_in, core.w_c.weight.T)
    rz = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])  # [B, 2H]
    r, z = rz[:, :H], rz[:, H:]
    h_n = gh[:, 2 * H :]
    n = torch.tanh(torch.addcmul(gi[:, 2 * H :], r, h_n))  # [B, H]
    h_new = torch.lerp(n, h_prev, z)  # (1 - z) * n + z * h

    p_drop = core.drop_session.p if core.training else 0.0
    mask = None
    h_out = h_new
    if p_drop > 0:  # the same draws as nn.Dropout: equal masks for equal RNG states
        mask = torch.empty_like(h_new).bernoulli_(1 - p_drop).div_(1 - p_drop)
        h_out = h_new * mask
    w_out = core.out_w.weight.index_select(0, candidates)  # [N, H]
    b_out = core.out_b.weight.index_select(0, candidates).view(-1)  # [N]
    s = torch.addmm(b_out, h_out, w_out.T)  # [B, N]
    u_out = None
    if core.user_to_output:
        u_out = core.out_u.weight.index_select(0, candidates)  # [N, U]
        s.addmm_(c_in, u_out.T)
    y = core.final_act(s)
    d_act = _act_derivative(core.final_act_name, y)
    loss, ds = loss_grad(y, valid)  # may overwrite y; loss = mean over the valid slots
    # the update weighs each slot alike, an empty one as zero: a step with few valid slots
    # (the epoch's last steps, where few users are left) moves the weights that much less
    share = valid.sum().to(ds.dtype) / B  # of the slots
    ds.mul_(share if d_act is None else d_act * share)  # [B, N]
    cache = dict(
        h=h, c=c, h_prev=h_prev, c_in=c_in, item=item, candidates=candidates, r=r, z=z,
        n=n, h_n=h_n, mask=mask, h_out=h_out, w_out=w_out, u_out=u_out, ds=ds,
    )  # fmt: skip
    return h_new, loss, cache


@torch.no_grad()  # gradients by hand; autograd.backward below still runs
def backward(core: RecurrentCore, cache: dict) -> None:
    """Set ``.grad`` of every parameter the step touched (they must be None before)."""
    H = core.hidden_size
    ds, h_prev, c_in, r, z, n = (cache[k] for k in ("ds", "h_prev", "c_in", "r", "z", "n"))
    h, c = cache["h"], cache["c"]

    # ---- output layer
    uniq, inv = torch.unique(cache["candidates"], return_inverse=True)
    core.out_w.weight.grad = _rows_grad(core.out_w.weight.shape, uniq, inv, ds.T @ cache["h_out"])
    core.out_b.weight.grad = _rows_grad(core.out_b.weight.shape, uniq, inv, ds.sum(0)[:, None])
    dh = ds @ cache["w_out"]  # [B, H]
    dc = None
    if core.user_to_output:
        core.out_u.weight.grad = _rows_grad(core.out_u.weight.shape, uniq, inv, ds.T @ c_in)
        dc = ds @ cache["u_out"]  # [B, U]
    if cache["mask"] is not None:
        dh.mul_(cache["mask"])

    # ---- session GRU (da: gradients of the gates' pre-activations a_r, a_z, a_n)
    da = torch.empty(h_prev.shape[0], 3 * H, dtype=ds.dtype, device=ds.device)  # [B, 3H]
    a_r, a_z, a_n = da[:, :H], da[:, H : 2 * H], da[:, 2 * H :]
    torch.mul(dh, 1 - z, out=a_n).mul_(1 - n * n)
    torch.mul(dh, h_prev - n, out=a_z).mul_(z * (1 - z))
    torch.mul(a_n, cache["h_n"], out=a_r).mul_(r * (1 - r))
    dgh = da.clone()  # [B, 3H] = d gh: the candidate's part goes through r
    dgh[:, 2 * H :].mul_(r)
    in_uniq, in_inv = torch.unique(cache["item"], return_inverse=True)
    core.item_in.weight.grad = _rows_grad(core.item_in.weight.shape, in_uniq, in_inv, da)
    core.bias_in.grad = da.sum(0)
    core.w_h.weight.grad = dgh.T @ h_prev
    core.w_h.bias.grad = dgh.sum(0)
    if core.user_propagation == "all":
        core.w_c.weight.grad = da[:, : 2 * H].T @ c_in
        if c.requires_grad:
            dc_all = da[:, : 2 * H] @ core.w_c.weight
            dc = dc_all if dc is None else dc.add_(dc_all)

    # ---- into the user level: the graph of this step's session starts
    roots, grads = [], []
    if h.requires_grad:
        roots.append(h)
        grads.append(torch.addmm(dh * z, dgh, core.w_h.weight))  # d h_prev
    if c.requires_grad and dc is not None:
        roots.append(c)
        grads.append(dc)
    if roots:
        torch.autograd.backward(roots, grads)


def train_step(
    core: RecurrentCore,
    loss_grad: LossGrad,
    item: Tensor,
    h: Tensor,
    c: Tensor,
    candidates: Tensor,
    valid: Tensor,
) -> tuple[Tensor, Tensor]:
    """``forward`` then ``backward``: sets the gradients, returns (new h, loss)."""
    h_new, loss, cache = forward(core, loss_grad, item, h, c, candidates, valid)
    backward(core, cache)
    return h_new, loss
