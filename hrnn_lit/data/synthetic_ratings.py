"""Synthetic rating logs in the MovieLens ``ratings.csv`` format (``data=synthetic_ratings``).

A rating log is the opposite of a click log in one respect that matters here: a user rates
an item once. There are no repeat targets, within a session or across sessions, so a model
that wins by re-recommending what a user already had finds nothing; what is left to learn
is popularity and taste. The generator makes both, and makes taste move:

- **Catalogue.** ``n_items`` items, each with a latent factor vector (``n_factors``
  dimensions) and a popularity bias ``-zipf_exponent * log(rank + 1)`` for a random rank:
  before taste, P(item) is Zipf-like, a long tail of rarely rated items.
- **Drifting taste.** Each user has a taste vector that moves a little at every session
  start: ``u_{s+1} = sqrt(1 - drift^2) u_s + drift * noise`` (a stationary AR(1) walk, so
  the taste correlation between sessions ``d`` apart is about ``(1 - drift^2)^(d/2)``).
  Recent sessions say more about the next one than old ones, and the current session's
  items say more than the user's average.
- **Choice.** A session's items are a Plackett-Luce draw without replacement from the
  logits ``taste_scale * <u_s, v_i> + bias_i`` over the items the user has not rated yet
  (Gumbel top-k), in the drawn order. Each rating (0.5 to 5 in half stars, as MovieLens)
  rises with the taste affinity; the pipeline ignores it.
- **Time.** ``1 + Geometric`` sessions per user (mean ``mean_sessions``), ``Geometric``
  ratings per session (mean ``mean_session_len``; one-rating sessions are dropped by
  preprocessing). Ratings in a session are 1 to 1799 s apart, sessions at least 1801 s
  after the previous one's last rating (mean ``mean_gap_days`` days), so idle-gap
  sessionising at 1800 s (the ``session_aware`` preset) recovers the generated sessions.

The sampling loops over users in blocks and, inside a block, over session index (the
draws of all the block's users' j-th sessions are one array operation). Each session
scores the whole catalogue, so the cost grows as sessions x items: the default size takes
one to two seconds, 10k users x 10k items (470k ratings) about 50 s on a shared 2-core
machine. :func:`simulate` returns the frame with the generated session ids and the
latent factors (for tests); :func:`write_ratings_file` writes the MovieLens
columns ``userId,movieId,rating,timestamp`` (comma-separated, a header, sorted by user
then movie as the real file is), read by the ``events`` source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import polars as pl

from hrnn_lit.errors import ConfigError

HEADER = ("userId", "movieId", "rating", "timestamp")
_BLOCK_CELLS = 1 << 22  # users x items cells per block (bounds the memory of a block)


@dataclass(frozen=True)
class RatingsSpec:
    """Generator parameters (see the module docstring)."""

    n_users: int = 2_000
    n_items: int = 3_000
    n_factors: int = 8
    mean_sessions: float = 8.0
    max_sessions: int = 100
    mean_session_len: float = 6.0
    max_session_len: int = 60
    taste_scale: float = 3.0  # weight of taste against popularity in the logits
    drift: float = 0.35  # share of the taste replaced by fresh noise at each session start
    zipf_exponent: float = 1.0
    mean_step_s: float = 120.0  # mean seconds between ratings of a session (capped < 1800)
    mean_gap_days: float = 5.0  # mean idle time between a user's sessions (> 1800 s)
    start_ts: int = 1_100_000_000  # late 2004, inside MovieLens' span

    def check(self) -> None:
        if self.n_users < 1 or self.n_items < 2 or self.n_factors < 1:
            raise ConfigError("synthetic ratings: n_users >= 1, n_items >= 2, n_factors >= 1")
        if self.mean_sessions <= 1 or self.mean_session_len < 1:
            raise ConfigError(
                "synthetic ratings: mean_sessions must be > 1 and mean_session_len >= 1"
            )
        if not 0.0 <= self.drift <= 1.0:
            raise ConfigError(f"synthetic ratings: drift must be in [0, 1], got {self.drift}")


@dataclass(frozen=True)
class Simulation:
    """A generated log: ``frame`` (the file's columns plus ``session``, the generated
    session's global index, in user, session, draw order), the item factors and
    popularity bias (rows by item index; ``item_index`` maps movieId to it)."""

    frame: pl.DataFrame
    item_factors: np.ndarray
    item_bias: np.ndarray
    item_ids: np.ndarray

    def item_index(self, movie_ids: np.ndarray) -> np.ndarray:
        order = np.argsort(self.item_ids)
        return order[np.searchsorted(self.item_ids, movie_ids, sorter=order)]


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sums restarting at each index where ``starts`` is True."""
    total = np.cumsum(values)
    head = np.maximum.accumulate(np.where(starts, np.arange(len(values)), 0))
    return total - total[head] + values[head]


def simulate(spec: RatingsSpec, seed: int = 0) -> Simulation:
    """Generate the log (deterministic in ``spec`` and ``seed``)."""
    spec.check()
    rng = np.random.default_rng(seed)
    n_users, n_items, k = spec.n_users, spec.n_items, spec.n_factors
    factors = (rng.standard_normal((n_items, k)) / np.sqrt(k)).astype(np.float32)
    bias = (-spec.zipf_exponent * np.log1p(rng.permutation(n_items))).astype(np.float32)
    n_sess = np.minimum(
        rng.geometric(1.0 / (spec.mean_sessions - 1), n_users) + 1, spec.max_sessions
    )
    keep = np.sqrt(1.0 - spec.drift**2)

    users, sess_j, items, affinity = [], [], [], []
    block = max(1, _BLOCK_CELLS // n_items)
    for lo in range(0, n_users, block):
        ids = np.arange(lo, min(lo + block, n_users))
        taste = rng.standard_normal((len(ids), k)).astype(np.float32)
        rated = np.zeros((len(ids), n_items), dtype=bool)
        n_rated = np.zeros(len(ids), dtype=np.int64)
        for j in range(int(n_sess[ids].max())):
            rows = np.flatnonzero(n_sess[ids] > j)
            if j > 0:
                noise = rng.standard_normal((len(rows), k)).astype(np.float32)
                taste[rows] = keep * taste[rows] + spec.drift * noise
            length = np.minimum(
                rng.geometric(1.0 / spec.mean_session_len, len(rows)), spec.max_session_len
            )
            length = np.minimum(length, n_items - n_rated[rows])
            live = length > 0
            rows, length = rows[live], length[live]
            if len(rows) == 0:
                continue
            aff = taste[rows] @ factors.T  # (rows, items)
            # Gumbel top-k: logits + Gumbel noise = logits - log(Exp(1)), in draw order
            key = spec.taste_scale * aff + bias
            key -= np.log(np.maximum(rng.standard_exponential(aff.shape, dtype=np.float32), 1e-30))
            key[rated[rows]] = -np.inf
            top = int(length.max())
            cand = np.argpartition(key, n_items - top, axis=1)[:, n_items - top :]
            cand = np.take_along_axis(
                cand, np.argsort(-np.take_along_axis(key, cand, axis=1), axis=1), axis=1
            )
            take = np.arange(top) < length[:, None]
            r = np.broadcast_to(rows[:, None], cand.shape)[take]
            picked = cand[take]
            rated[r, picked] = True
            n_rated[rows] += length
            users.append(ids[r])
            sess_j.append(np.full(len(r), j))
            items.append(picked)
            affinity.append(aff[np.searchsorted(rows, r), picked])

    user = np.concatenate(users)
    j = np.concatenate(sess_j)
    item = np.concatenate(items)
    aff = np.concatenate(affinity)
    order = np.lexsort((j, user))  # stable: draw order inside a session
    user, j, item, aff = user[order], j[order], item[order], aff[order]
    n_e = len(user)

    # times: steps of 1-1799 s inside a session, gaps > 1800 s between a user's sessions
    first = np.r_[True, (user[1:] != user[:-1]) | (j[1:] != j[:-1])]
    user_first = np.r_[True, user[1:] != user[:-1]]
    session = np.cumsum(first) - 1
    step = np.minimum(1 + rng.exponential(spec.mean_step_s, n_e), 1799).astype(np.int64)
    step[first] = 0
    offset = _segment_cumsum(step, first)
    starts = np.flatnonzero(first)
    duration = offset[np.r_[starts[1:] - 1, n_e - 1]]
    gap = 1801 + rng.exponential(spec.mean_gap_days * 86_400.0, len(starts)).astype(np.int64)
    advance = np.r_[0, duration[:-1]] + gap
    first_of_user = user_first[starts]
    advance[first_of_user] = rng.integers(0, 2 * 365 * 86_400, int(first_of_user.sum()))
    sess_start = spec.start_ts + _segment_cumsum(advance, first_of_user)
    ts = sess_start[session] + offset

    # ratings in half stars, higher with the taste affinity
    score = (aff - aff.mean()) / max(float(aff.std()), 1e-6)
    stars = 3.5 + 0.7 * score + 0.6 * rng.standard_normal(n_e)
    rating = np.clip(np.round(stars * 2) / 2, 0.5, 5.0)

    user_ids = np.arange(1, n_users + 1)
    item_ids = rng.permutation(max(3 * n_items, 1_000))[:n_items] + 1
    frame = pl.DataFrame(
        {
            "userId": user_ids[user],
            "movieId": item_ids[item],
            "rating": rating,
            "timestamp": ts,
            "session": session,
        }
    )
    return Simulation(frame=frame, item_factors=factors, item_bias=bias, item_ids=item_ids)


def generate_ratings(spec: RatingsSpec, seed: int = 0) -> pl.DataFrame:
    """The file's rows: ``userId, movieId, rating, timestamp``, sorted by user then movie."""
    frame = simulate(spec, seed).frame
    return frame.select(HEADER).sort(["userId", "movieId"])


def write_ratings_file(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a MovieLens-format ``ratings.csv`` and return its path; ``overrides`` are
    :class:`RatingsSpec` fields."""
    unknown = sorted(set(overrides) - {f.name for f in fields(RatingsSpec)})
    if unknown:
        raise ConfigError(f"unknown synthetic ratings parameter(s) {unknown}")
    frame = generate_ratings(replace(RatingsSpec(), **overrides), seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    frame.write_csv(tmp, include_header=True)
    tmp.replace(out)  # never a half-written file under the final name
    return out
