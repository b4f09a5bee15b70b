"""Seeded synthetic event streams with real cross-session structure.

The embedded default dataset (``data=synthetic``): a scaled-down stand-in for XING job
clicks, built so that a user's past sessions carry information that the current session
does not. Everything is vectorised numpy (no per-user or per-event Python loop).

Structure, from the catalogue up:

- **Catalogue.** Items are split into ``n_topics`` topics (job categories); inside a topic
  item popularity is Zipf(``zipf_exponent``).
- **Persistent taste.** Users belong to ``n_groups`` taste groups. A group has
  ``topics_per_user`` topics and a pool of ``group_pool_size`` favourite items drawn from a
  shared set of ``n_hot`` items (so one item is a favourite of several groups), with sharp
  Zipf(``pool_exponent``) weights in a group-specific order. Each session follows one of
  the user's topics; each of its events is, with probability ``p_repeat``, one of the
  group's favourites, otherwise a popular item of the session's topic. One click says
  little about the group; a user's past sessions say a lot.
- **Repeat consumption across sessions** (the signal HRNN exploits on XING, where users
  come back to the postings they looked at before). With probability ``p_revisit`` an
  event of a user's second or later session re-visits an item of one of that user's
  earlier sessions: the session ``d`` back, ``d ~ Geometric(1 / revisit_decay)`` capped at
  the user's first session (``revisit_decay = 1``: always the previous session), and a
  uniformly chosen event of it. Revisits of revisits resolve to the original item, so an
  item can stay with a user for many sessions. Which items these are is specific to the
  user: the user state of a hierarchical model, built from the previous sessions, can
  carry them; a session-only model cannot know them.
- **Time.** Idle gaps of 1 hour to 5 days between sessions and 5 seconds to 10 minutes
  between clicks, so idle-gap sessionising (1800 s) recovers the generated sessions.
  Repeated items inside a session are left in; preprocessing's dedupe removes them.

- **Independent sessions** (``independent_sessions=True``, with ``p_revisit=0``): every
  session draws its own group and topic, so a user's past says nothing about the next
  session (the control setting where history cannot help).

Users have ``2 + Poisson(mean_sessions - 2)`` sessions of ``1 + Geometric`` events with mean
``mean_session_len`` (at least 2). The function's defaults keep the features added later
(``p_revisit``) off and reproduce the earlier generator draw for draw; the default dataset
is ``conf/data/synthetic.yaml``.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def _zipf_ranks(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank r) proportional to (r + 1)^-exponent."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    return np.searchsorted(cdf / cdf[-1], rng.random(size), side="right").clip(0, n - 1)


def _revisit_sources(
    rng: np.random.Generator,
    ses_len: np.ndarray,
    n_sessions: np.ndarray,
    p_revisit: float,
    revisit_decay: float,
) -> np.ndarray:
    """For every event, the index of the event whose item it takes (itself if not a revisit).

    Sessions are numbered globally, a user's sessions consecutive and in time order, so the
    session ``d`` back of session ``s`` is ``s - d``. Sources always lie in earlier
    sessions, so following source links ends at a non-revisit; pointer jumping
    (``src = src[src]``) gets there in O(log depth) vectorised passes.
    """
    n_ses = ses_len.size
    ses_start = np.cumsum(ses_len) - ses_len
    ev_ses = np.repeat(np.arange(n_ses), ses_len)
    n_events = ev_ses.size
    user_first_ses = np.repeat(np.cumsum(n_sessions) - n_sessions, n_sessions)
    n_earlier = (np.arange(n_ses) - user_first_ses)[ev_ses]
    if revisit_decay > 1.0:
        back = rng.geometric(1.0 / revisit_decay, size=n_events)
    else:
        back = np.ones(n_events, np.int64)
    back = np.minimum(back, np.maximum(n_earlier, 1))
    is_revisit = (rng.random(n_events) < p_revisit) & (n_earlier > 0)
    src_ses = np.where(is_revisit, ev_ses - back, ev_ses)
    offset = (rng.random(n_events) * ses_len[src_ses]).astype(np.int64)
    src = np.where(is_revisit, ses_start[src_ses] + offset, np.arange(n_events))
    while True:
        nxt = src[src]
        if np.array_equal(nxt, src):
            return src
        src = nxt


def generate_events(
    n_users: int = 2000,
    n_items: int = 4000,
    n_topics: int = 40,
    n_groups: int = 50,
    topics_per_user: int = 2,
    n_hot: int = 300,
    group_pool_size: int = 30,
    pool_exponent: float = 1.2,
    mean_sessions: float = 8.0,
    mean_session_len: float = 6.0,
    p_repeat: float = 0.5,
    p_revisit: float = 0.0,
    revisit_decay: float = 1.0,
    zipf_exponent: float = 1.0,
    independent_sessions: bool = False,
    seed: int = 0,
) -> pl.DataFrame:
    """Canonical events frame (user, item, ts) in time order per user (see the module
    docstring for the structure each parameter controls)."""
    if n_items < n_topics:
        raise ValueError(f"n_items ({n_items}) must be >= n_topics ({n_topics})")
    if not group_pool_size <= n_hot <= n_items:
        raise ValueError("need group_pool_size <= n_hot <= n_items")
    if not 0.0 <= p_revisit <= 1.0 or not 0.0 <= p_repeat <= 1.0:
        raise ValueError("p_repeat and p_revisit must lie in [0, 1]")
    if independent_sessions and p_revisit > 0.0:
        raise ValueError("independent_sessions needs p_revisit = 0 (revisits link sessions)")
    if revisit_decay < 1.0:
        raise ValueError(f"revisit_decay must be >= 1 (mean sessions back), got {revisit_decay}")
    rng = np.random.default_rng(seed)
    per_topic = n_items // n_topics  # topic t holds items t, t + n_topics, ...

    group = rng.integers(0, n_groups, size=n_users)
    group_topics = rng.integers(0, n_topics, size=(n_groups, topics_per_user))
    hot = rng.choice(n_items, size=n_hot, replace=False)
    group_pool = hot[np.argsort(rng.random((n_groups, n_hot)), axis=1)[:, :group_pool_size]]
    user_topics = group_topics[group]
    topic_weights = rng.dirichlet(np.ones(topics_per_user), size=n_users)

    # Sessions: at least 2 per user, each of at least 2 events.
    n_sessions = 2 + rng.poisson(max(mean_sessions - 2.0, 0.0), size=n_users)
    ses_user = np.repeat(np.arange(n_users), n_sessions)
    pick = (rng.random(ses_user.size)[:, None] > np.cumsum(topic_weights, 1)[ses_user]).sum(1)
    ses_topic = user_topics[ses_user, pick.clip(0, topics_per_user - 1)]
    ses_len = 2 + rng.geometric(1.0 / max(mean_session_len - 1.0, 1.0), size=ses_user.size) - 1
    ses_group = group[ses_user]
    if independent_sessions:  # every session a fresh draw: a group, then one of its topics
        ses_group = rng.integers(0, n_groups, size=ses_user.size)
        ses_topic = group_topics[ses_group, rng.integers(0, topics_per_user, ses_user.size)]

    # Base items: a group favourite or a popular item of the session's topic.
    ev_ses = np.repeat(np.arange(ses_user.size), ses_len)
    ev_user = ses_user[ev_ses]
    from_pool = rng.random(ev_ses.size) < p_repeat
    topic_item = ses_topic[ev_ses] + n_topics * _zipf_ranks(
        rng, per_topic, ev_ses.size, zipf_exponent
    )
    pool_rank = _zipf_ranks(rng, group_pool_size, ev_ses.size, pool_exponent)
    pool_item = group_pool[ses_group[ev_ses], pool_rank]
    item = np.where(from_pool, pool_item, topic_item)

    # Time: gaps of 1 h to 5 days between sessions, 5 s to 10 min between clicks.
    first = np.r_[True, ev_ses[1:] != ev_ses[:-1]]
    gap = np.where(
        first,
        rng.integers(3_600, 5 * 86_400, size=ev_ses.size),
        rng.integers(5, 600, size=ev_ses.size),
    )
    user_first = np.r_[True, ev_user[1:] != ev_user[:-1]]
    base = 1_600_000_000 + rng.integers(0, 30 * 86_400, size=n_users)
    clock = np.cumsum(gap)
    ts = base[ev_user] + clock - clock[user_first][ev_user]

    # Revisits (drawn last, so p_revisit=0 leaves every earlier draw unchanged).
    if p_revisit > 0.0:
        item = item[_revisit_sources(rng, ses_len, n_sessions, p_revisit, revisit_decay)]
    return pl.DataFrame({"user": ev_user, "item": item, "ts": ts}).cast(pl.Int64)
