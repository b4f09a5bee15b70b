"""Non-neural baselines (docs/design.md §2): POP, user popularity, Item-KNN and V-SkNN.

Each baseline is a LightningModule that is *fitted* from the fit split's ``Steps`` with no
gradient step (``trainable = False``; ``run.py`` calls ``fit_data`` and then only
``trainer.validate`` / ``trainer.test``), and *evaluated* on exactly the chunks the recurrent
models see (docs/design.md §6): every slot replays its user's earlier sessions, then the scored
targets are ranked against the whole catalogue by the same ``RankCollector``.

Per-slot evaluation state follows the events a slot has walked through. At time step t a
valid slot: (1) on ``user_start`` forgets everything; on ``session_start`` opens a new session
and records the step's input (the session's first item); (2) if the step is scored, is asked
for scores with the input as the latest known item; (3) records the step's target, which is
the next step's input, or the last item of the session. So a user's earlier sessions count
in full (their last items included), and the current session counts up to the input.
Scores are float64, so integer counts plus a popularity fraction stay exact.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from hrnn_lit.data.batching import Chunk, Steps
from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.evaluator import Evaluation
from hrnn_lit.models.module import eval_gather, log_val

WEIGHTINGS = ("same", "div", "quadratic", "log")  # V-SkNN position weight in the query
SCORE_DECAYS = ("same", "div", "quadratic", "log")  # V-SkNN neighbour decay by match recency
SAMPLINGS = ("random", "recent")


# --------------------------------------------------------------------------- data helpers
def session_events(steps: Steps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All events of the sessions behind ``steps``, in order: (ptr [S+1], items [E],
    session_user [S]); session s holds ``items[ptr[s]:ptr[s+1]]``. A session's events are
    its steps' inputs plus the last step's target (sessions of one event have no step)."""
    n = len(steps)
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = np.r_[steps.session_start[1:], True]  # the step is its session's last
    per_step = 1 + ends.astype(np.int64)
    offset = np.cumsum(per_step) - per_step
    items = np.empty(int(per_step.sum()), np.int64)
    items[offset] = steps.input
    items[offset[ends] + 1] = steps.target[ends]
    ses = np.cumsum(steps.session_start) - 1
    n_ses = int(ses[-1]) + 1
    ptr = np.r_[0, np.cumsum(np.bincount(np.repeat(ses, per_step), minlength=n_ses))]
    return ptr.astype(np.int64), items, steps.user[steps.session_start].astype(np.int64)


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


def _check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key} must be an integer >= {minimum}, got {value!r}")


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"model.{key} must be one of {sorted(choices)}, got {value!r}")


