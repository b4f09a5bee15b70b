"""Non-neural baselines: scores against brute-force references, ranks and metrics equal
to those recorded before they became networks of the model API (tests/data), and each
config end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hrnn_lit.baselines.knn import ItemKNNNet, VSKNNNet
from hrnn_lit.baselines.module import Pop
from hrnn_lit.baselines.popularity import PopNet, UserPopNet, session_events
from hrnn_lit.data.batching import PlanDataset, build_plan
from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.loop import EvalLoop
from hrnn_lit.nets import api
from hrnn_lit.run import run
from tests.conftest import compose_cfg
from tests.helpers import replay, steps_for

BEFORE = json.loads((Path(__file__).parent / "data" / "baselines_before.json").read_text())
NETS = {"Pop": PopNet, "UserPop": UserPopNet, "ItemKNN": ItemKNNNet, "VSKNN": VSKNNNet}

N_ITEMS = 12
# users -> sessions -> items (fit split)
TRAIN = [
    [[0, 1, 2], [2, 3, 4, 1]],
    [[1, 2, 5], [5, 6], [0, 2, 7, 8]],
    [[3, 4, 9], [9, 10, 11, 4, 2]],
    [[6, 7], [7, 8, 0], [11, 10]],
    [[2, 1, 0, 3], [4, 5, 6, 7, 8]],
]
# evaluated users: earlier sessions then the held-out one; every step is scored here, so
# the history replay itself is checked too. Item 2 repeats within a session on purpose.
EVAL = [
    [[1, 2], [3, 4, 5], [2, 0, 2, 7]],
    [[9, 10], [11, 4]],
    [[0, 1, 2, 3, 4, 5], [6, 7]],
    [[8, 0], [1, 2, 1], [10, 11, 9]],
    [[5, 6, 7]],
]


def to_steps(users: list[list[list[int]]]):
    return steps_for(users)


def step_contexts(users):
    """(user, session index, position) of each step, in the Steps' order."""
    return [
        (u, j, p)
        for u, sessions in enumerate(users)
        for j, s in enumerate(sessions)
        for p in range(1, len(s))
    ]


def plan_chunks(users, batch_size=2, steps_per_batch=3):
    steps = to_steps(users)
    plan = build_plan(steps.user, batch_size)
    data = PlanDataset(steps, plan, steps_per_batch)
    return plan, [data[i] for i in range(len(data))]


def model_scores(net, users, batch_size=2, steps_per_batch=3) -> dict[int, np.ndarray]:
    """Scores per step index, from the plain replay of the network over the user-parallel
    plan (two slots: later users take over a slot; chunks of 3 steps: state crosses
    chunks)."""
    plan, chunks = plan_chunks(users, batch_size, steps_per_batch)
    out, state = {}, None
    for i, batch in enumerate(chunks):
        states, state = replay(net, batch, state)
        for t, st in enumerate(states):
            rows = batch.score[t].nonzero().view(-1)
            for r, sc in zip(rows.tolist(), net.score(tuple(x[rows] for x in st)).numpy()):
                out[int(plan[i * steps_per_batch + t, r])] = sc
    assert sorted(out) == list(range(len(to_steps(users))))
    return out


def train_pop() -> np.ndarray:
    return np.bincount([i for u in TRAIN for s in u for i in s], minlength=N_ITEMS).astype(float)


def fallback(pop: np.ndarray) -> np.ndarray:
    return pop / (pop.max() + 1) - 1


def fitted(net):
    net.fit(to_steps(TRAIN))
    return net


# ------------------------------------------------------------------ helpers and POP
def test_session_events_rebuilds_the_sessions():
    ptr, items, ses_user = session_events(to_steps(TRAIN))
    sessions = [items[ptr[s] : ptr[s + 1]].tolist() for s in range(ptr.size - 1)]
    assert sessions == [s for u in TRAIN for s in u]
    assert ses_user.tolist() == [u for u, ss in enumerate(TRAIN) for _ in ss]


def test_pop_ranks_by_training_count():
    model = fitted(PopNet(N_ITEMS))
    for scores in model_scores(model, EVAL).values():
        np.testing.assert_array_equal(scores, train_pop())


# ------------------------------------------------------------------------- user POP
def test_user_pop_counts_replayed_history_and_resets_per_user():
    model = fitted(UserPopNet(N_ITEMS))
    pop = train_pop()
    got = model_scores(model, EVAL)
    for idx, (u, j, p) in enumerate(step_contexts(EVAL)):
        seen = [i for s in EVAL[u][:j] for i in s] + EVAL[u][j][:p]
        expect = np.bincount(seen, minlength=N_ITEMS) + pop / (pop.max() + 1)
        np.testing.assert_array_equal(got[idx], expect, err_msg=f"step {idx} {u, j, p}")
    # user 2 runs in a slot after user 0 finished (two slots): nothing of user 0 leaks
    steps = to_steps(EVAL)
    plan = build_plan(steps.user, 2)
    slot_users = [steps.user[c[c >= 0]] for c in plan.T]
    assert any(np.unique(u).size > 1 for u in slot_users)


