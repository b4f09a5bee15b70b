"""The evaluation loop (docs/design.md §6, §10): history replay and full-catalogue ranking
of one pass over an evaluation plan, for any network of the model API
(``hrnn_lit.models.api``): the built-in recurrent networks, a user's own, the baselines.

Per chunk ([T, B] time steps x slots), at each time step: the start rules on the slots that
start a session, then one step and (where the network observes them) the targets on the
slots whose state can still matter (``needed_rows``), their rows written back into the
carried state. The same loop replays a recommender's users (``recommend.recommender``):
its ``Slots`` load each user's stored state into a slot before the user's first step and
store it after the last, and an entry may start a session without a step (a session's
first event, whose item is the next step's input). The states of the
scored slots are kept and ranked at the end of the chunk, in row blocks, by the cheapest
form the network offers (``api.ScoreFactors``: column blocks of a product, stopped at the
largest K; ``api.SparseScores``: binary search in a sorted base; else its ``score`` over the
whole catalogue and ``target_ranks``). Ranks come from float32 scores (or wider) under any
trainer precision, and a non-finite score stops the pass (the catalogue's weights are
checked once per pass).

Compaction keeps the bits of a step on all slots where it can: the stepped rows are padded
to a multiple of 64 by repeating rows (at most B), so every matrix product keeps >= 64 rows
and BLAS gives each row the same value; the native GRU kernel (models/native.py) computes
each row alone, and torch's elementwise kernels split whole vector lanes when the element
count and each thread's share of it are multiples of 64. So with B a multiple of 64 and at
most two threads on CPU the built-in networks' rows are bit for bit those of a step on all
slots (tests/test_eval_speed_paths.py); elsewhere they are equal to rounding.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hrnn_lit.data.batching import Chunk
from hrnn_lit.errors import NumericalError
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.metrics import target_ranks
from hrnn_lit.evaluation.ranking import (
    bound_misses,
    catalogue_ranks,
    check_finite_catalogue,
    sparse_ranks,
)
from hrnn_lit.evaluation.repeat_share import catalogue_ranks_repeat, dense_repeat_counts
from hrnn_lit.nets import api
from hrnn_lit.ops.activations import at_least_float32, ranking_activation

ROW_MULTIPLE = 64
BLOCK_SCORES = 4 << 20  # dense path: scores per block of rows


def needed_rows(batch: Chunk, session_only: bool) -> np.ndarray:
    """[T, B] bool: the (step, slot) entries whose state must be computed. Every valid one,
    unless the network is session-only: then only the sessions with a scored step, or that
    may go on into the next chunk (a session start wipes whatever came before)."""
    valid = batch.valid.cpu().numpy()
    if not session_only:
        return valid
    score = batch.score.cpu().numpy()
    start = batch.session_start.cpu().numpy()
    need = np.zeros_like(valid)
    carry = np.ones(valid.shape[1], bool)  # the chunk's last step: the session may go on
    for t in range(valid.shape[0] - 1, -1, -1):
        need[t] = valid[t] & (score[t] | carry)
        carry = need[t] & ~start[t]
    return need


def padded_rows(rows: np.ndarray, n_slots: int) -> np.ndarray:
    """``rows`` repeated up to a multiple of ROW_MULTIPLE rows (at most n_slots)."""
    size = min(-(-rows.size // ROW_MULTIPLE) * ROW_MULTIPLE, n_slots)
    return np.resize(rows, size)


def starts_at(batch: Chunk, t: int, idx: Tensor | None = None, n: int = 0) -> api.Starts:
    """The starts of time step t for all slots, or for the slots ``idx`` whose first ``n``
    are real (the rest, padding, start nothing)."""
    if idx is None:
        lo, hi = batch.next_session_offsets[t], batch.next_session_offsets[t + 1]
        return api.Starts(
            batch.session_start[t], batch.user_start[t], batch.next_session_rows[lo:hi]
        )
    session, user = batch.session_start[t, idx], batch.user_start[t, idx]
    session[n:], user[n:] = False, False
    return api.Starts(session, user, (session & ~user).nonzero().view(-1))


def context_at(batch: Chunk, t: int, idx: Tensor | None = None) -> api.Context:
    """The ``api.Context`` of time step t for all slots, or for the slots ``idx``."""
    ctx = api.Context(batch.user_index[t], batch.time[t], batch.gap[t], batch.position[t])
    return ctx if idx is None else ctx.rows(idx)


class Slots(Protocol):
    """Users' states moving in and out of a replay's slots (a recommender's users)."""

    def load(self, t: int, state: api.State) -> api.State:
        """``state`` with the stored states of the users whose first step is at t."""

    def store(self, t: int, state: api.State) -> None:
        """Keep the states of the users whose last step is at t."""


class EvalLoop:
    """One evaluation pass at a time: ``begin(net, collector)``, then ``chunk(batch)`` for
    each chunk in plan order (the state is carried from one to the next). ``fast=False``:
    rank from ``score`` over the whole catalogue only (a reference for tests)."""

    def __init__(self, n_items: int, eval_block: int = 1024, fast: bool = True):
        self.n_items, self.eval_block, self.fast = n_items, eval_block, fast
        self.net: torch.nn.Module | None = None
        self.collector: RankCollector | None = None
        self.state: api.State | None = None

    def begin(self, net: torch.nn.Module, collector: RankCollector, shares: bool = True) -> None:
        """A new pass; ``shares``: also count the users' earlier items in each top K (the
        repeat shares, which cost a pass over the catalogue for many rows: the test's)."""
        self.net, self.collector, self.state, self.shares = net, collector, None, shares
        self._checked = False  # the catalogue's weights, once per pass
        self._sorted_base: Tensor | None = None  # sparse scores' sorted base, once per pass
        self._empty: api.State | None = None  # a fresh slot's state (fills grown tensors)

    def chunk(self, batch: Chunk, slots: Slots | None = None) -> None:
        """Replay (and rank) one chunk; ``slots``: load and store users' states per slot
        (a recommender's replay: every valid entry steps, none is scored)."""
        with torch.no_grad(), torch.autocast(batch.input.device.type, enabled=False):
            self._chunk(batch, slots)

    # ------------------------------------------------------------------ replay
    def _chunk(self, batch: Chunk, slots: Slots | None) -> None:
        net, inp = self.net, batch.input
        T, B = inp.shape
        state = self.state if self.state is not None else net.initial_state(B, inp.device)
        starting = batch.session_start.cpu().numpy()  # (user starts are session starts)
        if slots is None:
            need = needed_rows(batch, getattr(net, "session_only", False))
            starting &= need
        else:  # every valid entry steps; a start may come without a step
            need = batch.valid.cpu().numpy()
        scored = batch.score.cpu().numpy()
        observe = getattr(net, "observe", None)
        ctx = api.takes_context(net)
        pending: list[api.State] = []  # scored slots' states since time step t0
        t0 = 0
        for t in range(T):
            if slots is not None:  # users taking a slot: their stored states
                state = slots.load(t, state)
            rows = np.flatnonzero(need[t])
            if batch.any_start[t] and starting[t].any():  # the start rules: starting slots only
                state = self._start(state, batch, t, np.flatnonzero(starting[t]))
            sel = np.flatnonzero(scored[t])
            if rows.size == B:  # every slot: step the state as it is
                extra = (context_at(batch, t),) if ctx else ()
                state = net.step(inp[t], state, *extra)
                part = api.select(state, self._index(sel, inp.device)) if sel.size else None
                if observe is not None:
                    state = observe(state, batch.target[t])
            elif rows.size:
                idx = self._index(padded_rows(rows, B), inp.device)
                extra = (context_at(batch, t, idx),) if ctx else ()
                sub = net.step(inp[t, idx], api.select(state, idx), *extra)
                if sel.size:
                    part = api.select(sub, self._index(np.searchsorted(rows, sel), inp.device))
                if observe is not None:
                    sub = observe(sub, batch.target[t, idx])
                state = self._put_rows(state, idx[: rows.size], sub)
            if slots is not None:  # users leaving their slot: their states stored
                slots.store(t, state)
            if sel.size:
                if pending and _shapes(pending[0]) != _shapes(part):  # the state grew
                    self._rank(batch, t0, t, pending)
                    pending = []
                if not pending:
                    t0 = t
                pending.append(part)
        self.state = state
        if pending:
            self._rank(batch, t0, T, pending)

    def _start(self, state: api.State, batch: Chunk, t: int, rows: np.ndarray) -> api.State:
        """``state`` after time step t's start rules, run on the slots ``rows`` (those that
        start a session; the rules leave every other slot as it is)."""
        B = batch.input.shape[1]
        if rows.size == B:
            return self.net.start(state, starts_at(batch, t))
        idx = self._index(padded_rows(rows, B), batch.input.device)
        sub = self.net.start(api.select(state, idx), starts_at(batch, t, idx, rows.size))
        return self._put_rows(state, idx[: rows.size], sub)

    @staticmethod
    def _index(rows: np.ndarray, device) -> Tensor:
        return torch.from_numpy(rows).to(device)

    def _put_rows(self, state: api.State, rows: Tensor, sub: api.State) -> api.State:
        if self._empty is None:
            self._empty = self.net.initial_state(1, rows.device)
        return api.put_rows(state, rows, sub, self._empty, type(self.net).__name__)

    # ----------------------------------------------------------------- ranking
    def _rank(self, batch: Chunk, t0: int, t1: int, parts: list[api.State]) -> None:
        """Rank the targets of the scored slots of time steps t0..t1-1 (states ``parts``),
        and count the user's earlier items in each one's top K (``_seen``)."""
        mask = batch.score[t0:t1]
        events = [getattr(batch, k)[t0:t1][mask] for k in ("target", "position", "history")]
        repeat, (pair_rows, pair_items) = self._seen(batch, t0, t1, events[0].numel())
        state, net = api.cat(parts), self.net
        if self.fast and hasattr(net, "score_factors"):
            self._rank_factors(net.score_factors(state), *events, repeat, pair_rows, pair_items)
            return
        bound = self.collector.ties == "conservative" and self.collector.rank_cap is not None
        if self.fast and bound and not self.shares and hasattr(net, "score_bound"):
            self._rank_bound(net.score_bound(state), state, *events, repeat)
            return
        if not self.shares:  # no pairs: no counts
            pair_rows, pair_items = pair_rows[:0], pair_items[:0]
        sparse = self.fast and hasattr(net, "sparse_scores")
        n, rows = events[0].numel(), self.eval_block
        if not sparse:  # at most BLOCK_SCORES dense scores at a time
            rows = max(1, min(rows, BLOCK_SCORES // self.n_items))
        # each row block's pairs: pairs are ordered by row
        bounds = torch.searchsorted(pair_rows, torch.arange(0, n + rows, rows, device=mask.device))
        bounds = bounds.tolist()
        for i, lo in enumerate(range(0, n, rows)):
            block = api.select(state, torch.arange(lo, min(lo + rows, n), device=mask.device))
            part = [x[lo : lo + rows] for x in (*events, repeat)]
            pairs = _pairs(pair_rows, pair_items, bounds[i], bounds[i + 1], lo)
            if sparse:
                self._rank_sparse(net.sparse_scores(block), *part, pairs)
            else:  # [rows, n_items]; every score is checked finite
                seen = pairs if self.shares else None
                self.collector.add(at_least_float32(net.score(block)), *part, seen)

    def _seen(self, batch: Chunk, t0: int, t1: int, n: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The scored events' repeat flags [n] and their users' earlier items as pairs
        (event row [P] ascending, item [P]), from the chunk's host-side ``seen`` table."""
        if batch.seen is None or batch.repeat is None or batch.event is None:
            raise ValueError("evaluation needs chunks of Steps from build_steps (the seen items)")
        device = batch.target.device
        mask = batch.score[t0:t1]
        repeat = batch.repeat[t0:t1][mask]
        event = batch.event[t0:t1][batch.score[t0:t1].cpu().numpy()]
        offsets, items = batch.seen.before(event)
        rows = np.repeat(np.arange(n), np.diff(offsets))
        return repeat, (self._index(rows, device), self._index(items, device))

    def _rank_factors(self, f: api.ScoreFactors, targets, position, history, repeat,
                      pair_rows, pair_items) -> None:  # fmt: skip
        """Ranks without the score matrix, in row blocks, resolved up to the rank cap; the
        repeat counts over the same products."""
        col = self.collector
        query, weight = f.queries[0], f.tables[0]
        user, user_weight = (f.queries[1], f.tables[1]) if len(f.tables) > 1 else (None, None)
        if not self._checked:
            check_finite_catalogue(weight, f.bias, user_weight)
            self._checked = True
        act = ranking_activation(f.act)
        if not self.shares:
            ranks = catalogue_ranks(
                query, targets, weight, f.bias, col.ties, user, user_weight, act,
                max_rows=self.eval_block, rank_cap=col.rank_cap,
            )  # fmt: skip
            col.add_ranks(ranks, position, history, weight.shape[0], repeat)
            return
        ranks, count = catalogue_ranks_repeat(
            query, targets, pair_rows, pair_items, weight, f.bias, col.ks, col.ties, user,
            user_weight, act, max_rows=self.eval_block, rank_cap=col.rank_cap,
        )  # fmt: skip
        col.add_ranks(ranks, position, history, weight.shape[0], repeat, count)

    def _rank_bound(self, b: api.ScoreBound, state: api.State, targets, position, history,
                    repeat) -> None:  # fmt: skip
        """Ranks of targets that the bound shows to miss the top K (``bound_misses``: from
        column blocks of the product), the others' from ``score`` in row blocks."""
        col, f, cap = self.collector, b.factors, self.collector.rank_cap
        user, user_weight = (f.queries[1], f.tables[1]) if len(f.tables) > 1 else (None, None)
        if not self._checked:
            check_finite_catalogue(f.tables[0], f.bias, user_weight)
            self._checked = True
        missed = bound_misses(
            f.queries[0], targets, f.tables[0], f.bias, b.rows, b.items, cap, user,
            user_weight, ranking_activation(f.act), max_rows=self.eval_block,
        )  # fmt: skip
        ranks = torch.full_like(targets, cap + 1)
        rest = (~missed).nonzero().view(-1)
        rows = max(1, min(self.eval_block, BLOCK_SCORES // self.n_items))
        for lo in range(0, rest.numel(), rows):
            idx = rest[lo : lo + rows]
            scores = at_least_float32(self.net.score(api.select(state, idx)))
            if not bool(torch.isfinite(scores.sum())) and not bool(torch.isfinite(scores).all()):
                raise NumericalError("evaluation: some scores are not finite (NaN/inf)")
            ranks[idx] = target_ranks(scores, targets[idx], col.ties)
        col.add_ranks(ranks, position, history, self.n_items, repeat)

    def _rank_sparse(self, s: api.SparseScores, targets, position, history, repeat,
                     pairs) -> None:  # fmt: skip
        """Ranks by binary search in the sorted base (sorted once per pass). Non-finite
        scores stop the pass: the base is checked once per pass, the entries always. The
        repeat counts from the block's scores written out in full (the dense fallback)."""
        if self._sorted_base is None:
            if not bool(torch.isfinite(s.base).all()):
                raise NumericalError("evaluation: the base scores of some items are not finite")
            self._sorted_base = torch.sort(s.base).values
        if not bool(torch.isfinite(s.values).all()):
            raise NumericalError("evaluation: some scores are not finite (NaN/inf)")
        col = self.collector
        ranks = sparse_ranks(
            self._sorted_base, s.base, s.rows, s.items, s.values, targets, col.ties
        )
        count = self._sparse_repeat_counts(s, targets.numel(), *pairs) if self.shares else None
        col.add_ranks(ranks, position, history, s.base.numel(), repeat, count)

    def _sparse_repeat_counts(self, s: api.SparseScores, n: int, pair_rows, pair_items) -> Tensor:
        """Repeat counts of sparse scores: the rows' scores written out in full, at most
        BLOCK_SCORES at a time (rows without an earlier item are skipped)."""
        ks = self.collector.ks
        out = torch.zeros(n, len(ks), dtype=torch.long, device=pair_rows.device)
        if pair_rows.numel() == 0:
            return out
        n_items = s.base.numel()
        rows = max(1, BLOCK_SCORES // n_items)
        bounds = torch.searchsorted(pair_rows, torch.arange(0, n + rows, rows, device=out.device))
        bounds = bounds.tolist()
        e_bounds = torch.searchsorted(s.rows, torch.arange(0, n + rows, rows, device=out.device))
        e_bounds = e_bounds.tolist() if bool((s.rows[1:] >= s.rows[:-1]).all()) else None
        for i, lo in enumerate(range(0, n, rows)):
            if bounds[i] == bounds[i + 1]:
                continue
            hi = min(lo + rows, n)
            scores = s.base.expand(hi - lo, n_items).clone()
            if e_bounds is not None:
                ea, eb = e_bounds[i], e_bounds[i + 1]
                er, ei, ev = s.rows[ea:eb] - lo, s.items[ea:eb], s.values[ea:eb]
            else:
                keep = (s.rows >= lo) & (s.rows < hi)
                er, ei, ev = s.rows[keep] - lo, s.items[keep], s.values[keep]
            scores[er, ei] = ev.to(scores.dtype)
            pr, pi = _pairs(pair_rows, pair_items, bounds[i], bounds[i + 1], lo)
            out[lo:hi] = dense_repeat_counts(scores, pr, pi, ks, self.collector.ties)
        return out


def _pairs(rows: Tensor, items: Tensor, a: int, b: int, lo: int) -> tuple[Tensor, Tensor]:
    """Pairs a..b-1, their rows counted from ``lo``."""
    return rows[a:b] - lo, items[a:b]


def _shapes(state: api.State) -> list[torch.Size]:
    return [x.shape[1:] for x in state]
