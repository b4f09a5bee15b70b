"""Repeat/explore metrics (docs/design.md §6): a scored target is a repeat when its user had
the item before (an earlier session or earlier in this session), else explore; and
``repeat_share@K``, the share of the top K that the user had before. Checked against plain
Python references over the events: flags, per-event counts on every ranking path (score
factors, sparse scores, dense scores; both tie rules, with exact ties), the metrics, and a
whole run's results.json and CSV log."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from hrnn_lit.baselines.popularity import PopNet, UserPopNet
from hrnn_lit.data.batching import PlanDataset, build_plan, build_steps, select_users
from hrnn_lit.evaluation.evaluator import RankCollector, repeat_metrics
from hrnn_lit.evaluation.loop import EvalLoop
from hrnn_lit.evaluation.metrics import TIES, metrics_from_ranks
from hrnn_lit.evaluation.ranking import catalogue_ranks, linear_scores
from hrnn_lit.evaluation.repeat_share import catalogue_ranks_repeat
from hrnn_lit.nets.history import HistoryHRNN
from hrnn_lit.nets.recurrent import RecurrentCore
from hrnn_lit.run import run
from tests.conftest import compose_cfg
from tests.helpers import events_of, replay
from tests.test_eval_speed_paths import threads

KS = (1, 2, 3)


def seen_before(item, user):
    """Plain reference: per event, the set of items of its user's earlier events."""
    out, have, last = [], set(), None
    for i, u in zip(item.tolist(), user.tolist()):
        if u != last:
            have, last = set(), u
        out.append(set(have))
        have.add(i)
    return out


def rank_of(scores: np.ndarray, j: int, ties: str) -> int:
    if ties == "conservative":
        return int((scores >= scores[j]).sum())
    return 1 + int((scores > scores[j]).sum())


def share_count(scores: np.ndarray, seen: set, k: int, ties: str) -> int:
    """The definition: the user's earlier items whose own rank is at most K (at most K)."""
    return min(k, sum(rank_of(scores, j, ties) <= k for j in seen))


