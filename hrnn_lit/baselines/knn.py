"""The nearest-neighbour baselines as networks of the model API (docs/design.md §2):
Item-KNN and session-aware V-SkNN (the shared conventions: ``models/popularity.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hrnn_lit.baselines.popularity import WIDTH, BaselineNet, session_events
from hrnn_lit.data.batching import Steps
from hrnn_lit.errors import ConfigError
from hrnn_lit.nets.api import SparseScores, Starts, State

WEIGHTINGS = ("same", "div", "quadratic", "log")  # V-SkNN position weight in the query
SCORE_DECAYS = ("same", "div", "quadratic", "log")  # V-SkNN neighbour decay by match recency
SAMPLINGS = ("random", "recent")


def distinct_session_items(ptr: np.ndarray, items: np.ndarray, n_items: int):
    """Each session as a set: (session [D], item [D]) sorted by (session, item)."""
    ses = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
    key = np.unique(ses * n_items + items)
    return key // n_items, key % n_items


def csr_ptr(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Row pointer of a CSR matrix whose entries are sorted by ``rows``."""
    return np.r_[0, np.cumsum(np.bincount(rows, minlength=n_rows))].astype(np.int64)


def csr_expand(ptr: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """For each requested row, all its CSR entries: (owner [N], entry [N]), where
    ``owner`` indexes ``rows`` and ``entry`` indexes the CSR value arrays."""
    start = ptr[rows]
    count = ptr[rows + 1] - start
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
    first = torch.cumsum(count, 0) - count
    entry = torch.arange(owner.numel(), device=rows.device) - first[owner] + start[owner]
    return owner, entry


def group_rank(group: Tensor, key: Tensor) -> Tensor:
    """Rank (0 = best) of each element within its group by descending ``key``; ties keep
    the elements' current order. Returns ranks aligned with the inputs."""
    order = torch.sort(-key, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_group = group[order]
    counts = torch.bincount(sorted_group)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=group.device) - first[sorted_group]
    return rank


def check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key} must be an integer >= {minimum}, got {value!r}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"model.{key} must be one of {sorted(choices)}, got {value!r}")


# --------------------------------------------------------------------------- Item-KNN
class ItemKNNNet(BaselineNet):
    """Item-KNN (paper baseline, as in GRU4Rec's evaluation): the score of item j for an
    event with input item i is the cosine similarity of their session-occurrence vectors
    in the fit split, sim(i, j) = |S_i & S_j| / sqrt(|S_i| |S_j|), S_i = the sessions
    containing i (sessions as sets). Scored from the input item only (state: it, [B]).

    Only the ``k_neighbors`` most similar items per item are kept (ties: lower item index
    first; an item is not its own neighbour), in CSR form: memory O(n_items * k), never
    n_items^2. Items outside the input's neighbours score 0, or with ``pop_fallback``
    (default) rank below all neighbours by popularity. Whenever ``k_neighbors >= max(ks)``
    recall/MRR/NDCG@K equal those of the untruncated similarity (bar ties at the cut).

    Build: all within-session item pairs (sum over sessions of L^2 entries), counted with
    one ``np.unique``; top-k by one lexsort. Scoring: O(k) entries per event.
    """

    session_only = True

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        k_neighbors: int = 100,
        pop_fallback: bool = True,
    ):
        super().__init__(n_items, item_counts)
        check_int("k_neighbors", k_neighbors, 1)
        self.k_neighbors = k_neighbors
        self.pop_fallback = pop_fallback
        long = torch.int64
        self.register_buffer("nbr_ptr", torch.zeros(n_items + 1, dtype=long), persistent=False)
        self.register_buffer("nbr_item", torch.zeros(0, dtype=long), persistent=False)
        self.register_buffer("nbr_sim", torch.zeros(0, dtype=torch.float64), persistent=False)

    def fit(self, steps: Steps) -> None:
        super().fit(steps)
        n = self.n_items
        ptr, items, _ = session_events(steps)
        ses, item = distinct_session_items(ptr, items, n)
        support = np.bincount(item, minlength=n).astype(np.float64)  # |S_i|
        length = np.bincount(ses, minlength=ptr.size - 1)
        # all ordered pairs (a, b) of distinct items sharing a session
        per_entry = length[ses]
        src = np.repeat(np.arange(item.size), per_entry)
        first = np.r_[0, np.cumsum(length)][ses]  # where each entry's session starts
        within = np.arange(src.size) - np.repeat(np.cumsum(per_entry) - per_entry, per_entry)
        a, b = item[src], item[first[src] + within]
        other = a != b
        pair, cooc = np.unique(a[other] * n + b[other], return_counts=True)
        a, b = pair // n, pair % n
        sim = cooc / np.sqrt(support[a] * support[b])
        order = np.lexsort((b, -sim, a))  # by a, then similarity down, then item index
        a, b, sim = a[order], b[order], sim[order]
        group_first = np.r_[0, np.flatnonzero(np.diff(a)) + 1] if a.size else np.zeros(0, int)
        rank = np.arange(a.size) - np.repeat(group_first, np.diff(np.r_[group_first, a.size]))
        keep = rank < self.k_neighbors
        dev = self.nbr_ptr.device
        self.nbr_ptr = torch.as_tensor(csr_ptr(a[keep], n), device=dev)
        self.nbr_item = torch.as_tensor(b[keep], device=dev)
        self.nbr_sim = torch.as_tensor(sim[keep], device=dev)

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        return (torch.zeros(batch_size, dtype=torch.long, device=device),)

    def step(self, items: Tensor, state: State) -> State:
        return (items,)

    def sparse_scores(self, state: State) -> SparseScores:
        base = self.pop_fallback_scores() if self.pop_fallback else torch.zeros_like(self.pop)
        owner, entry = csr_expand(self.nbr_ptr, state[0])
        return SparseScores(base, owner, self.nbr_item[entry], self.nbr_sim[entry])


