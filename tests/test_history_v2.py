"""hrnn_history's second version (hrnn_lit/nets/history.py): the explore part's GRU4Rec
recipe options, the event-recency feature and the gate's user features against brute
force, and the gate learning to switch the repeat part off where users never repeat."""

from __future__ import annotations

import copy
import functools

import numpy as np
import polars as pl
import pytest
import pytorch_lightning as pl_
import torch

from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.api import Starts
from hrnn_lit.nets.history import HistoryHRNN
from hrnn_lit.ops.candidates import CandidateSampler
from tests.helpers import tiny_datamodule


def _starts(session, user) -> Starts:
    s, u = torch.tensor(session), torch.tensor(user)
    return Starts(s, u, (s & ~u).nonzero().view(-1))


def test_recipe_options_reach_the_core():
    net = HistoryHRNN(30, hidden_size=6, user_hidden_size=5, constrained_embedding=True,
                      dropout_embed=0.2, dropout_hidden=0.3, final_act="tanh")  # fmt: skip
    assert net.rnn.input_mode == "constrained" and net.rnn.final_act_name == "tanh"
    assert (net.rnn.drop_embed.p, net.rnn.drop_hidden.p) == (0.2, 0.3)
    assert HistoryHRNN(30, hidden_size=6, embedding=4).rnn.input_mode == "embedding"
    with pytest.raises(ValueError, match="constrained_embedding"):
        HistoryHRNN(30, embedding=4, constrained_embedding=True)
    with pytest.raises(ValueError, match="event_decay"):
        HistoryHRNN(30, event_decay=1.0)


def test_event_recency_and_user_stats_against_a_replay():
    """The event-recency feature is event_decay^(the user's events since the item's last
    event), the stats count the user's events and those whose item was listed, and the
    gate's logit is mode(h, c) + log((repeats + 1/2) / (events - repeats + 1/2)) at init;
    all against a plain Python replay, across a session and a user start."""
    net = HistoryHRNN(20, hidden_size=4, user_hidden_size=3, event_decay=0.8,
                      user_features=True, memory=4).eval()  # fmt: skip
    seqs = {0: [[3, 4, 3], [5, 4]], 1: [[7, 8], [9, 7, 7]]}  # slot: sessions
    state = net.initial_state(2, torch.device("cpu"))
    hist: dict[int, list[int]] = {0: [], 1: []}
    for s in range(2):
        state = net.start(state, _starts([True, True], [s == 0, s == 0]))
        for t in range(3):
            live = [b for b in (0, 1) if t < len(seqs[b][s])]
            items = torch.tensor([seqs[b][s][t] if b in live else 0 for b in (0, 1)])
            stepped = net.step(items, tuple(x.clone() for x in state))
            state = tuple(torch.where(torch.tensor([b in live for b in (0, 1)]).view(
                -1, *[1] * (x.dim() - 1)), y, x) for x, y in zip(state, stepped))  # fmt: skip
            for b in live:
                hist[b].append(seqs[b][s][t])
    listed, feats, n_listed, stats = state[2], state[3], state[4], state[5]
    feat = net._features(feats, stats)
    for b in (0, 1):
        events = hist[b]
        repeats = sum(item in events[:i] for i, item in enumerate(events))  # (< memory)
        assert stats[b].tolist() == [len(events), repeats]
        for k in range(int(n_listed[b])):
            item = int(listed[b, k])
            age = len(events) - 1 - max(i for i, x in enumerate(events) if x == item)
            assert feat[b, 3, k].item() == pytest.approx(0.8**age)
        with torch.no_grad():
            hc = torch.cat([state[0][b : b + 1], state[1][b : b + 1]], 1)
            want = torch.sigmoid(net.mode(hc) + np.log((repeats + 0.5) / (len(events) - repeats
                                                                        + 0.5)))  # fmt: skip
            torch.testing.assert_close(net.p_repeat(state)[b], want.view(()))


