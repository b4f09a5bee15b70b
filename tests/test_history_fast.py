"""hrnn_history's fast forms against brute-force dense references in float64: the scores
of distinct candidates (``score_distinct``) and their loss (``distinct_ranking_loss``), and
the evaluation's ranking through the scores' lower bound (``score_bound``,
``ranking.bound_misses``, the loop's bound path)."""

from __future__ import annotations

import copy

import pytest
import torch

from hrnn_lit.evaluation.metrics import target_ranks
from hrnn_lit.evaluation.ranking import bound_misses
from hrnn_lit.nets.api import Starts
from hrnn_lit.nets.history import HistoryHRNN
from hrnn_lit.ops.candidates import step_candidates
from hrnn_lit.ops.sampled_loss import distinct_ranking_loss, ranking_loss
from tests.helpers import loop_eval, reference_eval
from tests.test_eval_speed_paths import eval_chunks, threads

N_ITEMS = 300
# the second version's options (the explore part's recipe, the repeat part's features)
OPTIONS = [
    {},
    {"constrained_embedding": True, "final_act": "tanh", "event_decay": 0.7},
    {"embedding": 5, "user_features": True, "item_bias": True, "mode_bias": 1.0},
]


def _starts(session, user) -> Starts:
    s, u = torch.tensor(session), torch.tensor(user)
    return Starts(s, u, (s & ~u).nonzero().view(-1))


def _net(n_items=40, seed=0, **kw) -> HistoryHRNN:
    torch.manual_seed(seed)
    net = HistoryHRNN(n_items=n_items, hidden_size=6, user_hidden_size=5, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def _state(net: HistoryHRNN, dtype=torch.float32):
    """Four slots: two with history (item 2 listed in both), one new user with nothing
    listed (a slot reset after history: stale entries past n_listed), one after a wrap
    of a small memory or not."""
    state = tuple(
        x.to(dtype) if x.is_floating_point() else x
        for x in net.initial_state(4, torch.device("cpu"))
    )
    state = net.step(torch.tensor([1, 2, 3, 4]), net.start(state, _starts([True] * 4, [True] * 4)))
    state = net.step(torch.tensor([2, 5, 3, 7]), state)
    state = net.start(state, _starts([True, True, True, False], [False, True, False, False]))
    state = net.step(torch.tensor([1, 6, 8, 4]), state)
    state = net.start(state, _starts([False, True, False, False], [False, True, False, False]))
    return state


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("repeat", [True, False])
def test_distinct_scores_spread_to_the_candidate_scores(repeat, options):
    """score_distinct on the distinct candidates, spread by ``inverse``, equals the plain
    float64 mixture over the N columns (a column repeated k times weighs k in the explore
    softmax), with listed and unlisted, valid and repeated candidates; so does ``score``;
    with each option set."""
    net = _net(repeat=repeat, memory=3, **options)
    ref = copy.deepcopy(net).double()
    cand = torch.tensor([2, 9, 3, 4, 1, 2, 11, 9, 9, 6])
    uniq, inverse = torch.unique(cand, return_inverse=True)
    with torch.no_grad():
        got = net.score_distinct(_state(net), uniq, inverse).index_select(1, inverse)
        via_score = net.score(_state(net), cand)
        st = _state(ref, torch.float64)
        h, c, listed, feats, n_listed, _ = st
        s = ref.rnn.score((h, c), cand)
        explore = torch.log_softmax(s, 1)  # over the N columns, repeats included
        want = explore.clone()
        if repeat:
            log_rep, log_w, filled = ref._repeat_part(st)
            want = explore + log_w
            for b in range(4):
                for k in range(ref.memory):
                    if filled[b, k]:
                        on = cand == listed[b, k]
                        want[b, on] = torch.logaddexp(log_rep[b, k], want[b, on])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_score, got)