# ------------------------------------------------------------------------------ the base
class BaselineRecommender(pl.LightningModule):
    """Shared fit/eval plumbing of the non-neural baselines.

    Subclasses implement ``fit_data`` (calling this one for the popularity counts),
    ``score_rows`` and, when they keep per-slot state, ``init_state`` / ``start_sessions`` /
    ``record``. Fitted tables are non-persistent buffers: they follow the module's device
    and are refitted from data, never loaded from a checkpoint.
    """

    trainable = False

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "baseline",
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
    ):
        super().__init__()
        _check_int("eval_block", eval_block, 1)
        self.n_items = int(n_items)
        self.ks = list(ks)
        self.ties = ties
        self.eval_block = eval_block
        counts = np.zeros(n_items) if item_counts is None else np.asarray(item_counts)
        self.register_buffer("pop", torch.as_tensor(counts, dtype=torch.float64), persistent=False)
        self.evaluation = Evaluation(ks, ties)
        self._slots = 0

    @property
    def eval_metrics(self) -> dict[str, dict[str, float]]:
        return self.evaluation.metrics

    @property
    def eval_outputs(self) -> dict[str, dict[str, Tensor]]:
        return self.evaluation.outputs

    # ------------------------------------------------------------------ fitting
    def fit_data(self, steps: Steps) -> None:
        """Popularity = number of events of each item in the fit split's sessions."""
        _, items, _ = session_events(steps)
        counts = np.bincount(items, minlength=self.n_items).astype(np.float64)
        self.pop = torch.as_tensor(counts, device=self.pop.device)

    def pop_fallback_scores(self) -> Tensor:
        """Popularity squeezed into (-1, 0): below every positive kNN score, ordered by
        popularity, so items no neighbour votes for are not one big tie."""
        return self.pop / (self.pop.max() + 1.0) - 1.0

    # ------------------------------------------------------------- slot state
    def init_state(self, n_slots: int, device: torch.device) -> None:
        """Allocate empty per-slot state (at the start of an evaluation pass)."""

    def start_sessions(self, session_start: Tensor, user_start: Tensor, inp: Tensor) -> None:
        """Reset slots at ``user_start``, open sessions at ``session_start`` (both masks
        are valid-only) and record those sessions' first items ``inp``."""

    def record(self, mask: Tensor, items: Tensor) -> None:
        """Append ``items`` to the current session of the slots in ``mask``."""

    def score_rows(self, rows: Tensor, inp: Tensor) -> Tensor:
        """Scores [len(rows), n_items] for slots ``rows`` whose latest item is ``inp[rows]``
        (state already holds it)."""
        raise NotImplementedError

    # --------------------------------------------------------------- evaluation
    def iter_scores(self, batch: Chunk):
        """Walk a chunk step by step, updating the slot state; yield (t, rows, scores) for
        the scored slots ``rows`` at time step t, in blocks of at most ``eval_block`` rows."""
        inp, tgt, valid, score = batch.input, batch.target, batch.valid, batch.score
        T, B = inp.shape
        if self._slots != B:
            self.init_state(B, inp.device)
            self._slots = B
        for t in range(T):
            if batch.any_start[t]:
                self.start_sessions(batch.session_start[t], batch.user_start[t], inp[t])
            if batch.n_scored:
                rows = torch.nonzero(score[t]).squeeze(1)
                for lo in range(0, rows.numel(), self.eval_block):
                    r = rows[lo : lo + self.eval_block]
                    yield t, r, self.score_rows(r, inp[t])
            self.record(valid[t], tgt[t])

    def on_validation_epoch_start(self) -> None:
        self._eval_begin()

    def validation_step(self, batch: Chunk, batch_idx: int) -> None:
        self._eval_chunk(batch)

    def on_validation_epoch_end(self) -> None:
        if len(self.evaluation.collector) or torch.distributed.is_initialized():
            log_val(self, self.evaluation.finish("val", eval_gather()))

    def on_test_epoch_start(self) -> None:
        self._eval_begin()

    def test_step(self, batch: Chunk, batch_idx: int) -> None:
        self._eval_chunk(batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation.finish("test", eval_gather()))

    def _eval_begin(self) -> None:
        """A fresh rank collector; forget all slot state."""
        self.evaluation.begin()
        self._slots = 0

    def _eval_chunk(self, batch: Chunk) -> None:
        with torch.autocast(batch.input.device.type, enabled=False):  # float scores
            for t, rows, scores in self.iter_scores(batch):
                self.evaluation.collector.add(
                    scores,
                    batch.target[t, rows],
                    batch.position[t, rows],
                    batch.history[t, rows],
                )


# ------------------------------------------------------------------------------- POP
class Pop(BaselineRecommender):
    """POP (paper baseline): every event gets the same ranking, items by their number of
    events in the fit split. No state; O(n_items) per scored event."""

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "pop",
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
    ):
        super().__init__(n_items, item_counts, name, ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])

    def score_rows(self, rows: Tensor, inp: Tensor) -> Tensor:
        return self.pop.expand(rows.numel(), -1)