# ----------------------------------------------------------------------------- V-SkNN
class VSKNNNet(BaselineNet):
    """Session-aware V-SkNN: "vector multiplication" session-based kNN (Ludewig & Jannach,
    "Evaluation of session-based recommendation algorithms", UMUAI 2018) with the user
    *extension* of Latifi, Mauro & Jannach ("Session-aware recommendation: a surprising
    quest for the state of the art", Information Sciences 2021; V-SkNN_E in session-rec's
    ``knn/uvsknn.py``, parameter ``extend_session_length``). Written from the papers' and
    session-rec's definitions:

    * Query: the current session's items up to the input, in order. With
      ``extend_length = L > 0``, while the session holds fewer than L items the user's most
      recent earlier items (from the replayed history, across session boundaries) are put
      in front of it so the query holds L items (session-rec takes them from the front of
      its stored window of the last L items; we take the most recent ones). Query item at
      1-based position p of n gets weight ``weighting``: same 1, div p/n, quadratic
      (p/n)^2, log 1/log10(n - p + 1.7); a repeated item keeps its last position's weight,
      so prepended history items weigh less than the session's own.
    * Candidates: the training sessions (as item sets) that share an item with the query.
      ``sample_size = 0`` keeps them all (exact); otherwise the ``sample_size`` with the
      highest priority: ``sampling=random`` a fixed seeded random priority per session;
      ``sampling=recent`` the session's last event time, which needs ``step_time`` in
      ``fit`` (the fit ``Steps`` carry no time, so run.py cannot use it yet).
    * Similarity (session-rec's ``vec``): sum of the weights of the shared items / number
      of distinct query items. The ``k`` most similar candidates are the neighbours (ties:
      lower session index first).
    * Scores: each neighbour n adds sim(n) * decay(n) to each of its items, decay =
      ``weighting_score`` of the 1-based distance from the query's end to the most recent
      query item n contains (same 1, div 1/d, quadratic 1/d^2, log 1/log10(d + 1.7)).
      Items of the current session are not excluded (session-rec ``remind=True``).
      Unvoted items score 0, or with ``pop_fallback`` (default) rank below all voted items
      by popularity. Not implemented: session-rec's ``boost_own_sessions`` (the evaluation
      chunks carry no user id to link a user to their training sessions) and reminders.

    State per slot: the user's last W events (buf [B, W], the ``n_buf`` [B] first filled; W
    >= the longest query, doubled on demand), the current session's length [B] and
    ``fresh`` [B] (the session's first item is still to come); reset at ``user_start``.
    Scoring a block of R rows is vectorised: (row, item) -> (row, session) pairs through the
    item->sessions CSR, aggregated with one ``torch.unique``, per-row sampling and top-k by
    two stable sorts, then (row, neighbour) -> items through the session->items CSR, summed
    per (row, item). Cost per block: the number of (query item, training session containing
    it) pairs, plus the neighbours' items.
    """

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        k: int = 100,
        sample_size: int = 0,
        sampling: str = "random",
        weighting: str = "div",
        weighting_score: str = "div",
        extend_length: int = 0,
        pop_fallback: bool = True,
        seed: int = 0,
    ):
        super().__init__(n_items, item_counts)
        check_int("k", k, 1)
        check_int("sample_size", sample_size, 0)
        check_int("extend_length", extend_length, 0)
        check_choice("sampling", sampling, SAMPLINGS)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("weighting_score", weighting_score, SCORE_DECAYS)
        self.k = k
        self.sample_size = sample_size
        self.sampling = sampling
        self.weighting = weighting
        self.weighting_score = weighting_score
        self.extend_length = extend_length
        self.session_only = extend_length == 0  # the query is the current session alone
        self.pop_fallback = pop_fallback
        self.seed = seed
        long = torch.int64
        for key, size in (("is_ptr", n_items + 1), ("is_ses", 0), ("si_ptr", 1), ("si_item", 0)):
            self.register_buffer(key, torch.zeros(size, dtype=long), persistent=False)
        self.register_buffer("priority", torch.zeros(0, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------ fitting
    def fit(self, steps: Steps, step_time: np.ndarray | None = None) -> None:
        """Index the fit split's sessions (as item sets) both ways. ``step_time`` (time of
        each step's target event) is needed only by ``sampling=recent``."""
        super().fit(steps)
        ptr, items, _ = session_events(steps)
        n_ses = ptr.size - 1
        ses, item = distinct_session_items(ptr, items, self.n_items)  # by (session, item)
        by_item = np.lexsort((ses, item))
        if self.sampling == "recent" and self.sample_size > 0:
            if step_time is None:
                raise ConfigError(
                    "model.sampling=recent needs event times, which the fit Steps do not "
                    "carry; use model.sampling=random or model.sample_size=0"
                )
            step_ses = np.cumsum(steps.session_start) - 1
            priority = np.full(n_ses, -np.inf)
            np.maximum.at(priority, step_ses, np.asarray(step_time, np.float64))
        else:
            priority = np.random.default_rng(self.seed).permutation(n_ses).astype(np.float64)
        dev = self.is_ptr.device
        self.is_ptr = torch.as_tensor(csr_ptr(item[by_item], self.n_items), device=dev)
        self.is_ses = torch.as_tensor(ses[by_item], device=dev)
        self.si_ptr = torch.as_tensor(csr_ptr(ses, n_ses), device=dev)
        self.si_item = torch.as_tensor(item, device=dev)
        self.priority = torch.as_tensor(priority, device=dev)

    # ------------------------------------------------------------- slot state
    def initial_state(self, batch_size: int, device: torch.device) -> State:
        width = max(WIDTH, self.extend_length)
        buf = torch.full((batch_size, width), -1, dtype=torch.long, device=device)
        n_buf = torch.zeros(batch_size, dtype=torch.long, device=device)
        return buf, n_buf, torch.zeros_like(n_buf), n_buf.bool()

    def start(self, state: State, starts: Starts) -> State:
        buf, n_buf, ses_len, fresh = state
        n_buf = n_buf.masked_fill(starts.user, 0)
        return buf, n_buf, ses_len.masked_fill(starts.session, 0), fresh | starts.session

    def step(self, items: Tensor, state: State) -> State:
        buf, n_buf, ses_len, fresh = self._record(state, state[3], items)
        return buf, n_buf, ses_len, torch.zeros_like(fresh)

    def observe(self, state: State, targets: Tensor) -> State:
        return self._record(state, torch.ones_like(state[3]), targets)

    def _record(self, state: State, mask: Tensor, items: Tensor) -> State:
        """Append ``items`` [B] to the slots in ``mask`` [B]; the oldest event leaves a full
        buffer, which doubles when the current session alone would not fit."""
        buf, n_buf, ses_len, fresh = state
        rows = mask.nonzero().view(-1)
        if rows.numel() == 0:
            return state
        width = buf.shape[1]
        if int(ses_len[rows].max()) >= width:
            buf = torch.cat([buf, torch.full_like(buf, -1)], 1)
            width *= 2
        buf, n_buf, ses_len = buf.clone(), n_buf.clone(), ses_len.clone()
        full = rows[n_buf[rows] >= width]
        if full.numel():  # drop the oldest event
            buf[full] = torch.cat([buf[full, 1:], buf.new_full((full.numel(), 1), -1)], 1)
            n_buf[full] -= 1
        buf[rows, n_buf[rows]] = items[rows]
        n_buf[rows] += 1
        ses_len[rows] += 1
        return buf, n_buf, ses_len, fresh

    # ------------------------------------------------------------------ scoring
    def _position_weight(self, p: Tensor, n: Tensor) -> Tensor:
        """Query weight of 1-based position p of n (float64 tensors)."""
        if self.weighting == "same":
            return torch.ones_like(p)
        if self.weighting == "div":
            return p / n
        if self.weighting == "quadratic":
            return (p / n) ** 2
        return 1.0 / torch.log10(n - p + 1.7)

    def _score_decay(self, d: Tensor) -> Tensor:
        """Neighbour decay for a match at 1-based distance d from the query's end."""
        if self.weighting_score == "same":
            return torch.ones_like(d)
        if self.weighting_score == "div":
            return 1.0 / d
        if self.weighting_score == "quadratic":
            return 1.0 / d**2
        return 1.0 / torch.log10(d + 1.7)

    def query(self, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Distinct query items of each slot: (row [Q], item [Q], weight [Q], decay [Q])
        sorted by (row, item); ``decay`` is the item's neighbour decay (last occurrence)."""
        buf, n_buf, ses_len, _ = state
        window = ses_len.clamp(min=self.extend_length)
        n = torch.minimum(window, n_buf)  # events of the query: the buffer's last n
        col = torch.arange(buf.shape[1], device=buf.device)
        pos = col - (n_buf - n)[:, None] + 1  # 1-based position in the query
        keep = (pos >= 1) & (pos <= n[:, None])
        row = torch.nonzero(keep)[:, 0]
        p, n_row = pos[keep].double(), n[row].double()
        weight = self._position_weight(p, n_row)
        decay = self._score_decay(n_row - p + 1.0)
        key, inv = torch.unique(row * self.n_items + buf[keep], return_inverse=True)
        w = torch.zeros(key.numel(), dtype=torch.float64, device=buf.device)
        d = torch.zeros_like(w)
        w.scatter_reduce_(0, inv, weight, "amax", include_self=False)
        d.scatter_reduce_(0, inv, decay, "amax", include_self=False)
        return key // self.n_items, key % self.n_items, w, d

    def neighbours(self, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The neighbour sessions of each slot: (row [N], session [N], similarity [N],
        decay [N]) with at most ``k`` per row."""
        q_row, q_item, q_w, q_d = self.query(state)
        n_distinct = torch.bincount(q_row, minlength=state[0].shape[0]).double()
        owner, entry = csr_expand(self.is_ptr, q_item)
        n_ses = self.priority.numel()
        key, inv = torch.unique(q_row[owner] * n_ses + self.is_ses[entry], return_inverse=True)
        sim = torch.zeros(key.numel(), dtype=torch.float64, device=key.device)
        sim.index_add_(0, inv, q_w[owner])
        decay = torch.zeros_like(sim)
        decay.scatter_reduce_(0, inv, q_d[owner], "amax", include_self=False)
        row, ses = key // n_ses, key % n_ses  # sorted by (row, session)
        sim = sim / n_distinct[row]
        if self.sample_size > 0:
            keep = group_rank(row, self.priority[ses]) < self.sample_size
            row, ses, sim, decay = row[keep], ses[keep], sim[keep], decay[keep]
        keep = group_rank(row, sim) < self.k
        return row[keep], ses[keep], sim[keep], decay[keep]

    def sparse_scores(self, state: State) -> SparseScores:
        row, ses, sim, decay = self.neighbours(state)
        base = self.pop_fallback_scores() if self.pop_fallback else torch.zeros_like(self.pop)
        owner, entry = csr_expand(self.si_ptr, ses)
        key = row[owner] * self.n_items + self.si_item[entry]  # (row, item) of each vote
        key, inv = torch.unique(key, return_inverse=True)
        votes = torch.zeros(key.numel(), dtype=torch.float64, device=key.device)
        votes.index_add_(0, inv, (sim * decay)[owner])
        keep = votes > 0
        key = key[keep]
        return SparseScores(base, key // self.n_items, key % self.n_items, votes[keep])
