"""The GRU cell (torch's gate order r, z, n; reset applied after the hidden product):
r, z = sigmoid(gi_rz + gh_rz); n = tanh(gi_n + r * gh_n); h' = (1 - z) n + z h, from the
input and hidden projections gi, gh [R, 3K] (biases included) of the state h [R, K].
On CPU float32 it is one C pass forward and one backward (``native.gru_forward`` /
``gru_backward``, rounding like torch's ops, not bit for bit); elsewhere torch's ops."""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.ops import native


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


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """The new state [R, K] (see the module docstring); differentiable either way."""
    if h.device.type == "cpu" and native.gru_supported(gi, gh, h):
        if torch.is_grad_enabled() and (gi.requires_grad or gh.requires_grad or h.requires_grad):
            return _NativeGRUCell.apply(gi, gh, h)
        return native.gru_forward(gi, gh, h)[0]
    K = h.shape[1]
    rz = torch.sigmoid(gi[:, : 2 * K] + gh[:, : 2 * K])  # [R, 2K]
    n = torch.tanh(torch.addcmul(gi[:, 2 * K :], rz[:, :K], gh[:, 2 * K :]))  # [R, K]
    return torch.lerp(n, h, rz[:, K:])  # (1 - z) * n + z * h


def zero_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x [B, D] with the rows flagged in ``rows`` [B] bool set to 0 (a copy). On CPU by
    index (faster than a broadcast mask there); elsewhere by mask (no host sync)."""
    if x.device.type == "cpu":
        return x.index_fill(0, rows.nonzero().view(-1), 0.0)
    return x.masked_fill(rows[:, None], 0.0)
