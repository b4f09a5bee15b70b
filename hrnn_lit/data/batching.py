"""User-parallel mini-batches (docs/design.md §3), built with numpy index arithmetic.

A *step* is one (input item -> target item) pair inside a session; a session of L events
gives L - 1 steps. Steps are ordered by (user, session, time). A *plan* is a [T, B] matrix
of step indices: slot b walks one user's steps in order, and when the user is done the next
unused user takes the first free slot. Slots with nothing left hold -1 (masked), so no
user's data is lost at the tail of an epoch.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass  # (not frozen: Lightning's batch transforms rebuild a batch's dataclasses)
class SeenItems:
    """Each user's distinct items with the event index of their first occurrence, for the
    repeat/explore metrics (docs/design.md §6): an item was seen before event ``e`` of its
    user iff its ``first`` < e. Grouped by user, items ascending in a group; user group g
    (the g-th user of the events) holds entries ``bounds[g]:bounds[g + 1]`` and its events
    start at event index ``group_start[g]``. Keyed by event index, so it stays valid for any
    subset of whole users (``select_users``)."""

    item: np.ndarray  # [P] item index
    first: np.ndarray  # [P] event index of the item's first occurrence for that user
    bounds: np.ndarray  # [G + 1] entries of each user group
    group_start: np.ndarray  # [G] first event index of each user group

    def before(self, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The items each event's user had before it: (offsets [N + 1], items) with the
        items of event ``event[i]`` at ``items[offsets[i]:offsets[i + 1]]`` (ascending)."""
        g = np.searchsorted(self.group_start, event, side="right") - 1
        lo, hi = self.bounds[g], self.bounds[g + 1]
        n = hi - lo
        owner = np.repeat(np.arange(event.size), n)
        idx = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
        keep = self.first[idx] < event[owner]
        counts = np.bincount(owner[keep], minlength=event.size)
        return np.r_[0, np.cumsum(counts)].astype(np.int64), self.item[idx[keep]]


def seen_items(item: np.ndarray, user: np.ndarray) -> tuple[SeenItems, np.ndarray]:
    """The ``SeenItems`` of events sorted by user, and per event whether its item occurred
    earlier for the same user (a *repeat*). One stable sort, no loop over events."""
    n = item.size
    user_first = np.r_[True, user[1:] != user[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(user_first) - 1
    key = group.astype(np.int64) * (int(item.max()) + 1 if n else 1) + item
    order = np.argsort(key, kind="stable")  # by (user, item), then event index
    k = key[order]
    first = np.r_[True, k[1:] != k[:-1]] if n else np.zeros(0, bool)
    repeat = np.ones(n, bool)
    repeat[order[first]] = False
    table = SeenItems(
        item=item[order[first]].astype(np.int64),
        first=order[first].astype(np.int64),
        bounds=np.searchsorted(group[order[first]], np.arange(group[-1] + 2 if n else 1)),
        group_start=np.flatnonzero(user_first),
    )
    return table, repeat


@dataclass(frozen=True)
class Steps:
    """All steps of one split, ordered by (user, session, time). Arrays of length n_steps
    (``STEP_FIELDS``), and the users' items by first occurrence (``seen``)."""

    input: np.ndarray  # item index fed to the session GRU
    target: np.ndarray  # item index to predict
    user: np.ndarray  # user index (steps of one user are contiguous)
    session_start: np.ndarray  # bool: first step of a session
    user_start: np.ndarray  # bool: first step of a user
    position: np.ndarray  # 1-based position of the target in its session (first target = 1)
    history: np.ndarray  # number of the user's earlier sessions in this sequence
    score: np.ndarray  # bool: this step's prediction is evaluated
    time: np.ndarray  # Unix seconds of the input event (0 where the data gave none)
    gap: np.ndarray  # seconds from the user's previous event to the input event (0: first)
    user_index: np.ndarray  # the user in the model's user vocabulary (-1: not trained on)
    repeat: np.ndarray  # bool: the user had the target before (earlier event of the user)
    event: np.ndarray  # the target's event index (in the events given to build_steps)
    seen: SeenItems | None = None  # each user's items by first occurrence

    def __len__(self) -> int:
        return int(self.input.size)


def build_steps(
    item: np.ndarray,
    user: np.ndarray,
    session: np.ndarray,
    score: np.ndarray | None = None,
    time: np.ndarray | None = None,
    user_index: np.ndarray | None = None,
) -> Steps:
    """Steps from events sorted by (user, session, time).

    ``score`` marks events whose prediction counts (a step is scored when its target is);
    ``time`` (Unix seconds) and ``user_index`` (each event's user in the model's user
    vocabulary) are what a network's ``context`` reports (zeros / -1 when not given).
    Sessions of one event give no step; their users still start cleanly (and their items
    count as seen for the repeat flags).
    """
    n = item.size
    ses_first = np.r_[True, session[1:] != session[:-1]] if n else np.zeros(0, bool)
    user_first = np.r_[True, user[1:] != user[:-1]] if n else np.zeros(0, bool)
    idx = np.flatnonzero(~ses_first[1:]) if n else np.zeros(0, np.int64)  # event i -> i + 1
    ses_start_idx = np.maximum.accumulate(np.where(ses_first, np.arange(n), 0))
    n_prev_sessions = np.cumsum(ses_first) - 1
    user_base = n_prev_sessions[np.maximum.accumulate(np.where(user_first, np.arange(n), 0))]
    s_user = user[idx]
    s_session = session[idx]
    s_ustart = np.r_[True, s_user[1:] != s_user[:-1]] if idx.size else np.zeros(0, bool)
    s_sstart = s_ustart | (np.r_[True, s_session[1:] != s_session[:-1]] if idx.size else False)
    seen, repeat = seen_items(item, user)
    return Steps(
        input=item[idx].astype(np.int64),
        target=item[idx + 1].astype(np.int64),
        user=s_user.astype(np.int64),
        session_start=s_sstart,
        user_start=s_ustart,
        position=(idx + 1 - ses_start_idx[idx]).astype(np.int64),
        history=(n_prev_sessions - user_base)[idx].astype(np.int64),
        score=np.ones(idx.size, bool) if score is None else score[idx + 1].astype(bool),
        time=time[idx] if time is not None else np.zeros(idx.size, np.int64),
        gap=np.where(user_first[idx], 0, time[idx] - time[np.maximum(idx - 1, 0)])
        if time is not None else np.zeros(idx.size, np.int64),
        user_index=user_index[idx] if user_index is not None else np.full(idx.size, -1),
        repeat=repeat[idx + 1],
        event=(idx + 1).astype(np.int64),
        seen=seen,
    )


STEP_FIELDS = tuple(f.name for f in dataclasses.fields(Steps) if f.name != "seen")


def user_lengths(steps_user: np.ndarray) -> np.ndarray:
    """Number of steps of each user (users in order of appearance; groups are contiguous)."""
    if steps_user.size == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, steps_user[1:] != steps_user[:-1]])
    return np.diff(np.r_[starts, steps_user.size])


