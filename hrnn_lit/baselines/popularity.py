"""The non-neural baselines' shared part and the popularity ones, as networks of the
model API with no trainable parameters (docs/design.md §2, §10): POP and user popularity.

``fit(steps)`` builds a network's tables from the fit split's ``Steps`` (no gradient
step); evaluation is the loop every network goes through (``hrnn_lit.evaluation.loop``),
history replay included. The tables are non-persistent buffers: they follow the device
and are refitted from data, never loaded from a checkpoint.

A slot's state follows the events it has walked through: ``start`` opens a session (and
forgets the slot's user at a user start), ``step`` records the session's first item (its
first input), ``observe`` records each target once the step's scores are taken. So a
user's earlier sessions count in full (their last items included) and the current session
up to the input. Scores are a base over the catalogue (popularity) plus a few entries per
slot (``sparse_scores``), so ranking a target costs O(entries + log n_items); float64, so
integer counts plus a popularity fraction stay exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hrnn_lit.data.batching import Steps
from hrnn_lit.nets.api import SparseScores, Starts, State

WIDTH = 16  # a slot buffer's first width (it doubles when full)


def session_events(steps: Steps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All events of the sessions behind ``steps``, in order: (ptr [S+1], items [E],
    session_user [S]); session s holds ``items[ptr[s]:ptr[s+1]]``. A session's events are
    its steps' inputs plus the last step's target (sessions of one event have no step)."""
    n = len(steps)
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = np.r_[steps.session_start[1:], True]  # the step is its session's last
    per_step = 1 + ends.astype(np.int64)
    offset = np.cumsum(per_step) - per_step
    items = np.empty(int(per_step.sum()), np.int64)
    items[offset] = steps.input
    items[offset[ends] + 1] = steps.target[ends]
    ses = np.cumsum(steps.session_start) - 1
    n_ses = int(ses[-1]) + 1
    ptr = np.r_[0, np.cumsum(np.bincount(np.repeat(ses, per_step), minlength=n_ses))]
    return ptr.astype(np.int64), items, steps.user[steps.session_start].astype(np.int64)


# ------------------------------------------------------------------------------ the base
class BaselineNet(nn.Module):
    """Popularity counts and the model API's defaults for a network without parameters:
    no state, scores from ``sparse_scores``."""

    def __init__(self, n_items: int, item_counts: np.ndarray | list[int] | None = None):
        super().__init__()
        self.n_items = int(n_items)
        counts = np.zeros(n_items) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("pop", torch.as_tensor(counts, dtype=torch.float64), persistent=False)

    def fit(self, steps: Steps) -> None:
        """Popularity = number of events of each item in the fit split's sessions."""
        _, items, _ = session_events(steps)
        counts = np.bincount(items, minlength=self.n_items).astype(np.float64)
        self.pop = torch.as_tensor(counts, device=self.pop.device)

    def pop_fallback_scores(self) -> Tensor:
        """Popularity squeezed into (-1, 0): below every positive kNN score, ordered by
        popularity, so items no neighbour votes for are not one big tie."""
        return self.pop / (self.pop.max() + 1.0) - 1.0

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        return (torch.zeros(batch_size, 0, device=device),)  # nothing but the slots

    def start(self, state: State, starts: Starts) -> State:
        return state

    def step(self, items: Tensor, state: State) -> State:
        return state

    def sparse_scores(self, state: State) -> SparseScores:
        raise NotImplementedError

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        scores = self.sparse_scores(state).dense(state[0].shape[0])  # [B, n_items]
        return scores if items is None else scores[:, items]


class PopNet(BaselineNet):
    """POP (paper baseline): every event gets the same ranking, items by their number of
    events in the fit split. No state."""

    session_only = True

    def sparse_scores(self, state: State) -> SparseScores:
        none = torch.zeros(0, dtype=torch.long, device=self.pop.device)
        return SparseScores(self.pop, none, none, self.pop[:0])


# -------------------------------------------------------------------------- user POP
class UserPopNet(BaselineNet):
    """Personal popularity: score = (times the user had the item so far) + pop / (max_pop +
    1), so the user's own counts rank first and global popularity breaks their ties.

    "So far" = the user's earlier sessions (replayed in evaluation) plus the current
    session up to the input. State: the user's distinct items so far and their counts
    (listed [B, W], counts [B, W], n_listed [B]; W doubles when a slot's list is full), and
    ``fresh`` [B] (the session's first item is still to come)."""

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        listed = torch.full((batch_size, WIDTH), -1, dtype=torch.long, device=device)
        counts = torch.zeros(batch_size, WIDTH, dtype=torch.float64, device=device)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return listed, counts, zeros, zeros.bool()

    def start(self, state: State, starts: Starts) -> State:
        listed, counts, n_listed, fresh = state
        return listed, counts, n_listed.masked_fill(starts.user, 0), fresh | starts.session

    def step(self, items: Tensor, state: State) -> State:
        listed, counts, n_listed, fresh = self._record(state, state[3], items)
        return listed, counts, n_listed, torch.zeros_like(fresh)

    def observe(self, state: State, targets: Tensor) -> State:
        return self._record(state, torch.ones_like(state[3]), targets)

    def _record(self, state: State, mask: Tensor, items: Tensor) -> State:
        """Count ``items`` [B] for the slots in ``mask`` [B] (one item per slot)."""
        listed, counts, n_listed, fresh = state
        rows = mask.nonzero().view(-1)
        if rows.numel() == 0:
            return state
        item, width = items[rows], listed.shape[1]
        filled = torch.arange(width, device=item.device) < n_listed[rows, None]
        match = (listed[rows] == item[:, None]) & filled  # [R, W]
        known = match.any(1)
        at = torch.where(known, match.to(torch.int8).argmax(1), n_listed[rows])
        if bool((at >= width).any()):  # a full list: twice as wide
            listed = torch.cat([listed, torch.full_like(listed, -1)], 1)
            counts = torch.cat([counts, torch.zeros_like(counts)], 1)
        listed, counts, n_listed = listed.clone(), counts.clone(), n_listed.clone()
        listed[rows, at] = item
        counts[rows, at] = torch.where(known, counts[rows, at] + 1.0, 1.0)  # a new one: 1
        n_listed[rows] += (~known).long()
        return listed, counts, n_listed, fresh

    def sparse_scores(self, state: State) -> SparseScores:
        listed, counts, n_listed, _ = state
        tiebreak = self.pop / (self.pop.max() + 1.0)
        filled = torch.arange(listed.shape[1], device=listed.device) < n_listed[:, None]
        rows, cols = filled.nonzero(as_tuple=True)
        items = listed[rows, cols]
        return SparseScores(tiebreak, rows, items, counts[rows, cols] + tiebreak[items])
