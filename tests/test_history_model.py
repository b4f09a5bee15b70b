"""hrnn_history (hrnn_lit/nets/history.py): the repeat mechanism's invariants, its
gradients against float64, a real run, and the independent-sessions control data."""

from __future__ import annotations

import copy
import functools

import numpy as np
import polars as pl
import pytest
import pytorch_lightning as pl_
import torch

from hrnn_lit.data.synthetic import generate_events
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.api import Starts
from hrnn_lit.nets.history import HistoryHRNN
from hrnn_lit.ops.losses import LOSSES
from hrnn_lit.run import run
from tests.conftest import CONF, TINY
from tests.helpers import tiny_datamodule


def _starts(session, user) -> Starts:
    s, u = torch.tensor(session), torch.tensor(user)
    return Starts(s, u, (s & ~u).nonzero().view(-1))


def _counts(net: HistoryHRNN, state) -> torch.Tensor:
    """The listed items' features as dense [B, 3, n_items] counts."""
    listed, feats, n_listed = state[2:5]
    filled = torch.arange(net.memory) < n_listed[:, None]
    dense = torch.zeros(listed.shape[0], 3, net.n_items)
    feats = feats[:, :3]
    for b in range(listed.shape[0]):
        dense[b][:, listed[b][filled[b]]] = feats[b][:, filled[b]]
    return dense


def test_history_counts_decay_by_session_and_reset_per_user():
    net = HistoryHRNN(n_items=10, hidden_size=4, user_hidden_size=3, decay=0.5).eval()
    state = net.initial_state(2, torch.device("cpu"))
    state = net.step(torch.tensor([3, 4]), net.start(state, _starts([True, True], [True, True])))
    state = net.step(torch.tensor([3, 5]), net.start(state, _starts([True, False], [False, False])))
    hist = _counts(net, state)
    # slot 0: item 3 in two sessions; the first one decayed once; in session now
    assert hist[0, :, 3].tolist() == [2.0, 1.5, 1.0] and hist[0, 0].sum() == 2
    # slot 1: one session with items 4 and 5
    assert hist[1, :, 4].tolist() == [1.0, 1.0, 1.0] and hist[1, 0].sum() == 2
    state = net.start(state, _starts([True, True], [True, False]))
    hist = _counts(net, state)
    assert (hist[0] == 0).all(), "a new user starts without history"
    assert hist[1, 2].sum() == 0 and hist[1, 0].sum() == 2, "a new session"


def test_the_memory_keeps_the_last_distinct_items():
    net = HistoryHRNN(n_items=10, hidden_size=4, user_hidden_size=3, memory=2).eval()
    state = net.initial_state(1, torch.device("cpu"))
    state = net.start(state, _starts([True], [True]))
    for item in (3, 4, 3, 5):  # 3 and 4 listed; 5 takes the place of 3 (listed first)
        state = net.step(torch.tensor([item]), state)
    hist = _counts(net, state)
    assert sorted(state[2][0].tolist()) == [4, 5] and state[4].tolist() == [3]
    assert hist[0, 0, 3] == 0 and hist[0, 0, 4] == 1 and hist[0, 0, 5] == 1
    with torch.no_grad():
        p = net.score(state).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(1))


def test_candidate_scores_equal_the_catalogue_scores_on_their_columns():
    """Training's candidate columns (repeats allowed) read the same repeat scores as the
    catalogue: the same log-probabilities up to the explore part's normaliser."""
    torch.manual_seed(0)
    net = HistoryHRNN(n_items=20, hidden_size=4, user_hidden_size=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = net.initial_state(3, torch.device("cpu"))
    state = net.step(torch.tensor([1, 2, 3]), net.start(state, _starts([True] * 3, [True] * 3)))
    state = net.step(torch.tensor([4, 2, 7]), state)
    cand = torch.tensor([4, 9, 1, 4, 2, 7, 19])
    with torch.no_grad():
        sub = net.score(state, cand)
        full = net.score(state)[:, cand]
        s = net.rnn.score(state[:2], None)
    # p = a p_rep + (1 - a) p_exp: remove the explore part, compare the repeat part
    a = torch.sigmoid(net.mode(torch.cat(state[:2], 1)))
    e_full = (1 - a) * torch.softmax(s, 1)[:, cand]
    e_sub = (1 - a) * torch.softmax(s[:, cand], 1)
    torch.testing.assert_close(sub.exp() - e_sub, full.exp() - e_full, atol=1e-6, rtol=1e-5)
    rep = (full.exp() - e_full)[:, 1]  # item 9 is nobody's history
    torch.testing.assert_close(rep, torch.zeros_like(rep), atol=1e-7, rtol=0)


def test_scores_are_log_probabilities_over_the_catalogue():
    torch.manual_seed(0)
    net = HistoryHRNN(n_items=12, hidden_size=4, user_hidden_size=3).eval()
    state = net.initial_state(3, torch.device("cpu"))
    state = net.step(torch.tensor([1, 2, 3]), net.start(state, _starts([True] * 3, [True] * 3)))
    state = net.start(state, _starts([True, True, False], [False, False, False]))
    state = net.step(torch.tensor([4, 2, 5]), state)
    with torch.no_grad():
        p = net.score(state).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(3))