@pytest.mark.parametrize("loss", ["cross-entropy", "top1"])
@pytest.mark.parametrize("logq", [False, True])
def test_distinct_ranking_loss_equals_the_loss_of_the_full_matrix(loss, logq):
    """Loss and score gradients of ``distinct_ranking_loss`` on [B, M] equal
    ``ranking_loss`` on the [B, N] matrix the columns spread to, in float64, with an empty
    slot whose target also occurs as a valid column."""
    torch.manual_seed(0)
    B = 5
    ids = torch.tensor([3, 7, 3, 1, 9, 7, 7, 2, 9, 3, 5])  # B targets, then samples
    valid = torch.tensor([True, True, True, False, True])
    cand = step_candidates(ids, valid, 12)
    scores = torch.randn(B, cand.uniq.numel(), dtype=torch.float64, requires_grad=True)
    bias = torch.rand(ids.numel(), dtype=torch.float64) if logq else None
    got = distinct_ranking_loss(scores, cand, valid, loss, 1.0, bias)
    (g_got,) = torch.autograd.grad(got, scores)
    full = scores.index_select(1, cand.inverse)
    want = ranking_loss(full - bias if logq else full, valid, loss)
    (g_want,) = torch.autograd.grad(want, scores)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_bound_misses_only_targets_ranked_above_the_cap():
    """``bound_misses`` on integer scores (exact in float32, many ties) against float64
    brute force: a target is reported exactly when more than the cap items score >= it on
    the linear form and it is not one of its row's entries; the dense scores (a monotone
    function of the linear form, raised on the entries) rank every reported target above
    the cap, under both tie rules."""
    g = torch.Generator().manual_seed(0)
    n_rows, n_items, cap = 70, 200, 6
    h = torch.randint(-3, 4, (n_rows, 4), generator=g).float()
    w = torch.randint(-3, 4, (n_items, 4), generator=g).float()
    b = torch.randint(-2, 3, (n_items, 1), generator=g).float()
    targets = torch.randint(0, n_items, (n_rows,), generator=g)
    rows = torch.arange(n_rows).repeat_interleave(3)  # three entries per row ...
    items = torch.randint(0, n_items, (rows.numel(),), generator=g)
    items[::6] = targets[rows[::6]]  # ... a row's target among them every other row
    items[1::3][items[1::3] == items[::3]] += 1  # (an item at most once per row)
    missed = bound_misses(h, targets, w, b, rows, items, cap, max_rows=32)
    lin = h.double() @ w.double().T + b.double().T  # exact
    listed = torch.zeros(n_rows, n_items, dtype=torch.bool)
    listed[rows, items] = True
    over = (lin >= lin.gather(1, targets[:, None])).sum(1) > cap
    own = listed.gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(missed, over & ~own)
    assert 0 < int(missed.sum()) < n_rows and bool((over & own).any())
    dense = torch.log_softmax(lin, 1) - 0.7  # a monotone function per row ...
    dense[listed] = torch.logaddexp(dense[listed], torch.tensor(-1.0, dtype=torch.float64))
    for ties in ("conservative", "optimistic"):
        ranks = target_ranks(dense, targets, ties)
        assert bool((ranks[missed] > cap).all()), ties


def _loop_vs_reference(net, rank_cap, B, n_threads, ties, shares=False):
    chunks = eval_chunks(n_items=N_ITEMS, batch_size=B, steps_per_batch=8)
    scored = []
    score = net.score
    net.score = lambda state, items=None: scored.append(state[0].shape[0]) or score(state, items)
    with threads(n_threads):
        ref = reference_eval(net, chunks, ties, rank_cap=rank_cap)
        n_ref = sum(scored)
        scored.clear()
        got = loop_eval(net, chunks, N_ITEMS, ties, rank_cap=rank_cap, eval_block=40,
                        shares=shares)  # fmt: skip
    assert set(got) == set(ref) - (set() if shares else {"repeat_count"})
    for k in got:
        assert torch.equal(ref[k], got[k]), (B, n_threads, ties, k)
    return sum(scored), n_ref, ref


@pytest.mark.parametrize(
    "repeat, options", [(True, OPTIONS[0]), (False, OPTIONS[0]), *((True, o) for o in OPTIONS[1:])]
)
def test_the_bound_path_equals_the_plain_reference_replay(repeat, options):
    """With a rank cap and conservative ties, and without the repeat shares (validation),
    the loop ranks most targets from the bound (fewer rows scored densely) and its ranks
    equal the plain reference's; slots a multiple of 64 and not, 1 and 2 threads;
    optimistic ties take the dense path; with each option set (a tied or separate input
    embedding leaves the scores' linear form as it is; tanh is monotone)."""
    torch.manual_seed(0)
    net = HistoryHRNN(N_ITEMS, hidden_size=16, user_hidden_size=12, repeat=repeat,
                      **options).eval()  # fmt: skip
    with torch.no_grad():
        net.mode.bias.fill_(2.0)  # many repeats ranked high
        net.rnn.out_w.weight.mul_(20.0)  # a spread of explore scores
        if options.get("item_bias"):
            net.item_repeat.weight.normal_()
    for B in (128, 50):
        for n_threads in (1, 2):
            dense_rows, all_rows, ref = _loop_vs_reference(net, 5, B, n_threads, "conservative")
            assert dense_rows < all_rows / 2, (dense_rows, all_rows)
            assert bool((ref["rank"] <= 5).any()) and bool((ref["rank"] == 6).any())
    dense_rows, all_rows, _ = _loop_vs_reference(net, 5, 128, 1, "optimistic")
    assert dense_rows == all_rows
    dense_rows, all_rows, _ = _loop_vs_reference(net, None, 128, 1, "conservative")
    assert dense_rows == all_rows  # no cap: every target's rank, densely
    dense_rows, all_rows, _ = _loop_vs_reference(net, 5, 128, 1, "conservative", shares=True)
    assert dense_rows == all_rows  # the test pass's repeat shares need every row's top K
