"""HRNN state rules (DESIGN §2) checked on the real module."""

from __future__ import annotations

import numpy as np
import torch

from hrnn_lit.data.batching import PlanDataset, build_plan, build_steps
from hrnn_lit.models.module import RecurrentRecommender


def make_model(propagation="init", **kw) -> RecurrentRecommender:
    torch.manual_seed(0)
    m = RecurrentRecommender(
        n_items=50, hidden_size=8, user_hidden_size=6, user_propagation=propagation, **kw
    )
    return m.eval()


def chunk_for(sessions_per_user: list[list[list[int]]], batch_size: int) -> dict:
    """One chunk holding the whole plan for users given as lists of sessions of items."""
    item, user, ses = [], [], []
    sid = 0
    for u, sessions in enumerate(sessions_per_user):
        for s in sessions:
            item += s
            user += [u] * len(s)
            ses += [sid] * len(s)
            sid += 1
    steps = build_steps(np.array(item), np.array(user), np.array(ses))
    plan = build_plan(steps.user, batch_size)
    return PlanDataset(steps, plan, steps_per_batch=plan.shape[0])[0]


USER_A = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
USER_B = [[10, 11, 12], [13, 14, 15]]


def test_first_session_starts_from_zero_state():
    m = make_model()
    h = torch.randn(3, 8)
    c = torch.randn(3, 6)
    ss = torch.tensor([True, True, False])
    us = torch.tensor([True, False, False])
    h2, c2 = m.core.start_sessions(h, c, ss, us)
    assert (h2[0] == 0).all() and (c2[0] == 0).all()  # new user: both reset
    assert not torch.equal(c2[1], c[1])  # session start: user GRU updated ...
    assert torch.allclose(h2[1], torch.tanh(m.core.w_init(c2[1])))  # ... and h from c
    assert torch.equal(h2[2], h[2]) and torch.equal(c2[2], c[2])  # mid-session: untouched


def test_user_state_changes_only_at_session_starts():
    for propagation in ("init", "all"):
        m = make_model(propagation)
        batch = chunk_for([USER_A, USER_B], batch_size=1)
        with torch.no_grad():
            _, cs, _ = m.unroll(batch)
        ss = batch["session_start"][:, 0]
        c = cs[:, 0]
        changed = (c[1:] != c[:-1]).any(dim=1)
        assert torch.equal(changed, ss[1:]), propagation
        # and c is exactly zero during a user's first session
        first_session = torch.tensor(
            [True, True, False, False, False, False, True, True, False, False]
        )
        assert first_session.numel() == c.shape[0]
        assert (c[first_session] == 0).all()


def test_no_state_leaks_between_users_in_a_slot():
    for propagation in ("none", "init", "all"):
        m = make_model(propagation, user_to_output=propagation != "none")
        both = chunk_for([USER_A, USER_B], batch_size=1)  # B follows A in the one slot
        alone = chunk_for([USER_B], batch_size=1)
        with torch.no_grad():
            h_both, c_both, _ = m.unroll(both)
            h_alone, c_alone, _ = m.unroll(alone)
        n_b = h_alone.shape[0]
        assert torch.allclose(h_both[-n_b:], h_alone, atol=0, rtol=0), propagation
        assert torch.equal(c_both[-n_b:], c_alone), propagation


def test_session_rnn_resets_at_every_session():
    m = make_model("none")
    # the same session replayed after different histories gives the same states
    x = chunk_for([[[1, 2, 3], [7, 8, 9]]], batch_size=1)
    y = chunk_for([[[4, 5], [6, 5, 4, 3], [7, 8, 9]]], batch_size=1)
    with torch.no_grad():
        hx, _, _ = m.unroll(x)
        hy, _, _ = m.unroll(y)
    assert torch.equal(hx[-2:], hy[-2:])
    mh = make_model("init")
    with torch.no_grad():
        hx, _, _ = mh.unroll(x)
        hy, _, _ = mh.unroll(y)
    assert not torch.allclose(hx[-2:], hy[-2:]), "HRNN's session start depends on history"
