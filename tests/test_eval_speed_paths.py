"""The fast evaluation paths against plain references: blocked catalogue ranking
(hrnn_lit.evaluation.ranking) against the full score matrix and brute-force counts, the
evaluation loop's compacted replay (hrnn_lit.evaluation.loop) against the plain replay on
all rows, and the module's evaluation of the built-in networks against the plain replay +
score_all + target_ranks pipeline."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from hrnn_lit.data.batching import PlanDataset, build_plan, build_steps
from hrnn_lit.evaluation import ranking
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.loop import needed_rows
from hrnn_lit.evaluation.metrics import target_ranks
from hrnn_lit.evaluation.ranking import catalogue_ranks, linear_scores
from hrnn_lit.models.module import RecurrentRecommender
from tests.helpers import reference_eval, replay
from tests.test_metrics import brute_rank

TIES = ("conservative", "optimistic")


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weights(n_items, H, U=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_items, H, generator=g) * scale / H**0.5
    b = torch.randn(n_items, 1, generator=g) * 0.1
    u = torch.randn(n_items, U, generator=g) * 0.3 / max(U, 1) ** 0.5 if U else None
    return w, b, u


def full_reference(h, targets, w, b, ties, c=None, u=None, act="linear"):
    """Ranks from the whole [N, n_items] score matrix in one product."""
    return target_ranks(linear_scores(h, w, b, c, u, act), targets, ties)


# ------------------------------------------------------------------ blocked ranking
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("ties", TIES)
def test_blocked_ranks_equal_full_matrix_ranks(n_threads, ties):
    """Random float scores (no forced ties), every act, with and without a user term,
    row counts around the plain/blocked switch, several column-block widths."""
    H, U, n_items = 40, 12, 3001
    g = torch.Generator().manual_seed(1)
    with threads(n_threads):
        for act in ranking.ACTS:
            for user in (False, True):
                w, b, u = weights(n_items, H, U if user else 0, seed=2)
                for n_rows in (1, 7, 31, 32, 33, 130, 700):
                    h = torch.randn(n_rows, H, generator=g)
                    c = torch.randn(n_rows, U, generator=g) if user else None
                    tg = torch.randint(0, n_items, (n_rows,), generator=g)
                    ref = full_reference(h, tg, w, b, ties, c, u, act)
                    for cols, rows in ((None, 1024), (64, 1024), (1000, 100), (257, 40)):
                        got = catalogue_ranks(
                            h, tg, w, b, ties, c, u, act, max_rows=rows, block_cols=cols
                        )
                        assert torch.equal(got, ref), (act, user, n_rows, cols, rows)


def test_column_blocks_of_a_product_equal_the_full_product():
    """The property the blocked path rests on (BLAS kernels compute each element from its
    row and column in a fixed order): true on this build for >= MIN_ROWS rows."""
    g = torch.Generator().manual_seed(3)
    for H in (8, 100, 300):
        w, b, _ = weights(5000, H, seed=H)
        for n_threads in (1, 2):
            with threads(n_threads):
                for n_rows in (ranking.MIN_ROWS, 100, 419, 1024):
                    h = torch.randn(n_rows, H, generator=g)
                    full = torch.addmm(b.T, h, w.T)
                    for lo, hi in ((0, 32), (5, 1000), (1000, 3500), (4000, 5000)):
                        part = torch.addmm(b[lo:hi].T, h, w[lo:hi].T)
                        assert torch.equal(part, full[:, lo:hi]), (H, n_threads, n_rows)


@pytest.mark.parametrize("ties", TIES)
def test_blocked_ranks_with_exact_ties_match_brute_force(ties):
    """Small-integer weights: every score is an exact integer, so ties are many and exact
    in any summation order; ranks are counted by hand."""
    g = torch.Generator().manual_seed(4)
    n_items, H, n_rows = 97, 6, 80
    w = torch.randint(-2, 3, (n_items, H), generator=g).float()
    b = torch.randint(-1, 2, (n_items, 1), generator=g).float()
    h = torch.randint(-2, 3, (n_rows, H), generator=g).float()
    tg = torch.randint(0, n_items, (n_rows,), generator=g)
    s = h @ w.T + b.T
    expected = [brute_rank(s[i].tolist(), int(tg[i]), ties) for i in range(n_rows)]
    for cols in (None, 32, 50):
        assert catalogue_ranks(h, tg, w, b, ties, block_cols=cols).tolist() == expected


@pytest.mark.parametrize("ties", TIES)
def test_saturated_tanh_ties(ties):
    """tanh of large scores is exactly +-1 for many items: conservative and optimistic
    ranks differ, and both match the full matrix."""
    w, b, _ = weights(2000, 16, seed=5, scale=400.0)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(200, 16, generator=g)
    tg = torch.randint(0, 2000, (200,), generator=g)
    got = catalogue_ranks(h, tg, w, b, ties, act="tanh", block_cols=300)
    assert torch.equal(got, full_reference(h, tg, w, b, ties, act="tanh"))
    cons = catalogue_ranks(h, tg, w, b, "conservative", act="tanh", block_cols=300)
    opt = catalogue_ranks(h, tg, w, b, "optimistic", act="tanh", block_cols=300)
    assert (cons > opt + 100).float().mean() > 0.3  # saturation makes ties common


@pytest.mark.parametrize("ties", TIES)
def test_non_finite_scores(ties):
    """A NaN/inf target score ranks n_items + 1; NaN scores of other items never count as
    higher, +inf ones always do, -inf ones never."""
    n_items, H = 500, 10
    w, b, _ = weights(n_items, H, seed=7)
    w[3] = float("nan")  # every row's score of item 3 is NaN
    b[4] = float("inf")
    b[5] = float("-inf")
    g = torch.Generator().manual_seed(8)
    h = torch.randn(64, H, generator=g)
    tg = torch.randint(6, n_items, (64,), generator=g)
    tg[:3] = torch.tensor([3, 4, 5])
    got = catalogue_ranks(h, tg, w, b, ties, block_cols=64)
    assert torch.equal(got, full_reference(h, tg, w, b, ties))
    assert got[:3].tolist() == [n_items + 1] * 3
    s = h @ w.T + b.T
    for i in range(3, 64):
        assert got[i] == brute_rank(s[i].tolist(), int(tg[i]), ties)


def test_target_score_off_its_block_falls_back_to_the_plain_path(monkeypatch):
    """If the target scores used for counting ever differed from the values the column
    blocks produced, the row block is recomputed by the plain path (same ranks)."""
    w, b, _ = weights(800, 12, seed=9)
    g = torch.Generator().manual_seed(10)
    h = torch.randn(100, 12, generator=g)
    tg = torch.randint(0, 800, (100,), generator=g)
    calls = []
    real = ranking._target_scores

    def off_by_one_ulp(*args):
        calls.append(1)
        return torch.nextafter(real(*args), torch.tensor(float("inf")))

    monkeypatch.setattr(ranking, "_target_scores", off_by_one_ulp)
    for ties in TIES:
        got = catalogue_ranks(h, tg, w, b, ties, block_cols=100)
        assert torch.equal(got, full_reference(h, tg, w, b, ties))
    assert calls


def capped(ranks, cap, n_items):
    """The full-matrix ranks with those above cap as cap + 1 (n_items + 1 kept)."""
    return torch.where((ranks > cap) & (ranks <= n_items), cap + 1, ranks)


@pytest.mark.parametrize("ties", TIES)
def test_capped_ranks_equal_capped_full_matrix_ranks(ties):
    """rank_cap: exact ranks up to the cap, cap + 1 above it, for every act, with and
    without a user term, caps from 1 to beyond the catalogue, rows around MIN_ROWS."""
    H, U, n_items = 24, 8, 2501
    g = torch.Generator().manual_seed(11)
    for act in ranking.ACTS:
        for user in (False, True):
            w, b, u = weights(n_items, H, U if user else 0, seed=12)
            for n_rows in (33, 90, 400):
                h = torch.randn(n_rows, H, generator=g)
                c = torch.randn(n_rows, U, generator=g) if user else None
                tg = torch.randint(0, n_items, (n_rows,), generator=g)
                ref = full_reference(h, tg, w, b, ties, c, u, act)
                for cap in (1, 5, 20, 300, n_items + 5):
                    for cols in (None, 64, 700):
                        got = catalogue_ranks(
                            h, tg, w, b, ties, c, u, act, block_cols=cols, rank_cap=cap
                        )
                        expected = capped(ref, cap, n_items)
                        assert torch.equal(got, expected), (act, user, n_rows, cap, cols)


def test_capped_ranking_scores_fewer_items(monkeypatch):
    """Rows leave the product once their count passes the cap: far fewer scores are
    computed than n_rows x n_items, and every row still gets its (capped) rank."""
    n_items, H, n_rows = 4000, 16, 256
    w, b, _ = weights(n_items, H, seed=13)
    g = torch.Generator().manual_seed(14)
    h = torch.randn(n_rows, H, generator=g)
    tg = torch.randint(0, n_items, (n_rows,), generator=g)
    tg[:40] = (h[:40] @ w.T + b.T).argmax(1)  # hits
    scored = []
    real = ranking._act

    def counting(s, act, inplace):
        scored.append(s.numel())
        return real(s, act, inplace)

    monkeypatch.setattr(ranking, "_act", counting)
    got = catalogue_ranks(h, tg, w, b, block_cols=200, rank_cap=10)
    assert sum(scored) < 0.25 * n_rows * n_items
    ref = full_reference(h, tg, w, b, "conservative")
    assert torch.equal(got, capped(ref, 10, n_items))
    assert int((got <= 10).sum()) >= 40 and int((got == 11).sum()) > n_rows // 2


@pytest.mark.parametrize("ties", TIES)
def test_capped_ranks_with_exact_ties_and_non_finite_scores(ties):
    """Exact integer ties counted by hand, and NaN/inf targets (n_items + 1), under a cap."""
    g = torch.Generator().manual_seed(15)
    n_items, H, n_rows = 300, 6, 120
    w = torch.randint(-2, 3, (n_items, H), generator=g).float()
    b = torch.randint(-1, 2, (n_items, 1), generator=g).float()
    w[3] = float("nan")
    b[4] = float("inf")
    b[5] = float("-inf")
    h = torch.randint(-2, 3, (n_rows, H), generator=g).float()
    tg = torch.randint(6, n_items, (n_rows,), generator=g)
    tg[:3] = torch.tensor([3, 4, 5])
    s = h @ w.T + b.T
    for cap in (3, 40):
        got = catalogue_ranks(h, tg, w, b, ties, block_cols=40, rank_cap=cap)
        assert got[:3].tolist() == [n_items + 1] * 3
        for i in range(3, n_rows):
            expected = brute_rank(s[i].tolist(), int(tg[i]), ties)
            assert got[i] == (expected if expected <= cap else cap + 1), (cap, i)


def test_rank_collector_add_equals_add_ranks():
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 5, (40, 30), generator=g).float()
    tg = torch.randint(0, 30, (40,), generator=g)
    pos, hist = torch.arange(40), torch.arange(40) % 3
    for ties in TIES:
        a, b = RankCollector(ties), RankCollector(ties)
        a.add(scores, tg, pos, hist)
        b.add_ranks(target_ranks(scores, tg, ties), pos, hist, 30)
        ma, oa = a.finish("test", [5])
        mb, ob = b.finish("test", [5])
        assert ma == mb and all(torch.equal(oa[k], ob[k]) for k in oa)


# ------------------------------------------------------- the loop on the built-in networks
VARIANTS = {
    "session_rnn": dict(user_propagation="none", user_hidden_size=0),
    "rnn_concat": dict(user_propagation="none", user_hidden_size=0, reset_at="user"),
    "hrnn_init": dict(user_propagation="init"),
    "hrnn_all_to_output_tanh": dict(user_propagation="all", user_to_output=True, final_act="tanh"),
}


def eval_chunks(n_users=150, n_items=300, batch_size=128, steps_per_batch=8, seed=0):
    """Chunks of an eval plan: users with 1-6 sessions of 1-7 events; the last session
    of each user is scored, and a few scattered events of earlier sessions too (so scored
    sessions can hold unscored steps). Short chunks make sessions span chunk borders."""
    rng = np.random.default_rng(seed)
    item, user, ses, score = [], [], [], []
    n_ses = 0
    for u in range(n_users):
        k = int(rng.integers(1, 7))
        for s in range(k):
            length = int(rng.integers(1, 8))
            item += rng.integers(0, n_items, length).tolist()
            user += [u] * length
            ses += [n_ses] * length
            score += [s == k - 1 or bool(rng.random() < 0.05) for _ in range(length)]
            n_ses += 1
    steps = build_steps(np.array(item), np.array(user), np.array(ses), np.array(score))
    plan = build_plan(steps.user, batch_size)
    data = PlanDataset(steps, plan, steps_per_batch)
    return [data[i] for i in range(len(data))]


def make_model(variant: str, n_items=300, H=32, **kw) -> RecurrentRecommender:
    torch.manual_seed(0)
    args = dict(n_items=n_items, hidden_size=H, user_hidden_size=24)
    m = RecurrentRecommender(**{**args, **VARIANTS[variant], **kw}).eval()
    with torch.no_grad():
        m.net.out_b.weight.normal_(0, 0.1)
        if m.net.user_to_output:
            m.net.out_u.weight.normal_(0, 0.2)
        if variant.endswith("tanh"):
            m.net.out_w.weight.mul_(200.0)  # saturated: many exact ties
    return m


def module_eval(m: RecurrentRecommender, chunks, ties: str) -> dict:
    """The module's test hooks over the chunks, with ranks uncapped."""
    m.on_test_epoch_start()
    m.evaluation.collector = collector = RankCollector(ties)
    m.eval_loop.collector = collector
    with torch.inference_mode():
        for i, batch in enumerate(chunks):
            m.test_step(batch, i)
    return collector.finish("test", [5])[1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loop_states_equal_the_plain_replay_on_scored_rows(variant):
    """The states the loop ranks (compacted rows, starts on the starting rows only) are bit
    for bit those of the plain replay on all rows, also for B not a multiple of 64."""
    m = make_model(variant)
    seen = []
    factors = m.net.score_factors
    m.net.score_factors = lambda state: seen.append(state) or factors(state)
    for n_threads in (1, 2):
        with threads(n_threads):
            for B, T in ((128, 8), (64, 5), (50, 8)):
                chunks = eval_chunks(batch_size=B, steps_per_batch=T)
                seen.clear()
                module_eval(m, chunks, "conservative")
                expected, state = [], None
                with torch.no_grad():
                    for batch in chunks:
                        states, state = replay(m.net, batch, state)
                        for t, (h, c) in enumerate(states):
                            expected.append((h[batch.score[t]], c[batch.score[t]]))
                h_ref, c_ref = (torch.cat(x) for x in zip(*expected))
                h_got, c_got = (torch.cat(x) for x in zip(*seen))
                assert torch.equal(h_got, h_ref) and torch.equal(c_got, c_ref), (B, n_threads)


def test_session_only_replay_skips_unscored_sessions():
    chunks = eval_chunks()
    need = np.concatenate([needed_rows(b, session_only=True) for b in chunks])
    valid = np.concatenate([b.valid.numpy() for b in chunks])
    scored = np.concatenate([b.score.numpy() for b in chunks])
    assert (need <= valid).all() and (need >= scored).all()
    assert need.sum() < 0.7 * valid.sum()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_module_evaluation_equals_plain_pipeline(variant, monkeypatch):
    """Ranks, positions and histories of the whole pass, both tie modes, 1 and 2 threads;
    small column blocks and row blocks so that every path is taken."""
    monkeypatch.setattr(ranking, "BLOCK_BYTES", 16 << 10)
    m = make_model(variant, eval_block=100)
    chunks = eval_chunks()
    assert any(0 < b.n_scored < ranking.MIN_ROWS for b in chunks)
    assert any(b.n_scored > 100 for b in chunks)
    for n_threads in (1, 2):
        with threads(n_threads):
            for ties in TIES:
                ref = reference_eval(m.net, chunks, ties)
                got = module_eval(m, chunks, ties)
                assert ref.keys() == got.keys()
                for k in ref:
                    assert torch.equal(ref[k], got[k]), (variant, n_threads, ties, k)
