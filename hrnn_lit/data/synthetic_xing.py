"""Synthetic raw files in the exact XING (RecSys 2016) ``interactions.csv`` format.

The real data is no longer distributed, so tests and benchmarks use this generator. It
reproduces what the paper's preprocessing reacts to: type-4 deletes, repeated clicks and
follow-ups (bookmark/apply) on the same item within a session, equal timestamps, sessions
separated by idle gaps > 1800 s with events < 1800 s apart, heavy-tailed activity (most users
have one or two short sessions, a few have hundreds), a long tail of rare items, and
cross-session taste: each user draws most items from a personal pool within a few topics.
Everything is vectorised numpy; 10M rows take seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import polars as pl

from hrnn_lit.errors import ConfigError

HEADER = ("user_id", "item_id", "interaction_type", "created_at")


@dataclass(frozen=True)
class XingSpec:
    """Generator parameters. ``n_sessions`` per user ~ round(lognormal(mu, sigma)) clipped to
    [1, max_sessions]; actions per session ~ geometric with mean ``session_actions``."""

    n_users: int = 270_000
    n_items: int = 300_000
    sessions_mu: float = 0.3
    sessions_sigma: float = 1.05
    max_sessions: int = 400
    n_power_users: int = 20  # extra users with 150-300 sessions (the ">= 200" filter bites)
    session_actions: float = 10.0
    p_repeat: float = 0.15  # re-click on the session's current item (same type)
    p_followup: float = 0.07  # bookmark (2) or apply (3) on the current item
    p_delete: float = 0.05  # a new item that is deleted (type 4)
    p_same_ts: float = 0.05  # an event at the same second as the previous one
    mean_step_s: float = 90.0  # mean seconds between events in a session (capped < 1800)
    n_topics: int = 2_000
    topics_per_user: int = 2
    pool_size: int = 24  # items in a user's personal pool
    pool_skew: float = 2.0  # > 1: a few favourite pool items dominate
    topic_skew: float = 2.0  # > 1: popular items dominate inside a topic
    p_explore: float = 0.3  # share of new items drawn from the global popularity tail
    explore_skew: float = 1.8
    start_ts: int = 1_439_000_000  # mid-August 2015, like the challenge data
    span_days: float = 80.0


PRESETS: dict[str, XingSpec] = {
    # calibrated: preprocess() with the paper's defaults gives about 11.4k users, 60k items,
    # 94k sessions and 557k events in train + test (paper: 11.5k, 59k, 90k, 546k) from
    # about 6.8M raw rows (seeds 0 and 1)
    "paper": XingSpec(),
    # a few thousand users: a fraction of a second, every filter still bites
    "small": XingSpec(n_users=4_000, n_items=3_000, n_topics=30, n_power_users=6),
}


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sums restarting at each index where ``starts`` is True."""
    total = np.cumsum(values)
    head = np.maximum.accumulate(np.where(starts, np.arange(len(values)), 0))
    return total - total[head] + values[head]


def _rows_per_user(spec: XingSpec, rng: np.random.Generator, n: int = 200_000) -> float:
    sessions = _session_counts(spec, rng, n)
    return float(sessions.mean() * spec.session_actions)