# ------------------------------------------------------------------ flags and sets
def test_repeat_flags_and_seen_items_by_hand():
    # user 0: a history session, a one-event session (no step, its item counts as seen),
    # then a session repeating within itself; user 1: a repeat across sessions
    users = [[[1, 2, 3], [5], [2, 4, 4, 6]], [[7, 8], [9, 7]]]
    item, user, ses = events_of(users)
    steps = build_steps(item, user, ses)
    assert steps.target.tolist() == [2, 3, 4, 4, 6, 8, 7]
    assert steps.repeat.tolist() == [False, False, False, True, False, False, True]
    offsets, seen = steps.seen.before(steps.event)
    got = [sorted(seen[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert got == [[1], [1, 2], [1, 2, 3, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [7], [7, 8, 9]]
    ref = seen_before(item, user)
    assert got == [sorted(ref[e]) for e in steps.event]
    assert steps.repeat.tolist() == [item[e] in ref[e] for e in steps.event]
    # a subset of whole users keeps its flags and sets
    one = select_users(steps, np.array([False, True]))
    offsets, seen = one.seen.before(one.event)
    assert one.repeat.tolist() == [False, True]
    assert [sorted(seen[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])] == [
        [7],
        [7, 8, 9],
    ]


# ------------------------------------------------------------------ a pass by hand
def run_loop(net, steps, n_items, ties, batch_size=2, steps_per_batch=3, fast=True, ks=KS):
    plan = build_plan(steps.user, batch_size)
    data = PlanDataset(steps, plan, steps_per_batch)
    chunks = [data[i] for i in range(len(data))]
    collector = RankCollector(ties, rank_cap=max(ks), ks=ks)
    loop = EvalLoop(n_items, eval_block=3, fast=fast)
    loop.begin(net, collector)
    with torch.no_grad():
        for batch in chunks:
            loop.chunk(batch)
    events = [int(b.event[t, r]) for b in chunks for t, r in b.score.nonzero().tolist()]
    metrics, out = collector.finish("test", list(ks))
    return metrics, out, events


@pytest.mark.parametrize("ties", TIES)
def test_pop_metrics_equal_the_hand_computed_ones(ties):
    """POP ranks every event alike: items by a fixed score with a tie (items 3 and 4)."""
    n_items = 8
    pop = torch.tensor([0.0, 7.0, 6.0, 5.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    users = [[[1, 2, 3], [5], [2, 4, 4, 6]], [[7, 1], [3, 7]], [[0, 6, 1]]]
    item, user, ses = events_of(users)
    score = np.zeros(item.size, bool)
    score[[2, 5, 6, 7, 11, 13, 14]] = True  # the last sessions' targets and one more
    steps = build_steps(item, user, ses, score)
    net = PopNet(n_items)
    net.pop = pop
    metrics, out, events = run_loop(net, steps, n_items, ties)
    ref = seen_before(item, user)
    s = pop.numpy()
    ranks = [rank_of(s, item[e], ties) for e in events]
    repeat = [item[e] in ref[e] for e in events]
    counts = [[share_count(s, ref[e], k, ties) for k in KS] for e in events]
    assert sorted(events) == [2, 5, 6, 7, 11, 13, 14]
    assert out["rank"].tolist() == [min(r, max(KS) + 1) for r in ranks]
    assert out["repeat"].tolist() == repeat
    assert out["repeat_count"].tolist() == counts
    # by hand for a few: event 5 (item 4, user 0 had 1, 2, 3, 5): explore; its top 3 is
    # 1, 2 and the tie 3/4: conservative counts 1, 2 (3 ties 4: rank 4), optimistic 1, 2, 3
    i5 = events.index(5)
    assert not repeat[i5] and counts[i5] == ([1, 2, 2] if ties == "conservative" else [1, 2, 3])
    assert repeat[events.index(6)] and repeat[events.index(11)]  # 4 again; 7 again
    assert [repeat[events.index(e)] for e in (2, 7, 13, 14)] == [False] * 4
    sel = np.array(repeat)
    r = torch.tensor(ranks, dtype=torch.long)
    for name, mask in (("repeat", sel), ("explore", ~sel)):
        want = metrics_from_ranks(r[torch.from_numpy(mask)], KS, prefix=f"test_{name}/")
        assert not any("/ndcg@" in key for key in metrics if key.startswith("test_"))
        for key, value in want.items():
            if "/ndcg@" not in key:
                assert metrics[key] == pytest.approx(value, abs=1e-12), key
        assert metrics[f"test_{name}/n_events"] == mask.sum()
    assert metrics["test_repeat/n_events"] + metrics["test_explore/n_events"] == len(events)
    assert metrics["test/n_events"] == len(events)
    for i, k in enumerate(KS):
        want = sum(c[i] for c in counts) / k / len(events)
        assert metrics[f"test/repeat_share@{k}"] == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------ the three paths
def random_eval_steps(n_users=40, n_items=60, seed=0):
    """Users with 1-5 sessions of 1-6 events over a small catalogue (many repeats, some
    one-event sessions); the last session is scored."""
    rng = np.random.default_rng(seed)
    item, user, ses, score = [], [], [], []
    n_ses = 0
    for u in range(n_users):
        k = int(rng.integers(1, 6))
        for s in range(k):
            length = int(rng.integers(1, 7))
            item += rng.integers(0, n_items, length).tolist()
            user += [u] * length
            ses += [n_ses] * length
            score += [s == k - 1] * length
            n_ses += 1
    arrays = np.array(item), np.array(user), np.array(ses), np.array(score)
    return arrays, build_steps(*arrays)


def brute_force(net, steps, arrays, ties, ks, batch_size=16, steps_per_batch=5):
    """The plain replay on every slot, full scores for each scored event, and the repeat
    flag and counts from the events by definition (also the top K by a sort where no tie
    sits at its border)."""
    item, user = arrays[0], arrays[1]
    ref = seen_before(item, user)
    plan = build_plan(steps.user, batch_size)
    data = PlanDataset(steps, plan, steps_per_batch)
    rows = []
    state = None
    with torch.no_grad():
        for batch in (data[i] for i in range(len(data))):
            states, state = replay(net, batch, state)
            for t, st in enumerate(states):
                slots = batch.score[t].nonzero().view(-1)
                if slots.numel():
                    full = net.score(tuple(x[slots] for x in st)).double().numpy()
                    for r, sc in zip(slots.tolist(), full):
                        e = int(batch.event[t, r])
                        counts = [share_count(sc, ref[e], k, ties) for k in ks]
                        order = np.argsort(-sc, kind="stable")
                        for k, c in zip(ks, counts):
                            if k < sc.size and sc[order[k - 1]] != sc[order[k]]:
                                assert c == len(set(order[:k].tolist()) & ref[e])
                        rows.append((rank_of(sc, item[e], ties), item[e] in ref[e], counts))
    return rows


def nets(n_items):
    torch.manual_seed(0)
    rnn = RecurrentCore(n_items, hidden_size=16, user_hidden_size=12).eval()
    hist = HistoryHRNN(n_items, hidden_size=16, user_hidden_size=12).eval()
    with torch.no_grad():
        hist.mode.bias.fill_(2.0)  # a prior that ranks the user's items high
    user_pop = UserPopNet(n_items)
    user_pop.pop = torch.arange(n_items, dtype=torch.float64) % 7  # many exact ties
    return {"rnn_score_factors": rnn, "user_pop_sparse": user_pop, "hrnn_history_dense": hist}


@pytest.mark.parametrize("name", ["rnn_score_factors", "user_pop_sparse", "hrnn_history_dense"])
def test_repeat_counts_equal_the_brute_force_on_every_path(name):
    """Per event: rank, repeat flag and counts at every K equal the brute force, through the
    network's fast form and through dense scores (the three paths agree)."""
    n_items, ks = 60, (1, 5, 10)
    arrays, steps = random_eval_steps(n_items=n_items)
    net = nets(n_items)[name]
    assert hasattr(net, "score_factors") == (name == "rnn_score_factors")
    assert hasattr(net, "sparse_scores") == (name == "user_pop_sparse")
    for ties in TIES:
        ref = brute_force(net, steps, arrays, ties, ks)
        assert sum(r[1] for r in ref) > 10 and sum(not r[1] for r in ref) > 10
        assert any(c[-1] > 0 for *_, c in ref)
        for fast in (True, False):
            _, out, _ = run_loop(net, steps, n_items, ties, 16, 5, fast=fast, ks=ks)
            assert out["rank"].tolist() == [min(r[0], max(ks) + 1) for r in ref], (ties, fast)
            assert out["repeat"].tolist() == [r[1] for r in ref]
            assert out["repeat_count"].tolist() == [r[2] for r in ref], (ties, fast)


@pytest.mark.parametrize("ties", TIES)
def test_catalogue_ranks_repeat_equals_the_full_matrix(ties, monkeypatch):
    """The blocked product (small column blocks, rows leaving early, a row block finished on
    the plain path) against the full score matrix; with exact ties (saturated tanh)."""
    from hrnn_lit.evaluation import ranking

    monkeypatch.setattr(ranking, "BLOCK_BYTES", 16 << 10)
    g = torch.Generator().manual_seed(1)
    n, N, H = 700, 300, 24
    w, b = torch.randn(n, H, generator=g), torch.randn(n, 1, generator=g) * 0.1
    h = torch.randn(N, H, generator=g)
    tg = torch.randint(0, n, (N,), generator=g)
    counts = torch.randint(0, 30, (N,), generator=g)
    counts[::7] = 0  # rows without an earlier item
    pr = torch.repeat_interleave(torch.arange(N), counts)
    pi = torch.randint(0, n, (pr.numel(),), generator=g)
    hi = (h @ w.T).topk(3, dim=1).indices  # some pairs among the top items
    pr = torch.cat([pr, torch.arange(0, N, 3)])
    pi = torch.cat([pi, hi[::3, 1]])
    key = torch.unique(pr * n + pi)  # distinct items per row, rows ascending
    pr, pi = key // n, key % n
    for act, scale in (("linear", 1.0), ("tanh", 50.0)):
        ks = [5, 10, 20]
        for n_threads in (1, 2):
            with threads(n_threads):
                ranks, got = catalogue_ranks_repeat(
                    h * scale, tg, pr, pi, w, b, ks, ties, act=act, max_rows=100, rank_cap=20
                )
                full = linear_scores(h * scale, w, b, act=act).double().numpy()
        want = torch.tensor([[share_count(full[r], set(pi[pr == r].tolist()), k, ties)
                              for k in ks] for r in range(N)])  # fmt: skip
        assert torch.equal(got, want), act
        plain = catalogue_ranks(h * scale, tg, w, b, ties, act=act, max_rows=100, rank_cap=20)
        assert torch.equal(ranks, plain), act
        if act == "linear":
            assert (want[:, -1] > 0).sum() > 20


def test_repeat_metrics_split_the_same_ranks():
    ranks = torch.tensor([1, 3, 21, 2, 7, 21])
    repeat = torch.tensor([True, False, False, True, True, False])
    count = torch.tensor([[1, 2, 2], [0, 0, 1], [5, 9, 20], [0, 0, 0], [2, 3, 3], [1, 1, 1]])
    out = {"rank": ranks, "repeat": repeat, "repeat_count": count}
    m = repeat_metrics(out, [5, 10, 20], [5, 10, 20], "val")
    assert m["val_repeat/n_events"] == 3 and m["val_explore/n_events"] == 3
    assert m["val_repeat/recall@5"] == pytest.approx(2 / 3)
    assert m["val_explore/recall@5"] == pytest.approx(1 / 3)
    assert m["val_repeat/mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 7) / 3)
    assert m["val/repeat_share@5"] == pytest.approx((1 + 0 + 5 + 0 + 2 + 1) / 5 / 6)
    assert m["val/repeat_share@20"] == pytest.approx((2 + 1 + 20 + 0 + 3 + 1) / 20 / 6)


def test_small_data_metrics_equal_their_recomputation():
    """Generated data through the datamodule: the flags equal the events' by definition, and
    the metrics equal those recomputed from the pass's per-event outputs."""
    from tests.helpers import small_dm

    dm = small_dm()
    steps = dm.eval_steps["test"]
    net = UserPopNet(dm.n_items, dm.item_counts)
    net.fit(dm.fit_steps)
    ks = (5, 10, 20)
    metrics, out, events = run_loop(net, steps, dm.n_items, "conservative", 8, 16, ks=ks)
    # the flags by definition, from the steps' own sessions (no one-event session here)
    have, last, ref = set(), None, {}
    for i in range(len(steps)):
        if steps.user[i] != last:
            have, last = set(), steps.user[i]
        have.add(int(steps.input[i]))
        ref[int(steps.event[i])] = int(steps.target[i]) in have
        have.add(int(steps.target[i]))
    assert out["repeat"].tolist() == [ref[e] for e in events]
    rep = out["repeat"]
    assert 0 < int(rep.sum()) < rep.numel()
    assert metrics["test_repeat/n_events"] + metrics["test_explore/n_events"] == rep.numel()
    for k in ks:
        hit = out["rank"] <= k
        assert metrics[f"test_repeat/recall@{k}"] == pytest.approx(hit[rep].double().mean())
        assert metrics[f"test_explore/recall@{k}"] == pytest.approx(hit[~rep].double().mean())
        rr = torch.where(hit, 1.0 / out["rank"].double(), 0.0)
        assert metrics[f"test_explore/mrr@{k}"] == pytest.approx(rr[~rep].mean())
        share = out["repeat_count"][:, ks.index(k)].double() / k
        assert metrics[f"test/repeat_share@{k}"] == pytest.approx(share.mean())
    # user_pop ranks the user's own items first: its top K is mostly theirs
    assert metrics["test/repeat_share@5"] > 0.5


# ------------------------------------------------------------------ a whole run
def test_run_reports_repeat_explore_everywhere(tmp_path):
    """results.json and the CSV log carry the names, for val and test (the repeat shares:
    the test's only); the counts add up; the metrics equal those recomputed from the test
    pass's per-event outputs."""
    cfg = compose_cfg(["model=user_pop", "logger=csv", "callbacks=none"], tmp_path)
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    ks = list(cfg.eval.ks)
    for stage in ("val", "test"):
        for k in ks:
            for group in ("repeat", "explore"):
                for m in ("recall", "mrr"):
                    assert f"{stage}_{group}/{m}@{k}" in saved
            if stage == "test":
                assert 0.0 <= saved[f"{stage}/repeat_share@{k}"] <= 1.0
            else:  # validation each epoch skips the costly shares
                assert f"{stage}/repeat_share@{k}" not in saved
        n = saved[f"{stage}_repeat/n_events"] + saved[f"{stage}_explore/n_events"]
        assert n == saved[f"{stage}/n_events"]
        assert saved[f"{stage}_repeat/n_events"] > 0 and saved[f"{stage}_explore/n_events"] > 0
    assert saved == pytest.approx(results)
    logged = {}
    for path in tmp_path.rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                logged.update({k: v for k, v in row.items() if v not in ("", None)})
    for key in ("test_repeat/recall@5", "test_explore/mrr@20", "test/repeat_share@10",
                "val_repeat/n_events", "val_explore/recall@5"):  # fmt: skip
        assert key in logged and float(logged[key]) == pytest.approx(saved[key]), key


def test_compare_reports_repeat_and_explore(tmp_path):
    """experiments/compare.py: the repeat/explore table where the runs have the metrics
    (mean over seeds), none for results from before them; the keys work as --metrics."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import compare

    for i, seed in enumerate((0, 1)):
        d = tmp_path / "sweep" / str(i)
        (d / ".hydra").mkdir(parents=True)
        res = {"data": "synthetic", "model": "user_pop", "seed": seed, "eval/ties": "conservative"}
        res |= {"test/recall@5": 0.2, "test/n_events": 100.0, "test_by_position/1/recall@5": 0.2}
        res |= {"test_repeat/recall@5": 0.3 + 0.1 * i, "test_explore/recall@5": 0.1}
        res |= {"test_repeat/n_events": 40.0, "test_explore/n_events": 60.0}
        res["test/repeat_share@5"] = 0.5
        (d / "results.json").write_text(json.dumps(res))
        (d / ".hydra" / "overrides.yaml").write_text(f"- model=user_pop\n- seed={seed}\n")
    metrics = ["test/recall@5", "test_repeat/recall@5", "test_explore/recall@5"]
    table = compare.compare([tmp_path / "sweep"], tmp_path / "out", metrics, 5, plots=False)
    assert "test_repeat/recall@5" in table and "0.3500 ± 0.0707" in table
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "## Repeat and explore targets" in md
    row = next(line for line in md.splitlines() if line.startswith("| user_pop"))
    assert row.split(" | ")[1:] == ["0.4000", "0.3500 ± 0.0707", "0.1000 ± 0.0000",
                                    "0.5000 ± 0.0000 |"]  # fmt: skip
    for d in (tmp_path / "sweep").iterdir():  # results from before the metrics: no table
        res = json.loads((d / "results.json").read_text())
        res = {k: v for k, v in res.items() if "repeat" not in k and "explore" not in k}
        (d / "results.json").write_text(json.dumps(res))
    compare.compare([tmp_path / "sweep"], tmp_path / "old", ["test/recall@5"], 5, plots=False)
    assert "Repeat and explore" not in (tmp_path / "old" / "comparison.md").read_text()


def test_progress_bar_keeps_the_overall_headline():
    from hrnn_lit.evaluation.evaluator import Evaluation

    ev = Evaluation([5, 20])
    metrics = {"val/recall@20": 0.3, "val/mrr@20": 0.1, "val_repeat/recall@20": 0.5,
               "val_explore/mrr@20": 0.05, "val/recall@5": 0.2}  # fmt: skip
    assert ev.headline(metrics) == {"val/recall@20": 0.3, "val/mrr@20": 0.1}


def test_repeat_share_can_be_left_out_of_the_test_pass(tmp_path):
    """eval.repeat_share=false: the same ranks and repeat/explore split, no shares."""
    base = ["model=session_rnn", "logger=none", "callbacks=none", "trainer.max_epochs=1"]
    on = run(compose_cfg(base, tmp_path / "on"))
    off = run(compose_cfg([*base, "eval.repeat_share=false"], tmp_path / "off"))
    assert "test/repeat_share@5" in on and not any("repeat_share" in k for k in off)
    for key in ("test/recall@20", "test/mrr@5", "test_repeat/recall@5", "test_explore/mrr@20",
                "test_repeat/n_events"):  # fmt: skip
        assert off[key] == on[key], key
