"""Seeded synthetic event streams with real cross-session structure (experimental draft)."""

from __future__ import annotations

import numpy as np
import polars as pl


def _zipf_ranks(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank r) proportional to (r + 1)^-exponent."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    return np.searchsorted(cdf / cdf[-1], rng.random(size), side="right").clip(0, n - 1)


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
    revisit_depth: int = 3,
    zipf_exponent: float = 1.0,
    seed: int = 0,
) -> pl.DataFrame:
    """Canonical events frame (user, item, ts) in time order per user."""
    if n_items < n_topics:
        raise ValueError(f"n_items ({n_items}) must be >= n_topics ({n_topics})")
    if not group_pool_size <= n_hot <= n_items:
        raise ValueError("need group_pool_size <= n_hot <= n_items")
    rng = np.random.default_rng(seed)
    per_topic = n_items // n_topics  # topic t holds items t, t + n_topics, ...

    group = rng.integers(0, n_groups, size=n_users)
    group_topics = rng.integers(0, n_topics, size=(n_groups, topics_per_user))
    hot = rng.choice(n_items, size=n_hot, replace=False)
    group_pool = hot[np.argsort(rng.random((n_groups, n_hot)), axis=1)[:, :group_pool_size]]
    user_topics = group_topics[group]
    topic_weights = rng.dirichlet(np.ones(topics_per_user), size=n_users)

    n_sessions = 2 + rng.poisson(max(mean_sessions - 2.0, 0.0), size=n_users)
    ses_user = np.repeat(np.arange(n_users), n_sessions)
    pick = (rng.random(ses_user.size)[:, None] > np.cumsum(topic_weights, 1)[ses_user]).sum(1)
    ses_topic = user_topics[ses_user, pick.clip(0, topics_per_user - 1)]
    ses_len = 2 + rng.geometric(1.0 / max(mean_session_len - 1.0, 1.0), size=ses_user.size) - 1

    ev_ses = np.repeat(np.arange(ses_user.size), ses_len)
    ev_user = ses_user[ev_ses]
    from_pool = rng.random(ev_ses.size) < p_repeat
    topic_item = ses_topic[ev_ses] + n_topics * _zipf_ranks(
        rng, per_topic, ev_ses.size, zipf_exponent
    )
    pool_rank = _zipf_ranks(rng, group_pool_size, ev_ses.size, pool_exponent)
    pool_item = group_pool[group[ev_user], pool_rank]
    item = np.where(from_pool, pool_item, topic_item)

    # Revisits: an event re-uses an item of one of the user's earlier sessions.
    ses_start = np.cumsum(ses_len) - ses_len
    user_first_ses = (np.cumsum(n_sessions) - n_sessions)[ses_user]
    n_earlier = (np.arange(ses_user.size) - user_first_ses)[ev_ses]
    back = (
        rng.geometric(1.0 / revisit_decay, size=ev_ses.size)
        if revisit_decay > 1
        else np.ones(ev_ses.size, np.int64)
    )
    back = np.minimum(back, n_earlier)
    is_ref = (rng.random(ev_ses.size) < p_revisit) & (n_earlier > 0)
    src_ses = ev_ses - back
    src = ses_start[src_ses] + (rng.random(ev_ses.size) * ses_len[src_ses]).astype(np.int64)
    src = np.where(is_ref, src, np.arange(ev_ses.size))
    for _ in range(revisit_depth):
        item = item[src]

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
    return pl.DataFrame({"user": ev_user, "item": item, "ts": ts}).cast(pl.Int64)
