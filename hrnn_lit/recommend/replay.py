"""A recommender's replay of observed events as a chunk of the evaluation loop
(``evaluation.loop.EvalLoop``, docs/design.md §13): the entries of the users' events in
slots, and the users' stored states moving in and out of those slots."""

from __future__ import annotations

import numpy as np
import torch

from hrnn_lit.data.batching import Chunk
from hrnn_lit.nets import api
from hrnn_lit.recommend.users import UserTable


def replay_chunk(plan, inputs, targets, starts, user_start, in_ctx, user_index, device):
    """The replay of kept events as one chunk of the evaluation loop: entry (t, slot) of
    event e steps on ``inputs[e]`` (its context ``in_ctx[e]``: time, gap, position) with
    target ``targets[e]``, or, where e starts a session, runs the start rules only."""
    on = plan >= 0
    e = np.where(on, plan, 0)
    start = on & starts[e]
    user = start & user_start[e]
    step = on & ~start
    nxt = start & ~user
    t_idx, s_idx = np.nonzero(nxt)  # step-major
    T = plan.shape[0]

    def dev(x):
        return torch.as_tensor(np.ascontiguousarray(x), device=device)

    def at(x):  # [T, B] of an event array, 0 where the entry holds no step
        return dev(np.where(step, x[e], 0))

    return Chunk(
        input=at(inputs), target=at(targets), session_start=dev(start), user_start=dev(user),
        valid=dev(step), score=dev(np.zeros_like(on)), position=at(in_ctx[:, 2]),
        history=dev(np.zeros(plan.shape, np.int64)), time=at(in_ctx[:, 0]),
        gap=at(in_ctx[:, 1]), user_index=dev(np.where(on, user_index[e], -1)),
        next_session_rows=dev(s_idx.astype(np.int64)),
        next_session_offsets=np.searchsorted(t_idx, np.arange(T + 1)).tolist(),
        any_start=start.any(1).tolist(), n_events=int(step.sum()), n_scored=0,
    )  # fmt: skip


class UserSlots:
    """The recommender's users in the replay's slots (``evaluation.loop.Slots``): a user's
    stored state goes into its slot before its first event, back to the table after its
    last."""

    def __init__(self, table: UserTable, plan, rows, first, last, device):
        self.table, self.device = table, device
        on = plan >= 0
        e = np.where(on, plan, 0)
        self.moves = [self._by_step(on & flag[e], rows[e]) for flag in (first, last)]

    @staticmethod
    def _by_step(mask: np.ndarray, rows: np.ndarray):
        t, s = np.nonzero(mask)  # step-major
        return np.searchsorted(t, np.arange(mask.shape[0] + 1)), s, rows[t, s]

    def _at(self, which: int, t: int):
        bounds, slots, rows = self.moves[which]
        a, b = bounds[t], bounds[t + 1]
        return slots[a:b], rows[a:b]

    def load(self, t: int, state: api.State) -> api.State:
        slots, rows = self._at(0, t)
        if slots.size == 0:
            return state
        idx = torch.from_numpy(slots).to(self.device)
        tab = self.table
        return api.put_rows(state, idx, tab.get(rows), tab.fresh, type(tab.net).__name__)

    def store(self, t: int, state: api.State) -> None:
        slots, rows = self._at(1, t)
        if slots.size:
            self.table.put(rows, api.select(state, torch.from_numpy(slots).to(self.device)))