def _no_repeat_data(n_users: int = 48, seed: int = 0) -> pl.DataFrame:
    """Like a rating log: each user consumes each item at most once (5 sessions of 4)."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        own = rng.choice(120, size=20, replace=False)
        for k, item in enumerate(own):
            users.append(u)
            items.append(int(item))
            ts.append(10**6 * (u + 1) + (k // 4) * 10_000 + (k % 4) * 10)
    return pl.DataFrame({"user": users, "item": items, "ts": ts}).cast(pl.Int64)


def _mean_p_repeat(net: HistoryHRNN, frame: pl.DataFrame) -> float:
    """Mean P(repeat) over the steps of every user's sessions (one slot per user) that
    have history."""
    net = net.eval()
    users = frame["user"].unique().sort().to_list()
    seqs = [frame.filter(pl.col("user") == u)["item"].to_list() for u in users]
    state, out = net.initial_state(len(users), torch.device("cpu")), []
    with torch.no_grad():
        for k in range(20):
            if k % 4 == 0:
                state = net.start(state, _starts([True] * len(users), [k == 0] * len(users)))
            state = net.step(torch.tensor([s[k] for s in seqs]), state)
            out.append(net.p_repeat(state))
    return float(torch.stack(out).mean())


@pytest.mark.parametrize("user_features", [False, True])
def test_the_gate_learns_no_repeats_where_users_never_repeat(user_features):
    """On data without repeats, training (logQ on: it reaches the distinct path) drives
    mean P(repeat) on fresh users well below its initial value; the evaluation's metrics
    do not depend on logQ (the sampler only shapes training)."""
    dm = tiny_datamodule(functools.partial(_no_repeat_data), "no_repeats")
    torch.manual_seed(0)
    net = {"_target_": "hrnn_lit.nets.history.HistoryHRNN", "hidden_size": 16,
           "user_hidden_size": 16, "user_features": user_features}  # fmt: skip
    model = RecurrentRecommender(
        n_items=dm.n_items, item_counts=dm.item_counts, net=net, loss="cross-entropy",
        n_sample=16, logq=1.0, ks=[5], lr=0.02,
    )  # fmt: skip
    assert model.distinct and model.sampler.logq == 1.0
    fresh = _no_repeat_data(seed=1).with_columns(pl.col("item") % dm.n_items)
    before = _mean_p_repeat(copy.deepcopy(model.net), fresh)
    trainer = pl_.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    after = _mean_p_repeat(model.net, fresh)
    assert after < 0.5 * before, (before, after)
    trainer.test(model, datamodule=dm, verbose=False)
    ranks = model.eval_outputs["test"]["rank"].clone()
    model.sampler = CandidateSampler(model.item_counts, 16, 0.5, 0.0)
    trainer.test(model, datamodule=dm, verbose=False)
    assert torch.equal(model.eval_outputs["test"]["rank"], ranks)


def test_fold_outside_keeps_the_mixture_whole_in_the_candidates_softmax():
    """In training with ``fold_outside``, the candidates' columns (weighed by their counts)
    hold the mixture's whole mass, 1, also when listed items are not candidates; each row's
    target column scores as without it (the candidates' cross-entropy is then the
    mixture's negative log-likelihood); evaluation's scores are unchanged."""
    torch.manual_seed(0)
    net = HistoryHRNN(30, hidden_size=6, user_hidden_size=5, fold_outside=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    plain = copy.deepcopy(net)
    plain.fold_outside = False
    state = net.initial_state(4, torch.device("cpu"))
    state = net.step(torch.tensor([1, 2, 3, 4]), net.start(state, _starts([True] * 4, [True] * 4)))
    state = net.step(torch.tensor([2, 5, 6, 7]), state)
    cand = torch.tensor([0, 9, 2, 4, 9, 11, 0, 13])  # targets 0, 9, 2, 4: 5, 6, 7 not here
    uniq, inverse = torch.unique(cand, return_inverse=True)
    counts = torch.bincount(inverse).double()
    with torch.no_grad():
        got = net.score_distinct(state, uniq, inverse).double()
        want = plain.score_distinct(state, uniq, inverse).double()
        total = (got.exp() * counts).sum(1)
        torch.testing.assert_close(total, torch.ones(4, dtype=torch.float64))
        assert ((want.exp() * counts).sum(1) < 1 - 1e-3).all()  # mass lost without it
        rows = torch.arange(4)
        assert torch.equal(got[rows, inverse[:4]], want[rows, inverse[:4]])
        net.eval(), plain.eval()
        assert torch.equal(net.score_distinct(state, uniq, inverse),
                           plain.score_distinct(state, uniq, inverse))  # fmt: skip