# -------------------------------------------------------------------------- user POP
class UserPop(BaselineRecommender):
    """Personal popularity: score = (times the user had the item so far) + pop / (max_pop +
    1), so the user's own counts rank first and global popularity breaks their ties.

    "So far" = the user's earlier sessions (replayed in evaluation) plus the current
    session up to the input. State: a dense count matrix [B, n_items] (float32, exact up to
    2^24), rows zeroed at ``user_start``; O(1) per event to update, O(n_items) per scored
    event to score.
    """

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "user_pop",
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
    ):
        super().__init__(n_items, item_counts, name, ks, ties, eval_block)
        self.save_hyperparameters(ignore=["item_counts"])
        self._counts: Tensor | None = None

    def init_state(self, n_slots: int, device: torch.device) -> None:
        self._counts = torch.zeros(n_slots, self.n_items, device=device)

    def start_sessions(self, session_start: Tensor, user_start: Tensor, inp: Tensor) -> None:
        self._counts[user_start] = 0.0
        self.record(session_start, inp)

    def record(self, mask: Tensor, items: Tensor) -> None:
        rows = torch.nonzero(mask).squeeze(1)
        self._counts[rows, items[rows]] += 1.0  # one item per slot: no index repeats

    def score_rows(self, rows: Tensor, inp: Tensor) -> Tensor:
        tiebreak = self.pop / (self.pop.max() + 1.0)
        return self._counts[rows].to(torch.float64) + tiebreak


# --------------------------------------------------------------------------- Item-KNN
class ItemKNN(BaselineRecommender):
    """Item-KNN (paper baseline, as in GRU4Rec's evaluation): the score of item j for an
    event with input item i is the cosine similarity of their session-occurrence vectors
    in the fit split, sim(i, j) = |S_i & S_j| / sqrt(|S_i| |S_j|), S_i = the sessions
    containing i (sessions as sets). Scored from the input item only; no state.

    Only the ``k_neighbors`` most similar items per item are kept (ties: lower item index
    first; an item is not its own neighbour), in CSR form: memory O(n_items * k), never
    n_items^2. Items outside the input's neighbours score 0, or with ``pop_fallback``
    (default) rank below all neighbours by popularity. Whenever ``k_neighbors >= max(ks)``
    recall/MRR/NDCG@K equal those of the untruncated similarity (bar ties at the cut).

    Build: all within-session item pairs (sum over sessions of L^2 entries), counted with
    one ``np.unique``; top-k by one lexsort. Scoring: O(k + n_items) per event.
    """

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "item_knn",
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
        k_neighbors: int = 100,
        pop_fallback: bool = True,
    ):
        super().__init__(n_items, item_counts, name, ks, ties, eval_block)
        _check_int("k_neighbors", k_neighbors, 1)
        self.save_hyperparameters(ignore=["item_counts"])
        self.k_neighbors = k_neighbors
        self.pop_fallback = pop_fallback
        long = torch.int64
        self.register_buffer("nbr_ptr", torch.zeros(n_items + 1, dtype=long), persistent=False)
        self.register_buffer("nbr_item", torch.zeros(0, dtype=long), persistent=False)
        self.register_buffer("nbr_sim", torch.zeros(0, dtype=torch.float64), persistent=False)

    def fit_data(self, steps: Steps) -> None:
        super().fit_data(steps)
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

    def score_rows(self, rows: Tensor, inp: Tensor) -> Tensor:
        base = self.pop_fallback_scores() if self.pop_fallback else torch.zeros_like(self.pop)
        scores = base.repeat(rows.numel(), 1)
        owner, entry = csr_expand(self.nbr_ptr, inp[rows])
        scores[owner, self.nbr_item[entry]] = self.nbr_sim[entry]
        return scores


