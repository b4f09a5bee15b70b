"""The training update with static shapes, captured once as a CUDA graph and replayed.

On a GPU, an update of B=128 slots does microseconds of arithmetic in ~100 kernel launches,
so the host's launching sets its pace. ``GraphStep`` records one
whole update (session starts, forward, backward, Adagrad on the touched rows) as a CUDA graph
and replays it at every time step: per step, two input copies and one graph launch.

A graph needs the same shapes and no host decisions at every replay, so the step here is
``update``'s with two changes of form, not of result:
- the distinct candidates and input items of a step are padded to a fixed width
  (``pad_unique``): pad slots point at item 0 with zero gradient rows, which add zero to
  its rows and accumulators, and are masked out of weight decay;
- the HRNN user level runs on all B slots with the slots that do not start a session of a
  known user masked (``start_sessions_masked``), instead of on those rows only.
The updates equal the eager step's up to float summation order (tests/test_graph_step.py
runs this step without capture on CPU against ``update``), except that dropout on the user
level draws masks for all B slots, so its random stream differs from the eager step's.
Supported: plain Adagrad (any weight decay), the cross-entropy and TOP1 losses, one device,
no gradient clipping; ``graph_support`` names what stands in the way otherwise. The
learning rate and weight decay are read when the graph is captured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit.data.batching import Chunk
from hrnn_lit.models import update
from hrnn_lit.models.core import RecurrentCore
from hrnn_lit.models.optim import SparseRowOptimizer

LOSSES = ("cross-entropy", "top1")  # hand-written gradients (no autograd inside the graph)


def graph_support(loss: str, optimizer: str, momentum: float, clip: float) -> str | None:
    """Why the update with these model settings cannot run as a CUDA graph (None: it can)."""
    if loss not in LOSSES:
        return f"model.loss must be one of {list(LOSSES)}, got {loss!r}"
    if optimizer != "adagrad" or momentum:
        return f"needs model.optimizer=adagrad with model.momentum=0, got {optimizer!r}, {momentum}"
    if clip > 0:
        return f"needs model.clip_grad_norm=0, got {clip}"
    return None


def graph_features(core: RecurrentCore, logq: float = 0.0) -> str | None:
    """Why the network's options keep its update out of a CUDA graph (None: they do not):
    the graph step is written for one-hot input, the three plain final activations and no
    logQ or input/hidden-state dropout."""
    keys = []
    if logq:
        keys.append("model.logq")
    if core.input_mode != "onehot":
        keys.append(
            "model.constrained_embedding" if core.input_mode == "constrained" else "model.embedding"
        )
    if core.final_act_name not in ("linear", "tanh", "relu"):
        keys.append(f"model.final_act={core.final_act_name}")
    keys += [
        f"model.{k}"
        for k in ("dropout_embed", "dropout_hidden")
        if getattr(core, "drop_" + k[8:]).p > 0
    ]
    return (
        f"does not cover {', '.join(keys)} (use the eager step: cuda_graph=false)" if keys else None
    )


def pad_unique(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(x[t], return_inverse=True)`` of every row of x [T, M] at the fixed
    width M, with no host sync: values [T, M] (row t's sorted distinct values, then item 0
    on the pad slots), inverse [T, M] (each entry's slot) and real [T, M] (False on pads)."""
    M = x.shape[1]
    srt, order = x.sort(dim=1)  # [T, M]
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.cumsum(1) - 1  # [T, M] slot of each sorted entry
    values = torch.zeros_like(x).scatter_(1, slot, srt)
    inverse = torch.empty_like(x).scatter_(1, order, slot)
    real = torch.arange(M, device=x.device) < new.sum(1, keepdim=True)
    return values, inverse, real


@torch.no_grad()
def start_sessions_masked(
    core: RecurrentCore, h: Tensor, c: Tensor, session_start: Tensor, user_start: Tensor
) -> tuple[Tensor, Tensor, dict | None]:
    """``update.start_sessions`` with the user level on all B slots: slots that do not start
    a session of a known user keep their state, and their masks zero their gradients.
    Returns (h, c, the cache ``update.gradients`` takes as ``start``; None without a user
    level)."""
    if not core.hierarchical:
        h, c = core.start_sessions(h, c, session_start, user_start)
        return h, c, None
    B = h.shape[0]
    us = user_start[:, None]
    go = (session_start & ~user_start)[:, None]  # [B, 1]
    m = go.to(h.dtype)
    h, c = h.masked_fill(us, 0.0), c.masked_fill(us, 0.0)
    gru = core.user_gru
    gi = torch.addmm(gru.bias_ih, h, gru.weight_ih.T)  # [B, 3U]
    gh = torch.addmm(gru.bias_hh, c, gru.weight_hh.T)  # [B, 3U]
    c_new, g = update._gru(gi, gh, c)
    mask_user = update._dropout_mask(core.drop_user, c_new)
    mask_user = m if mask_user is None else mask_user * m
    c_rows = c_new * mask_user  # [B, U], zero where not go
    h0 = core.init_act(torch.addmm(core.w_init.bias, c_rows, core.w_init.weight.T))  # [B, H]
    mask_init = update._dropout_mask(core.drop_init, h0)
    mask_init = m if mask_init is None else mask_init * m
    rows = torch.arange(B, device=h.device)
    cache = dict(
        rows=rows, x=h, gru=g, mask_user=mask_user, c_rows=c_rows, h0=h0, mask_init=mask_init
    )
    return torch.where(go, h0 * mask_init, h), torch.where(go, c_rows, c), cache


