"""Raw readers: each returns the canonical events frame that preprocessing expects.

Canonical frame: one row per event in file order, columns ``user``, ``item``, ``ts`` (Int64
Unix seconds) and, for XING only, ``type`` (Int64 interaction type). Ids and times are in
the canonical forms of hrnn_lit.data.columns (which also makes the checks every reader
shares); every bad input raises :class:`DataError` with a one-line message naming the file
and the problem.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from hrnn_lit.data.columns import (
    TIME_UNITS,
    YEAR_2100_S,
    Locate,
    canonical_ids,
    check_last_line,
    check_no_nulls,
    check_nonempty,
    check_parsed,
    collect,
    csv_header,
    existing_file,
    fail,
    first_row,
    id_column,
    line_after_header,
    parse_iso,
    polars_reason,
    require_columns,
    show,
    time_column,
)
from hrnn_lit.errors import ConfigError, DataError

XING_COLUMNS = {
    "user_id": "user",
    "item_id": "item",
    "created_at": "ts",
    "interaction_type": "type",
}
LASTFM_COLUMNS = ["user", "timestamp", "artid", "artname", "traid", "traname"]
SOURCE_KINDS = ("xing", "lastfm", "events")
EVENTS_OPTIONS = ("user_col", "item_col", "time_col", "time_unit", "separator")
_LASTFM_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# --------------------------------------------------------------------------- XING


def _xing_int_error(p: Path) -> DataError | None:
    """Slow path after a failed typed read: find the first non-integer value, if any."""
    lf = pl.scan_csv(p, separator="\t", quote_char=None, infer_schema=False)
    try:
        df = lf.select(list(XING_COLUMNS)).collect(engine="streaming")
    except pl.exceptions.PolarsError:
        return None
    for col in XING_COLUMNS:
        text = pl.col(col).str.strip_chars()
        row = first_row(df, text.is_not_null() & text.cast(pl.Int64, strict=False).is_null())
        if row is not None:
            value = df.get_column(col)[row]
            return fail(
                p,
                f"non-integer value {show(value)} in column {col!r} at {line_after_header(row)}",
            )
    return None


def _xing_canonical(p: Path) -> pl.DataFrame | None:
    """Slow path after a failed typed read: the columns as text, in canonical form; None
    when a value is not an integer even then (``_xing_int_error`` names it)."""
    lf = pl.scan_csv(p, separator="\t", quote_char=None, infer_schema=False)
    try:
        df = lf.select(list(XING_COLUMNS)).collect(engine="streaming")
    except pl.exceptions.PolarsError:
        return None
    cols = {}
    for raw, name in XING_COLUMNS.items():
        s = canonical_ids(df.get_column(raw))
        if s.dtype != pl.Int64:
            return None
        cols[name] = s
    return pl.DataFrame(cols)


def read_xing(path: str | Path) -> pl.DataFrame:
    """RecSys 2016 ``interactions.csv``: tab-separated with header, integer ids and types,
    ``created_at`` in Unix seconds. Returns columns user, item, ts, type (all Int64)."""
    p = existing_file(path)
    header = csv_header(p, "\t", None)
    require_columns(p, header, list(XING_COLUMNS), "\t")
    lf = pl.scan_csv(
        p,
        separator="\t",
        quote_char=None,
        infer_schema=False,
        schema_overrides={col: pl.Int64 for col in XING_COLUMNS},
    ).select([pl.col(raw).alias(name) for raw, name in XING_COLUMNS.items()])
    try:
        df = lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:  # spaces, 12.0, text: canonical form or error
        df = _xing_canonical(p)
        if df is None:
            raise (_xing_int_error(p) or fail(p, polars_reason(exc))) from None
    check_nonempty(p, df)
    check_no_nulls(p, df, {v: k for k, v in XING_COLUMNS.items()}, line_after_header)
    row = first_row(df, pl.col("ts") > YEAR_2100_S)
    if row is not None:
        raise fail(
            p,
            f"created_at {df.get_column('ts')[row]} at {line_after_header(row)} is after year"
            " 2100 in seconds: XING times must be Unix seconds (milliseconds?)",
        )
    row = first_row(df, pl.col("ts") < 0)
    if row is not None:
        raise fail(
            p,
            f"created_at {df.get_column('ts')[row]} at {line_after_header(row)} is negative:"
            " XING times must be Unix seconds",
        )
    check_last_line(p, df.get_column("ts"), "created_at", line_after_header)
    return df


def read_lastfm(path: str | Path) -> pl.DataFrame:
    """Last.fm 1K ``userid-timestamp-artid-artname-traid-traname.tsv``: tab-separated, no
    header, ISO-8601 UTC times. The item is the track MBID, or ``artist<TAB>track`` when the
    MBID is empty (a tab never occurs inside a field, so the join is unambiguous); rows with
    neither are dropped. Quoting is off: names contain quote characters."""
    p = existing_file(path)
    with p.open("rb") as fh:
        first = fh.readline().decode("utf-8", "replace").rstrip("\r\n")
    n_fields = len(first.split("\t"))
    if n_fields != len(LASTFM_COLUMNS):
        raise fail(
            p,
            f"expected {len(LASTFM_COLUMNS)} tab-separated columns "
            f"(userid, timestamp, artid, artname, traid, traname), found {n_fields} on line 1",
        )
    lf = pl.scan_csv(
        p,
        separator="\t",
        has_header=False,
        quote_char=None,
        infer_schema=False,
        new_columns=LASTFM_COLUMNS,
        encoding="utf8-lossy",
    )
    raw = collect(
        p, lf.select(["user", "timestamp", "artname", "traid", "traname"]), "Last.fm file"
    )

    def locate(row: int) -> str:
        return f"line {row + 1}"

    check_no_nulls(p, raw, {"user": "userid", "timestamp": "timestamp"}, locate)
    ts = parse_iso(raw.get_column("timestamp"), _LASTFM_FORMAT)
    check_parsed(p, raw.get_column("timestamp"), ts, "timestamp", locate, "2009-05-04T23:08:57Z")
    fallback = pl.concat_str([pl.col("artname").fill_null(""), pl.col("traname")], separator="\t")
    df = raw.select(
        pl.col("user"),
        pl.coalesce(pl.col("traid"), fallback).alias("item"),
        ts.alias("ts"),
    ).filter(pl.col("item").is_not_null())
    df = df.with_columns(
        user=canonical_ids(df.get_column("user")), item=canonical_ids(df.get_column("item"))
    )
    check_no_nulls(p, df, {"user": "userid"}, locate)
    return df.filter(pl.col("item").is_not_null())


# --------------------------------------------------------------------------- generic events


def _scan_events(
    p: Path, columns: list[str], separator: str | None
) -> tuple[pl.DataFrame, bool, Locate]:
    """Reads the three named columns; returns (frame, read_from_text, row locator)."""
    suffix = p.suffix.lower()
    if suffix == ".parquet" and separator is None:
        try:
            lf = pl.scan_parquet(p)
            found = lf.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise fail(p, f"cannot read Parquet file: {polars_reason(exc)}") from None
        require_columns(p, found, columns, None)
        return collect(p, lf.select(columns), "Parquet file"), False, lambda r: f"row {r + 1}"
    if separator is None:
        separator = {".csv": ",", ".tsv": "\t", ".txt": "\t"}.get(suffix)
        if separator is None:
            raise fail(
                p,
                f"unsupported file type {suffix or '(none)'!r}: expected .csv, .tsv, .txt or"
                " .parquet (or pass separator=)",
            )
    found = csv_header(p, separator, '"')
    require_columns(p, found, columns, separator)
    lf = pl.scan_csv(p, separator=separator, infer_schema=False).rename(lambda name: name.strip())
    return collect(p, lf.select(columns), "file"), True, line_after_header


def read_events(
    path: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    time_unit: str = "s",
    separator: str | None = None,
) -> pl.DataFrame:
    """Any events table (CSV, TSV/TXT or Parquet) with user, item and time columns; times in
    seconds, milliseconds or ISO-8601 text (``time_unit`` = s, ms or iso; Parquet Date and
    Datetime columns are used as they are). Text ids that are all integers become Int64."""
    if time_unit not in TIME_UNITS:
        raise ConfigError(f"time_unit must be one of {list(TIME_UNITS)}, got {time_unit!r}")
    p = existing_file(path)
    columns = list(dict.fromkeys([user_col, item_col, time_col]))
    if len(columns) != 3:
        raise ConfigError(f"user_col, item_col and time_col must differ, got {columns}")
    raw, from_text, locate = _scan_events(p, columns, separator)
    check_nonempty(p, raw)
    check_no_nulls(p, raw, {c: c for c in columns}, locate)
    ids = pl.DataFrame(
        {
            "user": id_column(p, raw.get_column(user_col), user_col, from_text),
            "item": id_column(p, raw.get_column(item_col), item_col, from_text),
        }
    )
    check_no_nulls(p, ids, {"user": user_col, "item": item_col}, locate)  # blank ids
    if from_text and time_unit != "iso":
        check_last_line(p, raw.get_column(time_col), time_col, locate)
    return ids.with_columns(
        ts=time_column(p, raw.get_column(time_col), time_col, time_unit, locate)
    )


def read_source(kind: str, path: str | Path, **options) -> pl.DataFrame:
    """Dispatch on ``kind``: xing, lastfm (no options) or events (read_events' options)."""
    if kind == "events":
        unknown = sorted(set(options) - set(EVENTS_OPTIONS))
        if unknown:
            raise ConfigError(f"source 'events' got unknown option(s) {unknown}")
        return read_events(path, **options)
    readers = {"xing": read_xing, "lastfm": read_lastfm}
    if kind not in readers:
        raise ConfigError(f"source kind must be one of {list(SOURCE_KINDS)}, got {kind!r}")
    if options:
        raise ConfigError(f"source {kind!r} takes no options, got {sorted(options)}")
    return readers[kind](path)