# ------------------------------------------------------------------------- Item-KNN
def ref_cosine() -> dict[tuple[int, int], float]:
    sessions = [set(s) for u in TRAIN for s in u]
    occ = {i: {n for n, s in enumerate(sessions) if i in s} for i in range(N_ITEMS)}
    return {
        (a, b): len(occ[a] & occ[b]) / math.sqrt(len(occ[a]) * len(occ[b]))
        for a in range(N_ITEMS)
        for b in range(N_ITEMS)
        if a != b and occ[a] & occ[b]
    }


@pytest.mark.parametrize("k,pop_fallback", [(100, True), (2, True), (3, False)])
def test_item_knn_matches_cosine_on_session_sets(k, pop_fallback):
    model = fitted(ItemKNNNet(N_ITEMS, k_neighbors=k, pop_fallback=pop_fallback))
    sim = ref_cosine()
    counts = np.diff(model.nbr_ptr.numpy())
    assert counts.max() <= k  # sparse: at most k neighbours per item
    got = model_scores(model, EVAL)
    for idx, (u, j, p) in enumerate(step_contexts(EVAL)):
        x = EVAL[u][j][p - 1]
        nbrs = sorted((b for (a, b) in sim if a == x), key=lambda b: (-sim[x, b], b))[:k]
        expect = fallback(train_pop()) if pop_fallback else np.zeros(N_ITEMS)
        for b in nbrs:
            expect[b] = sim[x, b]
        np.testing.assert_allclose(got[idx], expect, rtol=1e-12, err_msg=f"step {idx}")


# --------------------------------------------------------------------------- V-SkNN
WEIGHT = {
    "same": lambda p, n: 1.0,
    "div": lambda p, n: p / n,
    "quadratic": lambda p, n: (p / n) ** 2,
}
DECAY = {"same": lambda d: 1.0, "div": lambda d: 1 / d, "quadratic": lambda d: 1 / d**2}


def ref_vsknn(model: VSKNNNet, users, u: int, j: int, p: int) -> np.ndarray:
    """Direct loop over training sessions, as session-rec's VMContextKNN scores one event."""
    train = [set(s) for us in TRAIN for s in us]
    items = users[u][j][:p]
    if model.extend_length > len(items):
        history = [i for s in users[u][:j] for i in s]
        need = model.extend_length - len(items)
        items = history[max(0, len(history) - need) :] + items
    n = len(items)
    pos_w = {}
    for c, item in enumerate(items, 1):
        pos_w[item] = WEIGHT[model.weighting](c, n)  # a repeat keeps its last weight
    candidates = [s for s, ses in enumerate(train) if ses & set(items)]
    if model.sample_size:
        prio = model.priority.numpy()
        candidates = sorted(candidates, key=lambda s: -prio[s])[: model.sample_size]
    sims = {
        s: sum(pos_w[i] for i in sorted(train[s] & set(items))) / len(pos_w) for s in candidates
    }
    neighbours = sorted(candidates, key=lambda s: (-sims[s], s))[: model.k]
    votes = np.zeros(N_ITEMS)
    for s in neighbours:
        d = next(step for step, i in enumerate(reversed(items), 1) if i in train[s])
        for i in train[s]:
            votes[i] += sims[s] * DECAY[model.weighting_score](d)
    base = fallback(train_pop()) if model.pop_fallback else np.zeros(N_ITEMS)
    return np.where(votes > 0, votes, base)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"k": 2},
        {"k": 3, "extend_length": 4},
        {"k": 4, "sample_size": 3, "extend_length": 2, "weighting": "quadratic"},
        {"weighting": "same", "weighting_score": "quadratic", "pop_fallback": False},
        {"k": 2, "extend_length": 20, "weighting_score": "same"},  # prefix > whole history
    ],
)
def test_vsknn_matches_direct_loop(params):
    model = fitted(VSKNNNet(N_ITEMS, **params))
    got = model_scores(model, EVAL)
    for idx, (u, j, p) in enumerate(step_contexts(EVAL)):
        expect = ref_vsknn(model, EVAL, u, j, p)
        np.testing.assert_allclose(got[idx], expect, rtol=1e-12, err_msg=f"step {idx} {u, j, p}")


def test_vsknn_buffer_grows_for_long_sessions():
    long_user = [[list(range(N_ITEMS)) * 3]]  # one 36-event session: buffer starts at 16
    model = fitted(VSKNNNet(N_ITEMS, k=3))
    got = model_scores(model, long_user, batch_size=1, steps_per_batch=5)
    for idx, (u, j, p) in enumerate(step_contexts(long_user)):
        np.testing.assert_allclose(got[idx], ref_vsknn(model, long_user, u, j, p), rtol=1e-12)


