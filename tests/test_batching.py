"""User-parallel batching invariants (docs/design.md §3)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrnn_lit.data.batching import PlanDataset, build_plan, build_steps, schedule_users


def layout(session_lengths_per_user: list[list[int]]):
    """Events (item, user, session) sorted by (user, session, time); items are unique ids."""
    users, sessions = [], []
    sid = 0
    for u, lengths in enumerate(session_lengths_per_user):
        for length in lengths:
            users += [u] * length
            sessions += [sid] * length
            sid += 1
    n = len(users)
    return np.arange(n, dtype=np.int64) + 100, np.array(users, np.int64), np.array(sessions)


def test_build_steps_by_hand():
    item, user, ses = layout([[2, 3], [1, 2]])  # items 100..107
    s = build_steps(item, user, ses)
    assert s.input.tolist() == [100, 102, 103, 106]
    assert s.target.tolist() == [101, 103, 104, 107]
    assert s.session_start.tolist() == [True, True, False, True]
    assert s.user_start.tolist() == [True, False, False, True]
    assert s.position.tolist() == [1, 1, 2, 1]
    assert s.history.tolist() == [0, 1, 1, 1]  # user 1's one-event session still counts


def test_schedule_next_user_takes_first_free_slot():
    slot, start = schedule_users(np.array([5, 2, 3, 1, 4]), batch_size=2)
    # t=0: u0->s0 (until 5), u1->s1 (until 2); u2->s1 at 2 (until 5); u3->s0 at 5 (tie:
    # lowest slot) until 6; u4->s1 at 5.
    assert slot.tolist() == [0, 1, 1, 0, 1]
    assert start.tolist() == [0, 0, 2, 5, 5]


def walk(plan: np.ndarray, steps, batch_size: int) -> None:
    """Check every invariant of a plan against its steps."""
    valid = plan >= 0
    # every step exactly once: each non-first event of a session is a target once
    assert sorted(plan[valid].tolist()) == list(range(len(steps)))
    assert plan.shape[1] == batch_size
    for b in range(batch_size):
        col = plan[:, b]
        idx = col[col >= 0]
        # once a slot is empty it stays empty (the tail), and a slot runs steps in order
        # within each user
        n_valid = idx.size
        assert (col[:n_valid] >= 0).all() and (col[n_valid:] < 0).all()
        users = steps.user[idx]
        for u in np.unique(users):
            mine = idx[users == u]
            assert (np.diff(mine) == 1).all(), "a user's steps are contiguous and in order"
        # flags exactly at boundaries as seen by the slot
        prev_user = np.r_[-1, users[:-1]]
        assert (steps.user_start[idx] == (users != prev_user)).all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=5), min_size=1, max_size=25),
    st.integers(1, 9),
    st.booleans(),
)
def test_plan_invariants_random_layouts(lengths, batch_size, shuffle):
    item, user, ses = layout(lengths)
    steps = build_steps(item, user, ses)
    n_expected = sum(length - 1 for ls in lengths for length in ls)
    assert len(steps) == n_expected
    if n_expected == 0:
        return
    # targets are exactly the non-first events of every session
    first = np.r_[True, ses[1:] != ses[:-1]]
    assert sorted(steps.target.tolist()) == sorted(item[~first].tolist())
    # session_start exactly where the session changes between consecutive steps
    step_session = ses[steps.input - 100]
    assert (steps.session_start == np.r_[True, step_session[1:] != step_session[:-1]]).all()
    order = None
    if shuffle:
        n_users = int(steps.user_start.sum())
        order = np.random.default_rng(0).permutation(n_users)
    plan = build_plan(steps.user, batch_size, order)
    walk(plan, steps, batch_size)


def test_tail_is_masked_not_dropped():
    # one long user and many short ones: the reference would drop tail users
    item, user, ses = layout([[30]] + [[2, 2]] * 7)
    steps = build_steps(item, user, ses)
    plan = build_plan(steps.user, batch_size=3)
    assert (plan >= 0).sum() == len(steps) == 29 + 7 * 2
    ds = PlanDataset(steps, plan, steps_per_batch=4)
    chunks = [ds[i] for i in range(len(ds))]
    assert sum(c.n_events for c in chunks) == len(steps)
    targets = torch.cat([c.target[c.valid] for c in chunks])
    assert sorted(targets.tolist()) == sorted(steps.target.tolist())
    last = chunks[-1]
    assert not last.valid[-1].all(), "tail steps hold masked slots"
    assert not (last.session_start & ~last.valid).any()


def test_min_steps_pads_plan():
    item, user, ses = layout([[3], [2]])
    steps = build_steps(item, user, ses)
    plan = build_plan(steps.user, 2, min_steps=10)
    assert plan.shape == (10, 2) and (plan >= 0).sum() == 3