def _session_counts(spec: XingSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    raw = np.rint(rng.lognormal(spec.sessions_mu, spec.sessions_sigma, n))
    counts = raw.clip(1, spec.max_sessions).astype(np.int64)
    power = min(spec.n_power_users, n)
    counts[rng.choice(n, power, replace=False)] = rng.integers(150, 301, power)
    return counts


def generate_xing(spec: XingSpec, seed: int = 0) -> pl.DataFrame:
    """The raw interactions as a frame with the XING header columns, in time order (ties in
    generation order)."""
    rng = np.random.default_rng(seed)
    n_users = spec.n_users
    n_sess = _session_counts(spec, rng, n_users)
    sess_user = np.repeat(np.arange(n_users), n_sess)
    n_s = len(sess_user)
    user_first_sess = np.r_[True, sess_user[1:] != sess_user[:-1]]

    # events: sessions laid out contiguously, first event of a session is always a new item
    length = rng.geometric(1.0 / spec.session_actions, n_s)
    ev_sess = np.repeat(np.arange(n_s), length)
    n_e = len(ev_sess)
    ev_user = sess_user[ev_sess]
    first = np.r_[True, ev_sess[1:] != ev_sess[:-1]]

    u = rng.random(n_e)
    repeat = ~first & (u < spec.p_repeat)
    follow = ~first & ~repeat & (u < spec.p_repeat + spec.p_followup)
    new = ~(repeat | follow)

    # new items: from the user's pool (topics) or from the global popularity tail
    per_topic = math.ceil(spec.n_items / spec.n_topics)
    topics = rng.integers(0, spec.n_topics, (n_users, spec.topics_per_user), dtype=np.int32)
    pick = rng.integers(0, spec.topics_per_user, (n_users, spec.pool_size))
    rank = (per_topic * rng.random((n_users, spec.pool_size)) ** spec.topic_skew).astype(np.int64)
    pool = (rank * spec.n_topics + np.take_along_axis(topics, pick, axis=1)) % spec.n_items
    del pick, rank
    slot = (spec.pool_size * rng.random(n_e) ** spec.pool_skew).astype(np.int64)
    explore = (spec.n_items * rng.random(n_e) ** spec.explore_skew).astype(np.int64)
    item = np.where(rng.random(n_e) < spec.p_explore, explore, pool[ev_user, slot])
    del pool, slot, explore
    kind = np.where(rng.random(n_e) < spec.p_delete, 4, 1)

    # repeats and follow-ups refer to the latest new item of the same session
    source = np.maximum.accumulate(np.where(new, np.arange(n_e), 0))
    item = item[source]
    kind = np.where(follow, rng.integers(2, 4, n_e), kind[source])

    # times: steps < 1800 s inside a session (some 0), gaps > 1800 s between sessions
    step = np.minimum(1 + rng.exponential(spec.mean_step_s, n_e), 1799).astype(np.int64)
    step[(rng.random(n_e) < spec.p_same_ts) | first] = 0
    offset = _segment_cumsum(step, first)
    duration = offset[np.r_[np.flatnonzero(first)[1:] - 1, n_e - 1]]
    span = spec.span_days * 86_400.0
    gap = 1801 + rng.exponential(span / n_sess[sess_user]).astype(np.int64)
    advance = np.r_[0, duration[:-1]] + gap
    advance[user_first_sess] = rng.integers(0, int(span / 4), n_users)
    sess_start = spec.start_ts + _segment_cumsum(advance, user_first_sess)
    ts = sess_start[ev_sess] + offset

    user_ids = rng.permutation(max(3 * n_users, 1_000))[:n_users] + 1
    item_ids = rng.permutation(max(3 * spec.n_items, 1_000))[: spec.n_items] + 1
    order = np.argsort(ts, kind="stable")
    return pl.DataFrame(
        {
            "user_id": user_ids[ev_user[order]],
            "item_id": item_ids[item[order]],
            "interaction_type": kind[order],
            "created_at": ts[order],
        }
    )


def write_xing_file(
    path: str | Path,
    n_users: int | None = None,
    n_items: int | None = None,
    seed: int = 0,
    *,
    scale: str = "small",
    n_rows: int | None = None,
    **overrides,
) -> Path:
    """Write a tab-separated XING ``interactions.csv`` and return its path.

    ``scale`` picks a preset (``small`` for tests, ``paper`` for the paper's statistics);
    ``n_users``, ``n_items`` and any :class:`XingSpec` field override it. With ``n_rows`` the
    user count is sized to produce at least that many rows and the file keeps the first
    ``n_rows`` in time order (for benchmarks that need an exact size).
    """
    if scale not in PRESETS:
        raise ConfigError(f"scale must be one of {sorted(PRESETS)}, got {scale!r}")
    unknown = sorted(set(overrides) - {f.name for f in fields(XingSpec)})
    if unknown:
        raise ConfigError(f"unknown synthetic XING parameter(s) {unknown}")
    spec = replace(PRESETS[scale], **overrides)
    if n_users is not None:
        spec = replace(spec, n_users=n_users)
    if n_items is not None:
        spec = replace(spec, n_items=n_items)
    if n_rows is not None:
        per_user = _rows_per_user(spec, np.random.default_rng(seed + 1))
        spec = replace(spec, n_users=math.ceil(1.03 * n_rows / per_user))
    frame = generate_xing(spec, seed)
    while n_rows is not None and frame.height < n_rows:
        spec = replace(spec, n_users=math.ceil(1.05 * spec.n_users * n_rows / frame.height))
        frame = generate_xing(spec, seed)
    if n_rows is not None:
        frame = frame.head(n_rows)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(out, separator="\t", include_header=True)
    return out
