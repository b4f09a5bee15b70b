"""Row-sparse optimisers: item tables get sparse gradients (nn.Embedding(sparse=True)), and
only the rows a step touched are read and written, so a step's cost does not grow with the
catalogue. Dense parameters (GRU weights) are updated as usual.

- ``adagrad``: acc += g^2; update = lr * g / (sqrt(acc) + eps); with ``momentum`` the update
  feeds a velocity v = momentum * v - update (the GRU4Rec/HRNN reference's adagrad with
  momentum); ``weight_decay`` adds L2 (g += wd * p) on the rows touched (lazy).
- ``adam``: Adam with lazy moments for sparse rows (as torch's SparseAdam) and
  bias correction by the step count.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("adagrad", "adam")


def _rows(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """(row indices or None for dense, gradient values): duplicates summed."""
    if not grad.is_sparse:
        return None, grad
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> Tensor:
    """Scale all gradients (dense and row-sparse) so their joint L2 norm <= max_norm."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            norms.append(p.grad.values().norm())
        else:
            norms.append(p.grad.norm())
    if not norms:
        return torch.zeros(())
    total = torch.stack(norms).norm()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            if p.grad.is_sparse:
                p.grad.values().mul_(scale)
            else:
                p.grad.mul_(scale)
    return total


class SparseRowOptimizer(torch.optim.Optimizer):
    """Adagrad (optionally with momentum) or Adam that touches only the gradient's rows."""

    def __init__(
        self,
        params,
        kind: str = "adagrad",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        defaults = dict(
            kind=kind, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        idx, g = _rows(p.grad)
        state = self.state[p]
        view = p if idx is None else p[idx]  # the rows to update
        if group["weight_decay"]:
            g = g + group["weight_decay"] * view
        if group["kind"] == "adagrad":
            if not state:
                state["acc"] = torch.zeros_like(p)
                if group["momentum"]:
                    state["velocity"] = torch.zeros_like(p)
            acc = self._add_rows(state["acc"], idx, g * g)
            update = g / (acc.sqrt() + group["eps"]) * group["lr"]
            if group["momentum"]:
                v = group["momentum"] * self._get(state["velocity"], idx) - update
                self._set(state["velocity"], idx, v)
                self._set(p, idx, view + v)
            else:
                self._set(p, idx, view - update)
            return
        # adam
        b1, b2 = group["betas"]
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(p)
            state["v"] = torch.zeros_like(p)
        state["step"] += 1
        m = b1 * self._get(state["m"], idx) + (1 - b1) * g
        v = b2 * self._get(state["v"], idx) + (1 - b2) * g * g
        self._set(state["m"], idx, m)
        self._set(state["v"], idx, v)
        m_hat = m / (1 - b1 ** state["step"])
        v_hat = v / (1 - b2 ** state["step"])
        self._set(p, idx, view - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))

    @staticmethod
    def _get(t: Tensor, idx: Tensor | None) -> Tensor:
        return t if idx is None else t[idx]

    @staticmethod
    def _set(t: Tensor, idx: Tensor | None, value: Tensor) -> None:
        if idx is None:
            t.copy_(value)
        else:
            t[idx] = value

    @staticmethod
    def _add_rows(t: Tensor, idx: Tensor | None, value: Tensor) -> Tensor:
        """t[rows] += value; returns the updated rows."""
        if idx is None:
            return t.add_(value)
        t.index_add_(0, idx, value)
        return t[idx]
