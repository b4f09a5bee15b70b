"""The evaluation loop (hrnn_lit.evaluation.loop) on networks of the model API other than
the built-in one: its ranks equal the plain reference replay's (every slot, every event,
the network's scores over the whole catalogue, target_ranks) with compacted rows, for each
way of scoring (score_factors, sparse_scores, dense), growing states and observed
targets; and non-finite scores stop the pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hrnn_lit.baselines.popularity import PopNet
from hrnn_lit.errors import NumericalError
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.loop import EvalLoop, needed_rows
from hrnn_lit.nets.api import Starts
from hrnn_lit.nets.attention_hrnn import AttentionHRNN
from hrnn_lit.nets.history import HistoryHRNN
from hrnn_lit.nets.recurrent import RecurrentCore
from tests.helpers import loop_eval, reference_eval
from tests.test_eval_speed_paths import eval_chunks, threads

N_ITEMS = 300


class TinyNet(nn.Module):
    """A test network: two running averages of the input embeddings per slot (a 3-D
    state) and a bonus for the items seen so far, kept in a buffer that doubles when full;
    all reset per user, or per session (``session_only``); ``observe=True`` also files the
    targets."""

    def __init__(self, n_items: int, dim: int = 8, session_only: bool = False,
                 observe: bool = False):  # fmt: skip
        super().__init__()
        self.n_items, self.session_only = n_items, session_only
        self.emb = nn.Embedding(n_items, dim)
        self.out = nn.Embedding(n_items, dim)
        if observe:
            self.observe = lambda state, targets: self._file(state, targets)

    def initial_state(self, batch_size, device):
        mem = torch.zeros(batch_size, 2, self.emb.embedding_dim, device=device)
        buf = torch.full((batch_size, 2), -1, dtype=torch.long, device=device)
        return mem, buf, torch.zeros(batch_size, dtype=torch.long, device=device)

    def start(self, state, starts: Starts):
        mem, buf, n = state
        reset = starts.session if self.session_only else starts.user
        return mem.masked_fill(reset[:, None, None], 0.0), buf, n.masked_fill(reset, 0)

    def step(self, items, state):
        mem, buf, n = self._file(state, items)
        rate = torch.tensor([0.5, 0.9], device=items.device)[None, :, None]
        mem = rate * mem + (1 - rate) * self.emb(items)[:, None, :]
        return mem, buf, n

    def _file(self, state, items):
        mem, buf, n = state
        if int(n.max()) >= buf.shape[1]:  # full: twice as wide
            buf = torch.cat([buf, torch.full_like(buf, -1)], 1)
        buf = buf.scatter(1, n[:, None], items[:, None])
        return mem, buf, n + 1

    def score(self, state, items=None):
        mem, buf, n = state
        w = self.out.weight if items is None else self.out(items)
        s = mem.sum(1) @ w.T  # [B, N]
        cols = torch.arange(self.n_items, device=s.device) if items is None else items
        filled = torch.arange(buf.shape[1], device=s.device) < n[:, None]
        seen = ((buf[:, :, None] == cols) & filled[:, :, None]).any(1)  # [B, N]
        return s + 0.25 * seen


def networks():
    torch.manual_seed(0)
    return {
        "attention_hrnn": AttentionHRNN(N_ITEMS, hidden_size=16, memory=3).eval(),
        "hrnn_history": HistoryHRNN(N_ITEMS, hidden_size=16, user_hidden_size=12).eval(),
        "tiny": TinyNet(N_ITEMS).eval(),
        "tiny_session_only_observe": TinyNet(N_ITEMS, session_only=True, observe=True).eval(),
    }


@pytest.mark.parametrize("name", list(networks()))
def test_loop_equals_the_plain_reference_replay(name):
    """Ranks, positions and histories of a whole pass, both tie rules, slots a multiple of
    64 and not, 1 and 2 threads, small row blocks; with and without the network's fast
    scoring form. Fewer rows are stepped than the plain replay steps (B = 128)."""
    net = networks()[name]
    if name == "hrnn_history":  # a prior that ranks the user's items high: many repeats
        with torch.no_grad():
            net.mode.bias.fill_(2.0)
    stepped = []
    step = net.step
    net.step = lambda items, state: stepped.append(items.numel()) or step(items, state)
    for B in (128, 50):
        chunks = eval_chunks(n_items=N_ITEMS, batch_size=B, steps_per_batch=8)
        for n_threads in (1, 2):
            with threads(n_threads):
                for ties in ("conservative", "optimistic"):
                    stepped.clear()
                    ref = reference_eval(net, chunks, ties)
                    all_rows = sum(stepped)
                    for fast in (True, False):
                        stepped.clear()
                        got = loop_eval(net, chunks, N_ITEMS, ties, eval_block=40, fast=fast)
                        # (padded to 64 rows: with B = 50 every step takes all 50)
                        assert sum(stepped) < all_rows if B == 128 else sum(stepped) <= all_rows
                        for k in ref:
                            assert torch.equal(ref[k], got[k]), (name, B, n_threads, ties, k)


def test_session_only_network_steps_only_scored_sessions():
    net = TinyNet(N_ITEMS, session_only=True).eval()
    chunks = eval_chunks(n_items=N_ITEMS)
    stepped = []
    step = net.step
    net.step = lambda items, state: stepped.append(items.numel()) or step(items, state)
    loop_eval(net, chunks, N_ITEMS)
    need = sum(int(needed_rows(c, True).sum()) for c in chunks)
    valid = sum(c.n_events for c in chunks)
    assert need < 0.7 * valid  # (the steps pad rows to multiples of 64)
    assert sum(stepped) < 0.7 * sum(c.input.numel() for c in chunks)


def test_ranks_are_capped_at_the_largest_k():
    net = RecurrentCore(N_ITEMS, hidden_size=8, user_hidden_size=4).eval()
    chunks = eval_chunks(n_items=N_ITEMS)
    ref = reference_eval(net, chunks)["rank"]
    for fast in (True, False):
        got = loop_eval(net, chunks, N_ITEMS, rank_cap=10, fast=fast)["rank"]
        assert torch.equal(got, torch.where(ref > 10, 11, ref))


def test_non_finite_scores_stop_the_pass():
    chunks = eval_chunks(n_items=N_ITEMS)
    rnn = RecurrentCore(N_ITEMS, hidden_size=8, user_hidden_size=4).eval()
    with torch.no_grad():
        rnn.out_w.weight[7, 0] = float("nan")
    with pytest.raises(NumericalError, match="output weight of 1 item"):
        loop_eval(rnn, chunks, N_ITEMS)  # score_factors: the catalogue, once per pass
    with pytest.raises(NumericalError, match="not finite"):
        loop_eval(rnn, chunks, N_ITEMS, fast=False)  # dense scores
    pop = PopNet(N_ITEMS, item_counts=[1] * N_ITEMS)
    pop.pop[3] = float("inf")
    with pytest.raises(NumericalError, match="base scores"):
        loop_eval(pop, chunks, N_ITEMS)  # sparse scores


def test_a_state_that_shrinks_is_refused():
    net, B = TinyNet(N_ITEMS), 128
    step = net.step

    def narrower(items, state):  # the memory loses a row where only some slots step
        mem, buf, n = step(items, state)
        return (mem[:, :1] if items.numel() < B else mem), buf, n

    net.step = narrower
    chunks = eval_chunks(n_items=N_ITEMS, batch_size=B)
    loop = EvalLoop(N_ITEMS)
    loop.begin(net, RankCollector())
    with pytest.raises(ValueError, match="may only grow"):
        for batch in chunks:
            loop.chunk(batch)