@pytest.mark.parametrize("loss", ["cross-entropy", "top1"])
def test_gradients_match_float64(loss):
    """Autograd through the network (CPU float32, the C GRU kernel where built) gives the
    float64 gradients of the same step."""
    torch.manual_seed(0)
    net = HistoryHRNN(n_items=30, hidden_size=6, user_hidden_size=5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(net).double()
    grads = []
    for m, dtype in ((net, torch.float32), (ref, torch.float64)):
        state = tuple(
            x.to(dtype) if x.is_floating_point() else x
            for x in m.initial_state(4, torch.device("cpu"))
        )
        state = m.step(torch.tensor([1, 2, 3, 4]), m.start(state, _starts([True] * 4, [True] * 4)))
        state = m.step(torch.tensor([2, 5, 3, 7]), state)
        state = m.start(state, _starts([True, True, False, False], [False, True, False, False]))
        state = m.step(torch.tensor([1, 6, 8, 4]), state)
        cand = torch.tensor([2, 9, 3, 4, 1, 2, 11])
        valid = torch.tensor([True, True, False, True])
        m.zero_grad()
        LOSSES[loss](m.score(state, cand), valid).backward()
        grads.append(
            {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).double()
             for n, p in m.named_parameters() if p.grad is not None}
        )  # fmt: skip
    assert grads[0].keys() == grads[1].keys()
    assert {"gate.weight", "mode.weight", "rnn.w_h.weight"} <= grads[0].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=2e-4, atol=2e-6)


def _repeat_data(n_users: int = 40, seed: int = 0) -> pl.DataFrame:
    """Every session of user u: [noise, f_u, noise, f_u] (f_u the user's own item)."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        for s in range(6):
            for k, item in enumerate([rng.integers(100, 140), u, rng.integers(100, 140), u]):
                users.append(u)
                items.append(int(item))
                ts.append(1_000_000 + u * 10**6 + s * 10_000 + k * 10)
    return pl.DataFrame({"user": users, "item": items, "ts": ts}).cast(pl.Int64)


def test_a_user_who_repeats_one_item_gets_it_ranked_first():
    dm = tiny_datamodule(functools.partial(_repeat_data), "repeats")
    torch.manual_seed(0)
    net = {"_target_": "hrnn_lit.nets.history.HistoryHRNN", "hidden_size": 16,
           "user_hidden_size": 16}  # fmt: skip
    model = RecurrentRecommender(
        n_items=dm.n_items, item_counts=dm.item_counts, net=net, loss="cross-entropy",
        n_sample=16, ks=[1, 5],
    )  # fmt: skip
    trainer = pl_.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=5,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    out = model.eval_outputs["test"]
    repeat = (out["position"] == 1) | (out["position"] == 3)  # the targets that are f_u
    assert int(repeat.sum()) == 2 * 40
    assert (out["rank"][repeat] == 1).float().mean() >= 0.95


def test_hrnn_history_runs_on_the_default_data(tmp_path):
    from hydra import compose, initialize_config_dir

    tiny = [o for o in TINY if not o.startswith("model.")]
    overrides = [f"paths.output_dir={tmp_path}", *tiny, "logger=none", "model=hrnn_history",
                 "model.net.hidden_size=16", "model.net.user_hidden_size=16",
                 "model.n_sample=32"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        res = run(compose("config", overrides=overrides))
    assert res["engine"] == "autograd" and 0 < res["test/recall@5"] <= 1


def _consecutive_overlap(frame: pl.DataFrame) -> float:
    """Mean Jaccard overlap of the item sets of a user's consecutive sessions."""
    frame = frame.sort(["user", "ts"])
    gap = frame["ts"].diff().fill_null(10**9) > 1800
    new_user = frame["user"].diff().fill_null(1) != 0
    ses = (gap | new_user).cum_sum()
    sets = (
        frame.with_columns(ses=ses)
        .group_by("ses", maintain_order=True)
        .agg(pl.col("user").first(), pl.col("item").unique())
    )
    users, items = sets["user"].to_list(), sets["item"].to_list()
    j = [len(set(a) & set(b)) / len(set(a) | set(b))
         for u0, u1, a, b in zip(users, users[1:], items, items[1:]) if u0 == u1]  # fmt: skip
    return float(np.mean(j))


def test_independent_sessions_leave_no_cross_session_signal():
    kw = dict(n_users=300, n_items=1000, n_topics=20, n_groups=20, n_hot=200, seed=0)
    linked = _consecutive_overlap(generate_events(**kw))
    independent = _consecutive_overlap(generate_events(**kw, independent_sessions=True))
    shuffled_users = _consecutive_overlap(
        generate_events(**kw, independent_sessions=True).with_columns(
            pl.col("user").shuffle(seed=1).alias("user")
        )
    )
    assert linked > 2 * independent
    assert independent < 0.05 and shuffled_users < 0.05
    with pytest.raises(ValueError, match="independent_sessions"):
        generate_events(**kw, independent_sessions=True, p_revisit=0.3)
