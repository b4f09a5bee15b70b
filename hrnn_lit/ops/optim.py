"""Row-sparse optimisers: item tables get sparse gradients (nn.Embedding(sparse=True)), and
only the rows a step touched are read and written, so a step's cost does not grow with the
catalogue. Dense parameters (GRU weights) are updated as usual.

- ``adagrad``: acc += g^2; update = lr * g / (sqrt(acc) + eps) (``eps_in_sqrt``: the official
  GRU4Rec code's lr * g / sqrt(acc + eps), unfused); with ``momentum`` the update
  feeds a velocity v = momentum * v - update (the GRU4Rec/HRNN reference's adagrad with
  momentum); ``weight_decay`` adds L2 (g += wd * p) on the rows touched (lazy).
- ``adam``: Adam with lazy moments for sparse rows (as torch's SparseAdam) and
  bias correction by the step count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.ops import native, tables

KINDS = ("adagrad", "adam")
ADAGRAD_EPS = ("outside", "inside")  # eps added after sqrt(acc) | inside: sqrt(acc + eps)
_FUSED = hasattr(torch, "_fused_adagrad_")


def _rows(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """(row indices or None for dense, gradient values): duplicates summed. Autograd drops
    the coalesced flag of a gradient it stores, so rows not made by ``ops.tables`` are
    checked to be distinct and sorted, and coalesced where they are not."""
    if not grad.is_sparse:
        return None, grad
    idx = grad._indices()[0]
    if grad.is_coalesced() or idx.numel() <= 1 or tables.known_distinct(idx):
        return idx, grad._values()
    if not _increasing(idx):
        grad = grad.coalesce()
        idx = grad._indices()[0]
    return idx, grad._values()


def _increasing(idx: Tensor) -> bool:
    """Whether the row indices [M] are strictly increasing (sorted and distinct): on CPU by
    numpy on the same memory (one pass, no torch op dispatch)."""
    if idx.device.type == "cpu":
        a = idx.numpy()
        return bool((a[1:] > a[:-1]).all())
    return bool((idx[1:] > idx[:-1]).all())


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
        eps_in_sqrt: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        defaults = dict(
            kind=kind, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps,
            eps_in_sqrt=eps_in_sqrt,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a ``.grad`` (row-sparse: its rows only)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused = []  # CPU tensors under plain Adagrad: one fused kernel for all
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx, g = _rows(p.grad)
                if _FUSED and self._fusable(p, group):
                    fused.append((p, idx, g))
                else:
                    self._update(p, group, idx, g)
            if fused:
                self._fused_adagrad(fused, group)
        return loss

    def _fusable(self, p: Tensor, group: dict) -> bool:
        return (
            group["kind"] == "adagrad" and not group["momentum"] and p.device.type == "cpu"
            and not group.get("eps_in_sqrt")
        )  # fmt: skip

    def _fused_adagrad(self, items: list[tuple[Tensor, Tensor | None, Tensor]], group: dict):
        """torch's fused CPU Adagrad (acc += g^2; p -= lr g / (sqrt(acc) + eps), with L2 by
        ``weight_decay``): the update of ``_update`` in one kernel for all tensors. A
        row-sparse gradient's rows are updated where they lie by ``native.adagrad_rows``
        (same arithmetic), or, without it, gathered with their accumulators, updated there
        and written back: either way only the touched rows are read and written."""
        ps, grads, accs, steps, rows = [], [], [], [], []
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p, idx, g in items:  # (parameter, rows or None, gradient)
            state = self.state[p]
            if not state:
                self._init_state(state, p, group)
            if "fused_step" not in state:
                state["fused_step"] = torch.zeros((), dtype=torch.float32)
            acc = state["acc"]
            if idx is not None:
                if native.supports(p, acc, idx, g) and native.adagrad_rows(
                    p, acc, idx, g, lr, eps, wd
                ):
                    continue  # updated in place, same bits as below
                rows.append((p, acc, idx, len(ps)))  # gathered copies, written back below
                p, acc = p.index_select(0, idx), acc.index_select(0, idx)
            ps.append(p)
            grads.append(g)
            accs.append(acc)
            steps.append(state["fused_step"])
        if ps:
            torch._fused_adagrad_(
                ps, grads, accs, steps, lr=lr, lr_decay=0.0, weight_decay=wd, eps=eps,
                maximize=False,
            )  # fmt: skip
        for p, acc, idx, k in rows:
            p.index_copy_(0, idx, ps[k])
            acc.index_copy_(0, idx, accs[k])

    def _update(self, p: Tensor, group: dict, idx: Tensor | None, g: Tensor) -> None:
        """One parameter's update from its gradient rows ``idx`` (None: dense) and ``g``."""
        state = self.state[p]
        if not state:
            self._init_state(state, p, group)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if idx is None:  # dense: in place, no full-size temporaries beyond one
            if wd:
                g = g.add(p, alpha=wd)
            if group["kind"] == "adagrad":
                acc = state["acc"].addcmul_(g, g)
                denom = acc.add(eps).sqrt_() if group.get("eps_in_sqrt") else acc.sqrt().add_(eps)
                if group["momentum"]:
                    v = state["velocity"].mul_(group["momentum"]).addcdiv_(g, denom, value=-lr)
                    p.add_(v)
                else:
                    p.addcdiv_(g, denom, value=-lr)
            else:
                b1, b2 = group["betas"]
                state["step"] += 1
                m = state["m"].mul_(b1).add_(g, alpha=1 - b1)
                v = state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** state["step"])).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** state["step"]))
            return
        # row-sparse (one row per touched item): only those rows are read and written
        if wd:
            g = g + wd * p.index_select(0, idx)
        if group["kind"] == "adagrad":
            state["acc"].index_add_(0, idx, g * g)
            acc = state["acc"].index_select(0, idx)
            denom = acc.add_(eps).sqrt_() if group.get("eps_in_sqrt") else acc.sqrt_().add_(eps)
            update = g / denom
            if group["momentum"]:
                v = state["velocity"].index_select(0, idx).mul_(group["momentum"])
                v.sub_(update, alpha=lr)
                state["velocity"].index_copy_(0, idx, v)
                p.index_add_(0, idx, v)
            else:
                p.index_add_(0, idx, update.mul_(-lr))  # (alpha=-lr takes a slow path)
            return
        rows = p.index_select(0, idx)
        b1, b2 = group["betas"]
        state["step"] += 1
        m = b1 * state["m"].index_select(0, idx) + (1 - b1) * g
        v = b2 * state["v"].index_select(0, idx) + (1 - b2) * g * g
        state["m"].index_copy_(0, idx, m)
        state["v"].index_copy_(0, idx, v)
        m_hat = m / (1 - b1 ** state["step"])
        v_hat = v / (1 - b2 ** state["step"])
        p.index_copy_(0, idx, rows - lr * m_hat / (v_hat.sqrt() + eps))

    @staticmethod
    def _init_state(state: dict, p: Tensor, group: dict) -> None:
        if group["kind"] == "adagrad":
            state["acc"] = torch.zeros_like(p)
            if group["momentum"]:
                state["velocity"] = torch.zeros_like(p)
        else:
            state["step"] = 0
            state["m"] = torch.zeros_like(p)
            state["v"] = torch.zeros_like(p)