# ----------------------------------------------------------------------------- V-SkNN
class VSKNN(BaselineRecommender):
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
      ``fit_data`` (the fit ``Steps`` carry no time, so run.py cannot use it yet).
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

    State per slot: the user's last M events (a right-aligned buffer [B, M], M >= the
    longest query, doubled on demand) and the current session's length; reset at
    ``user_start``. Scoring a block of R rows is vectorised: (row, item) -> (row, session)
    pairs through the item->sessions CSR, aggregated with one ``torch.unique``, per-row
    sampling and top-k by two stable sorts, then (row, neighbour) -> items through the
    session->items CSR into the [R, n_items] score matrix. Cost per block: the number of
    (query item, training session containing it) pairs, plus R * n_items.
    """

    def __init__(
        self,
        n_items: int,
        item_counts: np.ndarray | list[int] | None = None,
        name: str = "vsknn",
        ks: list[int] | tuple[int, ...] = (5, 10, 20),
        ties: str = "conservative",
        eval_block: int = 1024,
        k: int = 100,
        sample_size: int = 0,
        sampling: str = "random",
        weighting: str = "div",
        weighting_score: str = "div",
        extend_length: int = 0,
        pop_fallback: bool = True,
        seed: int = 0,
    ):
        super().__init__(n_items, item_counts, name, ks, ties, eval_block)
        _check_int("k", k, 1)
        _check_int("sample_size", sample_size, 0)
        _check_int("extend_length", extend_length, 0)
        _check_choice("sampling", sampling, SAMPLINGS)
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("weighting_score", weighting_score, SCORE_DECAYS)
        self.save_hyperparameters(ignore=["item_counts"])
        self.k = k
        self.sample_size = sample_size
        self.sampling = sampling
        self.weighting = weighting
        self.weighting_score = weighting_score
        self.extend_length = extend_length
        self.pop_fallback = pop_fallback
        self.seed = seed
        long = torch.int64
        for key, size in (("is_ptr", n_items + 1), ("is_ses", 0), ("si_ptr", 1), ("si_item", 0)):
            self.register_buffer(key, torch.zeros(size, dtype=long), persistent=False)
        self.register_buffer("priority", torch.zeros(0, dtype=torch.float64), persistent=False)
        self._buf: Tensor | None = None
        self._ses_len: Tensor | None = None

    # ------------------------------------------------------------------ fitting
    def fit_data(self, steps: Steps, step_time: np.ndarray | None = None) -> None:
        """Index the fit split's sessions (as item sets) both ways. ``step_time`` (time of
        each step's target event) is needed only by ``sampling=recent``."""
        super().fit_data(steps)
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
    def init_state(self, n_slots: int, device: torch.device) -> None:
        width = max(16, self.extend_length)
        self._buf = torch.full((n_slots, width), -1, dtype=torch.int64, device=device)
        self._ses_len = torch.zeros(n_slots, dtype=torch.int64, device=device)

    def start_sessions(self, session_start: Tensor, user_start: Tensor, inp: Tensor) -> None:
        self._buf[user_start] = -1
        self._ses_len[session_start] = 0
        self.record(session_start, inp)

    def record(self, mask: Tensor, items: Tensor) -> None:
        rows = torch.nonzero(mask).squeeze(1)
        if rows.numel() == 0:
            return
        if int(self._ses_len[rows].max()) >= self._buf.shape[1]:  # grow: pad on the left
            pad = torch.full_like(self._buf, -1)
            self._buf = torch.cat([pad, self._buf], 1)
        self._buf[rows] = torch.cat([self._buf[rows, 1:], items[rows, None]], 1)
        self._ses_len[rows] += 1

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

    def query(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Distinct query items of each row: (row [Q], item [Q], weight [Q], decay [Q])
        sorted by (row, item); ``decay`` is the item's neighbour decay (last occurrence)."""
        buf = self._buf[rows]
        width = buf.shape[1]
        window = self._ses_len[rows].clamp(min=self.extend_length)
        n = torch.minimum(window, (buf >= 0).sum(1))  # events of the query
        pos = torch.arange(width, device=buf.device) - (width - n[:, None]) + 1  # 1-based
        keep = pos >= 1
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

    def neighbours(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The neighbour sessions of each row: (row [N], session [N], similarity [N],
        decay [N]) with at most ``k`` per row."""
        q_row, q_item, q_w, q_d = self.query(rows)
        n_distinct = torch.bincount(q_row, minlength=rows.numel()).double()
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

    def score_rows(self, rows: Tensor, inp: Tensor) -> Tensor:
        row, ses, sim, decay = self.neighbours(rows)
        base = self.pop_fallback_scores() if self.pop_fallback else torch.zeros_like(self.pop)
        votes = torch.zeros(rows.numel() * self.n_items, dtype=torch.float64, device=row.device)
        owner, entry = csr_expand(self.si_ptr, ses)
        votes.index_add_(0, row[owner] * self.n_items + self.si_item[entry], (sim * decay)[owner])
        votes = votes.view(rows.numel(), self.n_items)
        return torch.where(votes > 0, votes, base)
