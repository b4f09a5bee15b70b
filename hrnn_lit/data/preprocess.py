"""The paper's preprocessing (docs/design.md §5) on the canonical events frame.

Canonical frame: one row per event, columns ``user``, ``item``, ``ts`` (Unix seconds, int)
and optionally ``type`` (interaction type, int), in file order. Ids may be ints or strings.
Every step keeps file order among equal keys (stable sorts), so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from hrnn_lit.errors import DataError

SPLITS = ("train", "test", "valid_train", "valid_test")


@dataclass(frozen=True)
class Splits:
    """Last-session-out splits; each frame has user, item, ts, session, sorted by them."""

    train: pl.DataFrame
    test: pl.DataFrame
    valid_train: pl.DataFrame
    valid_test: pl.DataFrame

    def items(self) -> dict[str, pl.DataFrame]:
        return {name: getattr(self, name) for name in SPLITS}


def sessionize(events: pl.DataFrame, session_gap: int) -> pl.DataFrame:
    """Sort by (user, ts) stably and number sessions globally: a new one at a user change or
    when the idle gap exceeds ``session_gap`` seconds."""
    df = events.sort(["user", "ts"], maintain_order=True)
    new = (pl.col("user") != pl.col("user").shift(1)) | (
        (pl.col("ts") - pl.col("ts").shift(1)) > session_gap
    )
    return df.with_columns((new.fill_null(True).cast(pl.Int64).cum_sum() - 1).alias("session"))


def _nonempty(df: pl.DataFrame, step: str, source: str) -> pl.DataFrame:
    if df.height == 0:
        raise DataError(f"{source}: preprocessing step '{step}' left no events")
    return df


def filter_events(
    events: pl.DataFrame,
    *,
    session_gap: int = 1800,
    drop_types: list[int] | tuple[int, ...] = (4,),
    dedupe: bool = True,
    min_item_support: int = 20,
    min_session_len: int = 3,
    min_user_sessions: int = 5,
    max_user_sessions: int | None = 200,
    source: str = "data",
) -> pl.DataFrame:
    """Steps 1-6 of docs/design.md §5, each applied once, in the reference order."""
    df = _nonempty(events, "read", source)
    has_type = "type" in df.columns
    if has_type and drop_types:
        df = _nonempty(df.filter(~pl.col("type").is_in(list(drop_types))), "drop_types", source)
    df = sessionize(df, session_gap)
    if dedupe:
        key = ["session", "item", "type"] if has_type else ["session", "item"]
        df = df.unique(subset=key, keep="first", maintain_order=True)
    if min_item_support > 1:
        support = pl.len().over("item")
        df = _nonempty(df.filter(support >= min_item_support), "min_item_support", source)
    if min_session_len > 1:
        df = _nonempty(
            df.filter(pl.len().over("session") >= min_session_len), "min_session_len", source
        )
    n_sessions = pl.col("session").n_unique().over("user")
    keep = n_sessions >= min_user_sessions
    if max_user_sessions is not None:
        keep = keep & (n_sessions < max_user_sessions)
    df = _nonempty(df.filter(keep), "user_sessions", source)
    return df.select(["user", "item", "ts", "session"])


def last_session_out(
    df: pl.DataFrame, min_test_session_len: int = 2
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each user's last session goes to test; test keeps only items seen in train, then
    sessions with at least ``min_test_session_len`` events."""
    is_last = pl.col("session") == pl.col("session").max().over("user")
    train = df.filter(~is_last)
    test = df.filter(is_last)
    test = test.filter(pl.col("item").is_in(train.get_column("item").unique().implode()))
    test = test.filter(pl.len().over("session") >= min_test_session_len)
    return train, test


def preprocess(
    events: pl.DataFrame,
    *,
    min_test_session_len: int = 2,
    source: str = "data",
    **filters,
) -> Splits:
    """Filters (steps 1-6) then the test and validation splits (step 7)."""
    df = filter_events(events, source=source, **filters)
    train, test = last_session_out(df, min_test_session_len)
    valid_train, valid_test = last_session_out(train, min_test_session_len)
    for name, frame in (("train", train), ("test", test), ("valid_train", valid_train)):
        _nonempty(frame, f"split:{name}", source)
    return Splits(train=train, test=test, valid_train=valid_train, valid_test=valid_test)


def split_stats(frame: pl.DataFrame) -> dict[str, int]:
    """Users, items, sessions and events of one split (the paper's Table 1 columns)."""
    return {
        "users": frame.get_column("user").n_unique(),
        "items": frame.get_column("item").n_unique(),
        "sessions": frame.get_column("session").n_unique(),
        "events": frame.height,
    }
