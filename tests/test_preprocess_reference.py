"""preprocess() against an independent pure-Python reading of docs/design.md §5 steps 1-7.

The reference below uses only lists, dicts and sets. It runs on a synthetic XING file whose
features (deletes, duplicates, equal timestamps, rare items, users with too few and too many
sessions) are asserted to be present, so every step of the pipeline is exercised.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl
import pytest

from hrnn_lit.data.preprocess import preprocess, split_stats
from hrnn_lit.data.sources import read_xing
from hrnn_lit.data.synthetic_xing import write_xing_file
from hrnn_lit.errors import DataError

GAP, MIN_ITEM, MIN_LEN, MIN_USER, MAX_USER, MIN_TEST = 1800, 20, 3, 5, 200, 2

Event = tuple[int, int, int, int]  # user, item, ts, session


def _read_rows(path: Path) -> list[tuple[int, int, int, int]]:
    """(user, item, type, ts) in file order, via the csv module."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        return [
            (
                int(r["user_id"]),
                int(r["item_id"]),
                int(r["interaction_type"]),
                int(r["created_at"]),
            )
            for r in reader
        ]


def _split(events: list[Event]) -> tuple[list[Event], list[Event]]:
    last: dict[int, int] = {}
    for user, _, _, session in events:
        last[user] = max(last.get(user, session), session)
    train = [e for e in events if e[3] != last[e[0]]]
    test = [e for e in events if e[3] == last[e[0]]]
    train_items = {e[1] for e in train}
    test = [e for e in test if e[1] in train_items]
    length = Counter(e[3] for e in test)
    return train, [e for e in test if length[e[3]] >= MIN_TEST]


def reference(rows: list[tuple[int, int, int, int]]) -> tuple[dict[str, list[Event]], dict]:
    """docs/design.md §5 steps 1-7; also returns what each step removed (to check the data)."""
    removed: dict[str, int] = {}
    kept = [r for r in rows if r[2] != 4]
    removed["deletes"] = len(rows) - len(kept)
    kept.sort(key=lambda r: (r[0], r[3]))  # list.sort is stable: equal times keep file order

    sessions: list[tuple[int, int, int, int, int]] = []  # user, item, type, ts, session
    session = -1
    for i, (user, item, kind, ts) in enumerate(kept):
        if i == 0 or user != kept[i - 1][0] or ts - kept[i - 1][3] > GAP:
            session += 1
        sessions.append((user, item, kind, ts, session))

    seen: set[tuple[int, int, int]] = set()
    deduped = []
    for row in sessions:
        key = (row[4], row[1], row[2])
        if key not in seen:
            seen.add(key)
            deduped.append(row)
    removed["duplicates"] = len(sessions) - len(deduped)

    support = Counter(r[1] for r in deduped)
    by_item = [r for r in deduped if support[r[1]] >= MIN_ITEM]
    removed["rare_item_events"] = len(deduped) - len(by_item)

    length = Counter(r[4] for r in by_item)
    by_len = [r for r in by_item if length[r[4]] >= MIN_LEN]

    user_sessions: dict[int, set[int]] = defaultdict(set)
    for r in by_len:
        user_sessions[r[0]].add(r[4])
    n_sess = {u: len(s) for u, s in user_sessions.items()}
    removed["few_session_users"] = sum(1 for n in n_sess.values() if n < MIN_USER)
    removed["many_session_users"] = sum(1 for n in n_sess.values() if n >= MAX_USER)
    final = [(r[0], r[1], r[3], r[4]) for r in by_len if MIN_USER <= n_sess[r[0]] < MAX_USER]

    train, test = _split(final)
    valid_train, valid_test = _split(train)
    splits = {"train": train, "test": test, "valid_train": valid_train, "valid_test": valid_test}
    return splits, removed


def _stats(events: list[Event]) -> dict[str, int]:
    return {
        "users": len({e[0] for e in events}),
        "items": len({e[1] for e in events}),
        "sessions": len({e[3] for e in events}),
        "events": len(events),
    }


def _sessions(events: list[tuple]) -> Counter:
    """Multiset of sessions, each the ordered tuple of its (user, item, ts): independent of
    how sessions are numbered, sensitive to their content and order."""
    grouped: dict[int, list] = defaultdict(list)
    for user, item, ts, session in events:
        grouped[session].append((user, item, ts))
    return Counter(tuple(v) for v in grouped.values())


@pytest.fixture(scope="module")
def xing_file(tmp_path_factory) -> Path:
    """The small synthetic preset plus one user whose steps sit exactly on the 1800 s
    boundary (same session) and one past it (new session)."""
    path = write_xing_file(tmp_path_factory.mktemp("xing") / "interactions.csv", seed=3)
    popular = [item for item, _ in Counter(r[1] for r in _read_rows(path)).most_common(4)]
    t, lines = 1_450_000_000, []
    for _ in range(8):
        for step, item in zip((0, GAP, GAP, 0), popular):
            t += step
            lines.append(f"999999999\t{item}\t1\t{t}\n")
        t += GAP + 1
    with path.open("a") as fh:
        fh.writelines(lines)
    return path


def test_generated_file_exercises_every_step(xing_file: Path) -> None:
    rows = _read_rows(xing_file)
    _, removed = reference(rows)
    assert all(n > 0 for n in removed.values()), removed
    by_user_ts = Counter((r[0], r[3]) for r in rows if r[2] != 4)
    assert any(n > 1 for n in by_user_ts.values()), "no equal timestamps within a user"
    assert {r[2] for r in rows} == {1, 2, 3, 4}


def test_preprocess_matches_reference(xing_file: Path) -> None:
    expected, _ = reference(_read_rows(xing_file))
    got = preprocess(read_xing(xing_file)).items()
    for name, events in expected.items():
        frame = got[name]
        assert split_stats(frame) == _stats(events), name
        rows = list(frame.select(["user", "item", "ts", "session"]).iter_rows())
        assert Counter(r[:3] for r in rows) == Counter(e[:3] for e in events), name
        assert _sessions(rows) == _sessions(events), name
        # frames are in (user, ts) order with equal times in file order, like the reference
        assert [r[:3] for r in rows] == [e[:3] for e in events], name
    both = pl.concat([got["train"], got["test"]])
    assert split_stats(both)["users"] == got["train"].get_column("user").n_unique()


def _frame(rows: list[tuple[int, int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["user", "item", "ts", "type"], orient="row")


def _dense(users: int, sessions: int, items: int = 3, type_: int = 1) -> list:
    """Every user has ``sessions`` sessions of ``items`` events on items 0..items-1."""
    rows = []
    for u in range(users):
        for s in range(sessions):
            for i in range(items):
                rows.append((u, i, 10_000 * s + 10 * i, type_))
    return rows


@pytest.mark.parametrize(
    ("rows", "step"),
    [
        (_dense(10, 6, type_=4), "drop_types"),
        ([(u, u * 10 + i, 10 * i, 1) for u in range(5) for i in range(5)], "min_item_support"),
        (_dense(10, 6, items=2), "min_session_len"),
        (_dense(10, 4), "user_sessions"),
        (_dense(10, 250), "user_sessions"),
    ],
)
def test_filter_that_empties_the_data_is_named(rows: list, step: str) -> None:
    with pytest.raises(DataError, match=step) as info:
        preprocess(_frame(rows), source="interactions.csv")
    message = str(info.value)
    assert "interactions.csv" in message and "\n" not in message
