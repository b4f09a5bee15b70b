"""Train and test files split by someone else, read as given (``data=presplit``).

The layout of the official GRU4Rec code and of session-rec: TSV files with a header and the
columns ``SessionId``, ``ItemId``, ``Time`` and, for session-aware data, ``UserId`` (names
configurable). Nothing is re-split or filtered: training uses every train event; the test
file's items unknown to train are removed (counted in ``n_dropped``) and every event of a
test session after its first is scored. With ``UserId``, a user's test sessions are
evaluated after a replay of the user's train sessions (session-aware protocol); without it,
every session is its own user, evaluated from the zero state, so only session models can run
(the session RNN, POP, Item-KNN; ``check_session_model``). A user's sessions are ordered by
their first time (then by their id); events in a session by time, then file order.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from hrnn_lit.data.columns import canonical_ids
from hrnn_lit.data.datamodule import SessionDataModule
from hrnn_lit.data.preprocess import Splits
from hrnn_lit.errors import ConfigError, DataError

USER_MODELS = ("user_pop",)  # built-in baselines that need users


def check_session_model(
    path: str, name: str | None, user_propagation: str | None, reset_at: str | None
) -> None:
    """One-line ConfigError where a model needs users and the files have none."""
    needs = (
        name in USER_MODELS
        or (user_propagation or "none") != "none"
        or (reset_at or "session") == "user"
    )
    if needs:
        raise ConfigError(
            f"{path}: no user column, so only session models can run on it (the session RNN, "
            f"pop, item_knn, vsknn); model {name!r} needs users "
            "(add a UserId column, or set data.user_col to the file's user column)"
        )


def _read(path: str | None, key: str, columns: dict[str, str | None], separator: str):
    """The file's events: columns session, item, ts (and user where the file has it), ids as
    text; (frame, whether the file has the user column)."""
    if not path:
        raise ConfigError(
            f"{key} is not set: data=presplit needs data.train_path and data.test_path"
        )
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found ({key})")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file ({key})")
    try:
        with p.open("rb") as f:
            first = f.readline().decode("utf-8-sig").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read the header line ({e})") from None
    header = [h.strip() for h in first.split(separator)]
    if not first:
        raise DataError(f"{p}: empty file, expected a header line with {_names(columns)}")
    missing = [c for role, c in columns.items() if role != "user" and c not in header]
    if missing:
        raise DataError(
            f"{p}: no column {missing[0]!r} (header: {', '.join(header)}); set "
            f"data.{_key_of(columns, missing[0])} to the file's column name"
        )
    has_user = columns.get("user") is not None and columns["user"] in header
    wanted = {role: c for role, c in columns.items() if role != "user" or has_user}
    try:
        df = pl.read_csv(
            p,
            separator=separator,
            columns=list(wanted.values()),
            schema_overrides={c: pl.String for c in wanted.values()},
            quote_char=None,
        )
    except (pl.exceptions.PolarsError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{p}: cannot be read as a {_sep(separator)}-separated file ({reason})"
        ) from None
    df = df.rename({c: role for role, c in wanted.items()})
    if df.height == 0:
        raise DataError(f"{p}: no events after the header line")
    for role, column in wanted.items():
        empty = df.get_column(role).str.strip_chars().str.len_bytes().fill_null(0) == 0
        if empty.any():
            line = int(empty.arg_true()[0]) + 2
            raise DataError(f"{p}: line {line}: empty {column!r}")
    ts = df.get_column("ts").str.strip_chars().cast(pl.Float64, strict=False)
    if ts.null_count() or not ts.is_finite().all():
        bad = ts.is_null() | ~ts.is_finite().fill_null(False)
        row = int(bad.arg_true()[0])
        raise DataError(
            f"{p}: line {row + 2}: {columns['ts']!r} must be a number (seconds), "
            f"got {df.get_column('ts')[row]!r}"
        )
    return df.with_columns(ts=ts), has_user


def _names(columns: dict[str, str | None]) -> str:
    return ", ".join(c for c in columns.values() if c)


def _key_of(columns: dict[str, str | None], column: str) -> str:
    role = next(r for r, c in columns.items() if c == column)
    return {"session": "session_col", "item": "item_col", "ts": "time_col"}[role]


def _sep(separator: str) -> str:
    return "tab" if separator == "\t" else repr(separator)


def read_presplit(
    train_path: str,
    test_path: str,
    session_col: str = "SessionId",
    item_col: str = "ItemId",
    time_col: str = "Time",
    user_col: str | None = "UserId",
    separator: str = "\t",
) -> tuple[pl.DataFrame, pl.DataFrame, bool]:
    """(train, test, has_users): frames with columns user, item, ts, session (session
    numbers follow each user's time order, the test file's after all of train's), and
    whether the files name users (both, or neither: one-line DataError otherwise)."""
    cols = {"session": session_col, "item": item_col, "ts": time_col, "user": user_col}
    train, train_users = _read(train_path, "data.train_path", cols, separator)
    test, test_users = _read(test_path, "data.test_path", cols, separator)
    if train_users != test_users:
        have, lack = (train_path, test_path) if train_users else (test_path, train_path)
        raise DataError(f"{lack}: no column {user_col!r}, which {have} has (both or neither)")
    frames = []
    for part, df in enumerate((train, test)):
        if not train_users:  # each session its own user
            df = df.with_columns(user=pl.col("session"))
        frames.append(df.with_columns(part=pl.lit(part, pl.Int8), row=pl.int_range(pl.len())))
    both = pl.concat(frames, how="diagonal")
    both = both.with_columns(  # one id form across both files
        *(canonical_ids(both.get_column(c)) for c in ("user", "item", "session"))
    )
    for part, path in enumerate((train_path, test_path)):
        users = (
            both.filter(pl.col("part") == part)
            .group_by("session")
            .agg(pl.col("user").n_unique().alias("n"))
        )
        several = users.filter(pl.col("n") > 1)
        if several.height:
            sid = several.get_column("session")[0]
            raise DataError(f"{path}: session {sid!r} has events of several users ({user_col!r})")
    # sessions numbered by (file, first time, id): a user's train sessions, then test ones
    first = both.group_by("part", "session").agg(pl.col("ts").min().alias("t0"))
    first = first.sort("part", "t0", "session").with_columns(
        number=pl.int_range(pl.len(), dtype=pl.Int64)
    )
    both = both.join(first.select("part", "session", "number"), on=["part", "session"])
    if not train_users:  # a test session is a new user, whatever its id in the train file
        both = both.with_columns(user=pl.col("number"))
    both = both.sort("part", "number", "ts", "row").select(
        "part", "user", "item", "ts", pl.col("number").alias("session")
    )
    train, test = (both.filter(pl.col("part") == k).drop("part") for k in (0, 1))
    return train, test, train_users


class PresplitDataModule(SessionDataModule):
    """``SessionDataModule`` on given train and test files (``read_presplit``): trains on
    the train file (``fit_split=train``; no validation split is cut from it) and tests on
    the test file. ``model_*``: the run's model keys, to refuse models that need users on
    files without them."""

    def __init__(
        self,
        train_path: str | None = None,
        test_path: str | None = None,
        session_col: str = "SessionId",
        item_col: str = "ItemId",
        time_col: str = "Time",
        user_col: str | None = "UserId",
        separator: str = "\t",
        model_name: str | None = None,
        model_user_propagation: str | None = None,
        model_reset_at: str | None = None,
        name: str = "presplit",
        fit_split: str = "train",
        **kwargs,
    ):
        if fit_split != "train":
            raise ConfigError(
                "data=presplit trains on the given train file and tests on the test file: "
                f"data.fit_split must be train (no validation split is cut), got {fit_split!r}"
            )
        super().__init__(source=None, name=name, path=None, fit_split="train", **kwargs)
        self.read_args = dict(
            train_path=train_path, test_path=test_path, session_col=session_col,
            item_col=item_col, time_col=time_col, user_col=user_col, separator=separator,
        )  # fmt: skip
        self.model_keys = (model_name, model_user_propagation, model_reset_at)
        self.path = train_path  # for messages
        self.has_users: bool | None = None

    def load_splits(self) -> Splits:
        train, test, self.has_users = read_presplit(**self.read_args)
        if not self.has_users:
            check_session_model(self.read_args["train_path"], *self.model_keys)
        self.notices.append(
            f"data {self.name}: {train.height} train and {test.height} test events read as "
            f"given ({'with' if self.has_users else 'without'} users)"
        )
        return Splits(train=train, test=test, valid_train=train, valid_test=test.clear())
