"""Evaluation replay of one chunk ([T, B] time steps x slots) that runs the recurrent step
only on the rows whose state can still matter, and returns the states of the scored rows.

Which rows matter: every valid row for a model with a user level or with state kept across
sessions (the whole history shapes the state); for a session-only model that resets at
every session start (GRU4Rec), only the rows of sessions with a scored step, since a reset
wipes whatever came before. A session that may continue into the next chunk counts as
scored (its future is not in this chunk).

Bit-for-bit equal to running the step on all B rows (``RecurrentRecommender.unroll``):
a row's result depends only on its own inputs, except through how kernels split their work.
BLAS (the GRU's matrix product) gives every row the same value for products of >= 64 rows,
the native GRU kernel (ops/native.py) computes each row alone, and torch's elementwise
kernels (its GRU path's sigmoid) process all elements in full vector lanes when the element
count and each thread's share of it are multiples of 64. So the step runs on the needed rows
padded to a multiple of 64, and only when the full batch is such a multiple too and at most
two threads share the work (where these conditions hold); otherwise on all rows.
tests/test_eval_speed_paths.py checks the equality on this build.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from hrnn_lit.data.batching import Chunk

ROW_MULTIPLE = 64


def needed_rows(batch: Chunk, session_only: bool) -> np.ndarray:
    """[T, B] bool: the (step, slot) entries whose state must be computed exactly."""
    valid = batch.valid.cpu().numpy()
    if not session_only:
        return valid
    score = batch.score.cpu().numpy()
    start = batch.session_start.cpu().numpy()
    need = np.zeros_like(valid)
    carry = np.ones(valid.shape[1], bool)  # the chunk's last step: the session may go on
    for t in range(valid.shape[0] - 1, -1, -1):
        need[t] = valid[t] & (score[t] | carry)
        carry = need[t] & ~start[t]
    return need


def can_compact(n_slots: int) -> bool:
    """Whether a step on a padded subset of rows equals the full step bit for bit here."""
    return n_slots % ROW_MULTIPLE == 0 and torch.get_num_threads() <= 2


def replay_scored(
    step: Callable[[Tensor, Tensor, Tensor], Tensor],
    start_sessions: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]],
    batch: Chunk,
    state: tuple[Tensor, Tensor],
    session_only: bool,
    start_rows: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Run ``step(items, h, c) -> h`` over the chunk (``start_sessions(t, h, c)`` at steps
    with a session start) on the needed rows only. Returns h [N, H] and c [N, U] of the N
    scored entries in ``batch.score`` order (step-major), and the final state; rows not
    needed hold stale values in it (nothing reads them before their next reset).

    ``start_rows(h, c, session_start, user_start)``: the start rules on given rows only
    (``RecurrentCore.start_sessions``); used for session-only models, whose rule needs no
    other row, so that a compacted step resets only its own rows."""
    inp, score = batch.input, batch.score
    T, B = inp.shape
    h, c = state
    need = needed_rows(batch, session_only)
    n_need = need.sum(1).tolist()
    scored = score.cpu().numpy()
    compact = can_compact(B)
    rows_only = session_only and start_rows is not None
    hs, cs = [], []
    for t in range(T):
        n = n_need[t]
        padded = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
        on_rows = compact and 0 < n and padded < B
        if batch.any_start[t] and not (rows_only and on_rows):
            h, c = start_sessions(t, h, c)
        if n == 0:  # no row of this step can matter
            pass
        elif not on_rows:
            h = step(inp[t], h, c)
        else:
            rows = np.resize(np.flatnonzero(need[t]), padded)  # padded by repeating rows
            idx = torch.from_numpy(rows).to(inp.device)
            h_rows, c_rows = h[idx], c[idx]
            if batch.any_start[t] and rows_only:
                ss, us = batch.session_start[t, idx], batch.user_start[t, idx]
                h_rows, c_rows = start_rows(h_rows, c_rows, ss, us)
            h_rows = step(inp[t, idx], h_rows, c_rows)
            h = h.index_copy(0, idx[:n], h_rows[:n])
        if scored[t].any():
            sel = torch.from_numpy(np.flatnonzero(scored[t])).to(inp.device)
            hs.append(h[sel])
            cs.append(c[sel])
    if not hs:
        return h[:0], c[:0], (h, c)
    return torch.cat(hs), torch.cat(cs), (h, c)