def chunk_inputs(batch: Chunk, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk's per-step inputs of ``GraphStep`` packed in two [T, *] tensors (one copy
    each per step): item indices (input items, candidates and their padded distinct values
    and inverses) and flags (valid slots, session and user starts, real distinct slots)."""
    inp = batch.input  # [T, B]
    c_val, c_inv, c_real = pad_unique(candidates)  # [T, N] each
    i_val, i_inv, i_real = pad_unique(inp)  # [T, B] each
    ids = torch.cat([inp, candidates, c_val, c_inv, i_val, i_inv], 1)
    flags = torch.cat([batch.valid, batch.session_start, batch.user_start, c_real, i_real], 1)
    return ids, flags


class GraphStep:
    """One training update on static buffers: run eagerly for the first ``warmup`` steps
    (real updates; they create the optimiser state and let CUDA libraries set up), then
    captured as a CUDA graph and replayed (``capture=False``: always eagerly, e.g. on CPU).

    Per chunk: ``set_state``; per step: ``step(ids[t], flags[t])`` -> the step's loss (a
    buffer overwritten by the next step); ``state()`` -> copies of (h, c)."""

    def __init__(
        self,
        core: RecurrentCore,
        loss_grad: update.LossGrad,
        optimizer: SparseRowOptimizer,
        batch_size: int,
        n_candidates: int,
        device: torch.device,
        mm_dtype: torch.dtype | None = None,
        capture: bool = True,
        warmup: int = 3,
    ):
        self.core, self.loss_grad, self.opt, self.mm_dtype = core, loss_grad, optimizer, mm_dtype
        B, N = batch_size, n_candidates
        self.B, self.N = B, N
        self.ids = torch.zeros(3 * B + 3 * N, dtype=torch.long, device=device)
        self.flags = torch.zeros(4 * B + N, dtype=torch.bool, device=device)
        dtype = core.w_h.weight.dtype
        self.h, self.c = (x.to(dtype) for x in core.initial_state(B, device))
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.capture = capture and device.type == "cuda"
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0
        user = (core.user_gru, core.w_init) if core.hierarchical else ()
        self._user_params = {id(p) for m in user for p in m.parameters()}

    def set_state(self, h: Tensor, c: Tensor) -> None:
        self.h.copy_(h)
        self.c.copy_(c)

    def state(self) -> tuple[Tensor, Tensor]:
        return self.h.clone(), self.c.clone()

    def step(self, ids: Tensor, flags: Tensor) -> Tensor:
        self.ids.copy_(ids, non_blocking=True)
        self.flags.copy_(flags, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._update()
        elif self._eager_steps < self.warmup:  # on a side stream, as capture wants
            side, main = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self._update()
            main.wait_stream(side)
            self._eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing
                self._update()
            self.graph.replay()
        return self.loss

    @torch.no_grad()
    def _update(self) -> None:
        B, N = self.B, self.N
        ids, flags = self.ids, self.flags
        item, cand = ids[:B], ids[B : B + N]
        c_val, c_inv = ids[B + N : B + 2 * N], ids[B + 2 * N : B + 3 * N]
        i_val, i_inv = ids[B + 3 * N : 2 * B + 3 * N], ids[2 * B + 3 * N :]
        valid, ss, us = flags[:B], flags[B : 2 * B], flags[2 * B : 3 * B]
        c_real, i_real = flags[3 * B : 3 * B + N], flags[3 * B + N :]

        core = self.core
        h, c, start = start_sessions_masked(core, self.h, self.c, ss, us)
        h_new, loss, cache = update.forward(
            core, self.loss_grad, item, h, c, cand, valid, start, self.mm_dtype,
            ((c_val, c_inv, None), (i_val, i_inv)),  # (counts: scores every column)
        )  # fmt: skip
        masks = {}  # what must not decay: pad rows, and the user level at steps without starts
        if any(g["weight_decay"] for g in self.opt.param_groups):
            masks = {id(c_val): c_real[:, None].to(h.dtype), id(i_val): i_real[:, None].to(h.dtype)}
            if start is not None:
                masks["user"] = (ss & ~us).any().to(h.dtype)
        grads = [
            (p, rows, g, masks.get("user" if id(p) in self._user_params else id(rows)))
            for p, rows, g in update.gradients(core, cache)
        ]
        self.opt.apply(grads)
        self.h.copy_(h_new)
        self.c.copy_(c)
        self.loss.copy_(loss)