def shard_users(lengths: np.ndarray, world_size: int) -> np.ndarray:
    """Rank of each user, balancing steps: users by decreasing length dealt in snake order
    (0, 1, ..., N-1, N-1, ..., 0, ...). Disjoint, deterministic, no communication."""
    order = np.argsort(-lengths, kind="stable")
    lap = np.arange(order.size) % (2 * world_size)
    ranks = np.where(lap < world_size, lap, 2 * world_size - 1 - lap)
    out = np.empty(order.size, np.int64)
    out[order] = ranks
    return out


def select_users(steps: Steps, keep_user: np.ndarray) -> Steps:
    """The steps of the users (by order of appearance) where ``keep_user`` is True."""
    group = np.repeat(np.arange(keep_user.size), user_lengths(steps.user))
    mask = keep_user[group]
    return Steps(**{f: getattr(steps, f)[mask] for f in STEP_FIELDS}, seen=steps.seen)


def schedule_users(lengths: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy slot assignment: users in the given order, each to the earliest-free slot
    (lowest slot on ties). Returns (slot, start_time) per user. One heap op per user."""
    slot = np.empty(lengths.size, np.int64)
    start = np.empty(lengths.size, np.int64)
    first = min(batch_size, lengths.size)
    slot[:first] = np.arange(first)
    start[:first] = 0
    heap = [(int(lengths[i]), i) for i in range(first)]
    heapq.heapify(heap)
    for u in range(first, lengths.size):
        free_at, s = heapq.heappop(heap)
        slot[u], start[u] = s, free_at
        heapq.heappush(heap, (free_at + int(lengths[u]), s))
    return slot, start


def build_plan(
    steps_user: np.ndarray,
    batch_size: int,
    user_order: np.ndarray | None = None,
    min_steps: int = 0,
) -> np.ndarray:
    """[T, B] matrix of step indices (-1 where a slot is empty).

    ``steps_user`` holds the user of each step (contiguous groups). ``user_order`` permutes
    the groups (e.g. a per-epoch shuffle); ``min_steps`` pads T (for equal steps on all
    DDP ranks).
    """
    n = steps_user.size
    if n == 0:
        return np.full((min_steps, batch_size), -1, np.int64)
    starts = np.flatnonzero(np.r_[True, steps_user[1:] != steps_user[:-1]])
    lengths = np.diff(np.r_[starts, n])
    if user_order is not None:
        starts, lengths = starts[user_order], lengths[user_order]
    slot, t0 = schedule_users(lengths, batch_size)
    n_time = max(int((t0 + lengths).max()), min_steps)
    plan = np.full((n_time, batch_size), -1, np.int64)
    group = np.repeat(np.arange(lengths.size), lengths)
    offset = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    plan[t0[group] + offset, slot[group]] = starts[group] + offset
    return plan


@dataclass
class Chunk:
    """One Lightning batch: T time steps of a plan for B slots, with the host-side facts a
    model reads without a device sync."""

    input: Tensor  # [T, B] input items
    target: Tensor  # [T, B] target items
    session_start: Tensor  # [T, B] bool: the slot starts a session (valid slots only)
    user_start: Tensor  # [T, B] bool: the slot starts a new user (its states reset)
    valid: Tensor  # [T, B] bool: the slot holds a step (False: masked, e.g. epoch tail)
    score: Tensor  # [T, B] bool: the prediction counts in evaluation
    position: Tensor  # [T, B] the target's position in its session
    history: Tensor  # [T, B] the user's number of earlier sessions
    time: Tensor  # [T, B] the input event's Unix seconds
    gap: Tensor  # [T, B] seconds since the user's previous event (0 at the first)
    user_index: Tensor  # [T, B] the user in the model's user vocabulary (-1: unknown)
    next_session_rows: Tensor  # [R] slots starting a known user's next session, step-major
    next_session_offsets: list[int]  # [T + 1] where each step's rows begin in it (host)
    any_start: list[bool]  # [T] whether any slot starts a session (host)
    n_events: int  # valid entries
    n_scored: int  # scored entries
    repeat: Tensor | None = None  # [T, B] bool: the user had the target before
    event: np.ndarray | None = None  # [T, B] the target's event index (host; -1: no step)
    seen: SeenItems | None = None  # the users' items by first occurrence (host, shared)

    def _map(self, fn) -> Chunk:
        return dataclasses.replace(
            self, **{f.name: fn(v) for f in dataclasses.fields(self)
                     if torch.is_tensor(v := getattr(self, f.name))}
        )  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Chunk:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Chunk:
        return self._map(lambda t: t.pin_memory())


class PlanDataset(torch.utils.data.Dataset):
    """A plan cut into Lightning batches of ``steps_per_batch`` time steps (map-style).

    Item ``i`` is a ``Chunk`` of t time steps, so the model needs no device sync to read
    where sessions start.
    Slices are cut on demand: memory stays at one plan. (A resumed epoch starts at a later
    chunk through its sampler: datamodule.ResumeSampler.)
    """

    def __init__(self, steps: Steps, plan: np.ndarray, steps_per_batch: int):
        self.plan = plan
        self.steps = steps
        self.steps_per_batch = steps_per_batch

    def __len__(self) -> int:
        return -(-self.plan.shape[0] // self.steps_per_batch)

    def __getitem__(self, i: int) -> Chunk:
        if not 0 <= i < len(self):
            raise IndexError(i)
        plan = self.plan[i * self.steps_per_batch : (i + 1) * self.steps_per_batch]
        valid = plan >= 0
        idx = np.where(valid, plan, 0)
        st = self.steps
        sstart = st.session_start[idx] & valid
        score = st.score[idx] & valid
        chunk = {
            "input": st.input[idx],
            "target": st.target[idx],
            "session_start": sstart,
            "user_start": st.user_start[idx] & valid,
            "valid": valid,
            "score": score,
            "position": st.position[idx],
            "history": st.history[idx],
            "time": st.time[idx],
            "gap": st.gap[idx],
            "user_index": np.where(valid, st.user_index[idx], -1),
            "repeat": st.repeat[idx] & valid,
        }
        # slots that continue a user into a new session (the user GRU runs on these only)
        t_idx, slots = np.nonzero(sstart & ~chunk["user_start"])
        chunk["next_session_rows"] = slots.astype(np.int64)
        return Chunk(
            **{k: torch.from_numpy(v) for k, v in chunk.items()},
            next_session_offsets=np.searchsorted(t_idx, np.arange(len(plan) + 1)).tolist(),
            any_start=sstart.any(axis=1).tolist(),
            n_events=int(valid.sum()),
            n_scored=int(score.sum()),
            event=np.where(valid, st.event[idx], -1),
            seen=st.seen,
        )
