"""The GRU cell (torch's gate order r, z, n; reset applied after the hidden product):
r, z = sigmoid(gi_rz + gh_rz); n = tanh(gi_n + r * gh_n); h' = (1 - z) n + z h, from the
input and hidden projections gi, gh [R, 3K] (biases included) of the state h [R, K].
On CPU float32 it is one C pass forward and one backward (``native.gru_forward`` /
``gru_backward``, rounding like torch's ops, not bit for bit); elsewhere torch's ops.

The reset-before variant (the official GRU4Rec code's one-hot cell, ``GRUEmbedding``),
with the hidden weights of the candidate ``w_hn`` [K, K] passed: gh is then [R, 2K] (the
r and z parts only) and n = tanh(gi_n + (r * h) w_hn^T), no hidden bias on n; torch's ops
(autograd), on every device."""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.ops import native
from hrnn_lit.ops.activations import activation, activation_derivative


class _NativeGRUCell(torch.autograd.Function):
    """The C kernel with its own backward: the new state's gradient reaches gi, gh and h."""

    @staticmethod
    def forward(ctx, gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
        h_new, rz, n = native.gru_forward(gi, gh, h)
        ctx.save_for_backward(h, rz, n, gh)
        return h_new

    @staticmethod
    def backward(ctx, dh: Tensor):
        h, rz, n, gh = ctx.saved_tensors
        dh = dh.contiguous()
        out = native.gru_backward(dh, h, rz, n, gh)
        assert out is not None  # the forward ran natively on the same tensors
        dgi, dgh = out
        dh_prev = dh * rz[:, h.shape[1] :] if ctx.needs_input_grad[2] else None  # z (+ via gh)
        return dgi, dgh, dh_prev


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor, w_hn: Tensor | None = None) -> Tensor:
    """The new state [R, K] (see the module docstring); differentiable either way.
    ``w_hn``: the reset-before variant's candidate weights (gh then [R, 2K])."""
    if w_hn is not None:
        K = h.shape[1]
        rz = torch.sigmoid(gi[:, : 2 * K] + gh)  # [R, 2K]
        n = torch.tanh(torch.addmm(gi[:, 2 * K :], rz[:, :K] * h, w_hn.T))  # [R, K]
        return torch.lerp(n, h, rz[:, K:])
    if h.device.type == "cpu" and native.gru_supported(gi, gh, h):
        if torch.is_grad_enabled() and (gi.requires_grad or gh.requires_grad or h.requires_grad):
            return _NativeGRUCell.apply(gi, gh, h)
    return _gates(gi, gh, h)[0]  # (torch's ops: autograd where it records)


def zero_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x [B, D] with the rows flagged in ``rows`` [B] bool set to 0 (a copy). On CPU by
    index (faster than a broadcast mask there); elsewhere by mask (no host sync)."""
    if x.device.type == "cpu":
        return x.index_fill(0, rows.nonzero().view(-1), 0.0)
    return x.masked_fill(rows[:, None], 0.0)


def _gates(gi: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(new state, the gates [r, z] [R, 2K], the candidate n [R, K]) of the cell: the C
    kernel on CPU float32 where nothing records a gradient, else torch's ops."""
    if h.device.type == "cpu" and not (
        torch.is_grad_enabled() and (gi.requires_grad or gh.requires_grad or h.requires_grad)
    ):
        out = native.gru_forward(gi, gh, h)
        if out is not None:
            return out
    K = h.shape[1]
    rz = torch.sigmoid(gi[:, : 2 * K] + gh[:, : 2 * K])  # [R, 2K]
    n = torch.tanh(torch.addcmul(gi[:, 2 * K :], rz[:, :K], gh[:, 2 * K :]))  # [R, K]
    return torch.lerp(n, h, rz[:, K:]), rz, n  # (1 - z) * n + z * h


def _gates_backward(dh: Tensor, h: Tensor, rz: Tensor, n: Tensor, gh: Tensor):
    """(d gi, d gh) [R, 3K] from d h' [R, K]: the C kernel on CPU float32, else torch."""
    if dh.device.type == "cpu":
        out = native.gru_backward(dh.contiguous(), h, rz, n, gh)
        if out is not None:
            return out
    K = h.shape[1]
    r, z = rz[:, :K], rz[:, K:]
    da_n = dh * (1 - z) * (1 - n * n)
    da_z = dh * (h - n) * z * (1 - z)
    da_r = da_n * gh[:, 2 * K :] * r * (1 - r)
    dgi = torch.cat([da_r, da_z, da_n], 1)
    return dgi, torch.cat([da_r, da_z, da_n * r], 1)


class _UserStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, c, w_ih, b_ih, w_hh, b_hh, w_init, b_init, act, mask_user, mask_init):
        gi = torch.addmm(b_ih, h, w_ih.T)  # [R, 3U]
        gh = torch.addmm(b_hh, c, w_hh.T)  # [R, 3U]
        c_new, rz, n = _gates(gi, gh, c)
        c_out = c_new if mask_user is None else c_new * mask_user
        y = activation(act)(torch.addmm(b_init, c_out, w_init.T))  # [R, H]
        h0 = y if mask_init is None else y * mask_init
        ctx.act = act
        ctx.save_for_backward(h, c, rz, n, gh, c_out, y, w_ih, w_hh, w_init, mask_user, mask_init)
        return h0, c_out

    @staticmethod
    def backward(ctx, dh0, dc_out):
        h, c, rz, n, gh, c_out, y, w_ih, w_hh, w_init, mask_user, mask_init = ctx.saved_tensors
        need = ctx.needs_input_grad
        da = dh0 if mask_init is None else dh0 * mask_init
        d_act = activation_derivative(ctx.act, y)
        if d_act is not None:
            da = da * d_act  # d (W_init c + b_init) [R, H]
        dc = da @ w_init if dc_out is None else torch.addmm(dc_out, da, w_init)  # [R, U]
        if mask_user is not None:
            dc = dc * mask_user
        dgi, dgh = _gates_backward(dc, c, rz, n, gh)
        U = c.shape[1]
        return (
            dgi @ w_ih if need[0] else None,
            dgh @ w_hh + dc * rz[:, U:] if need[1] else None,
            dgi.T @ h if need[2] else None,
            dgi.sum(0) if need[3] else None,
            dgh.T @ c if need[4] else None,
            dgh.sum(0) if need[5] else None,
            da.T @ c_out if need[6] else None,
            da.sum(0) if need[7] else None,
            None, None, None,
        )


def user_start(
    h: Tensor, c: Tensor, gru: torch.nn.GRUCell, init: torch.nn.Linear, act: str,
    mask_user: Tensor | None = None, mask_init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The hierarchical RNN's user-level rule at a known user's next session, as one op:
    c' = GRU_usr(h, c) * mask_user, h0 = act(W_init c' + b_init) * mask_init, from the
    session states h [R, H] and user states c [R, U] of those rows: (h0 [R, H], c' [R, U]).
    The masks are dropout masks (scaled by 1 / (1 - p)) or None."""  # fmt: skip
    return _UserStart.apply(
        h, c, gru.weight_ih, gru.bias_ih, gru.weight_hh, gru.bias_hh, init.weight, init.bias,
        act, mask_user, mask_init,
    )  # fmt: skip


def dropout_mask(module: torch.nn.Dropout, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """``module``'s mask for a tensor of ``shape`` (scaled by 1 / (1 - p)), from the draws
    ``module`` itself would make; None where it would draw nothing (p = 0, evaluation)."""
    p = module.p if module.training else 0.0
    if p <= 0:
        return None
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