def test_vsknn_recent_sampling_uses_session_times():
    steps = to_steps(TRAIN)
    model = VSKNNNet(N_ITEMS, sample_size=2, sampling="recent")
    with pytest.raises(ConfigError, match="model.sampling"):
        model.fit(steps)
    step_time = np.arange(len(steps), dtype=float)[::-1]  # earlier sessions are newer
    model.fit(steps, step_time=step_time)
    n_ses = int(steps.session_start.sum())
    assert model.priority.argsort(descending=True).tolist() == list(range(n_ses))


@pytest.mark.parametrize(
    "cls,kw,key",
    [(ItemKNNNet, {"k_neighbors": 0}, "k_neighbors"), (VSKNNNet, {"weighting": "x"}, "weighting")],
)
def test_bad_params_name_the_key(cls, kw, key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        cls(N_ITEMS, **kw)


# ------------------------------------------------------- ranks as before, through the loop
@pytest.mark.parametrize("case", BEFORE["ranks"], ids=lambda c: f"{c['model']}{c['params']}")
def test_loop_ranks_equal_the_ranks_recorded_before(case):
    """Every baseline configuration, both tie rules, four plan shapes: the evaluation
    loop's ranks (sparse scores, compacted rows) equal the per-step dense ranks the
    baselines' own loop gave before they became networks, and so does the plain replay with
    dense scores."""
    net = fitted(NETS[case["model"]](N_ITEMS, **case["params"]))
    B, T = case["batch_size"], case["steps_per_batch"]
    plan, chunks = plan_chunks(EVAL, B, T)
    scored = [(i, t, r) for i, c in enumerate(chunks) for t, r in c.score.nonzero().tolist()]
    order = [int(plan[i * T + t, r]) for i, t, r in scored]
    expected = [case["ranks"][j] for j in order]
    for fast in (True, False):
        collector = RankCollector(case["ties"])
        loop = EvalLoop(N_ITEMS, eval_block=4, fast=fast)  # small row blocks
        loop.begin(net, collector)
        for batch in chunks:
            loop.chunk(batch)
        assert collector.finish("test", [5])[1]["rank"].tolist() == expected, fast


def test_user_pop_and_vsknn_grow_their_state_on_compacted_rows(monkeypatch):
    """A long history and a long session make the slot buffers double while only some
    slots step (the others are empty): the loop widens the rest and the ranks stay those of
    the plain replay."""
    n = 60
    users = [[[(7 * u + i) % n, (u + 3 * i) % n, (5 * i + u) % n] for i in range(4)]
             for u in range(9)]  # fmt: skip
    users[0] += [list(range(n)) * 3, [1, 2, 3]]  # the others finish first
    widened, real = [], api.widen
    monkeypatch.setattr(api, "widen", lambda *a: widened.append(a) or real(*a))
    for net in (UserPopNet(n), VSKNNNet(n, k=3, extend_length=20)):
        net.fit(to_steps(TRAIN))
        plan, chunks = plan_chunks(users, 4, 5)
        collector = RankCollector()
        loop = EvalLoop(n)
        loop.begin(net, collector)
        widened.clear()
        for batch in chunks:
            loop.chunk(batch)
        assert widened and loop.state[0].shape[1] > 16  # grew while slots were empty
        got = collector.finish("test", [5])[1]["rank"].tolist()
        dense = model_scores(net, users, 4, 5)
        steps = to_steps(users)
        scored = [(i, t, r) for i, c in enumerate(chunks) for t, r in c.score.nonzero().tolist()]
        order = [int(plan[i * 5 + t, r]) for i, t, r in scored]
        assert got == [int((dense[j] >= dense[j][steps.target[j]]).sum()) for j in order]


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["pop", "user_pop", "item_knn", "vsknn"])
def test_baseline_runs_end_to_end(name, tmp_path):
    cfg = compose_cfg([f"model={name}", "logger=none", "callbacks=none"], tmp_path)
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == pytest.approx(results)
    assert saved["model"] == name and saved["test/n_events"] > 0
    for stage in ("val", "test"):
        for k in (5, 10, 20):
            for m in ("recall", "mrr", "ndcg"):
                assert 0.0 <= saved[f"{stage}/{m}@{k}"] <= 1.0
    assert saved["test/recall@5"] <= saved["test/recall@10"] <= saved["test/recall@20"]
    assert saved["test/mrr@20"] <= saved["test/ndcg@20"] <= saved["test/recall@20"]
    assert saved["perf/eval_events_per_s"] > 0
    before = BEFORE["e2e"][name]  # the metrics before the baselines became networks
    assert {k: saved[k] for k in before} == before


def test_pop_counts_equal_the_datamodule_counts(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["model=pop"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = Pop(dm.n_items)
    model.fit_data(dm.fit_steps)
    assert torch.equal(model.net.pop, torch.as_tensor(dm.item_counts, dtype=torch.float64))
