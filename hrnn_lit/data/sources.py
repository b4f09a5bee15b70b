"""Raw readers: each returns the canonical events frame that preprocessing expects.

Canonical frame: one row per event in file order, columns ``user``, ``item``, ``ts`` (Int64
Unix seconds) and, for XING only, ``type`` (Int64 interaction type). Every bad input raises
:class:`DataError` with a one-line message naming the file and the problem; polars
exceptions never escape for the cases checked here.

Canonical ids, the same for every reader (``canonical_ids``):

1. text ids are stripped of surrounding whitespace; an id that is empty after stripping is a
   missing value (an error naming the line);
2. an integer written in decimal (``12``, ``-3``) is that integer, and so is a decimal with
   an all-zero fraction (``12.0``); a float column whose values are all whole numbers of at
   most 2**53 (exact in float64) holds integers; other floats are refused;
3. a column whose ids are all integers becomes Int64; otherwise it stays text, with the
   integer-valued ids written in their integer form (``1.0`` and `` 1`` are the id ``1``);
4. leading zeros keep the text form (``007`` is not ``7``: zero-padded codes are names).

Times in seconds must lie between 1970 and 2100; a last line without its newline whose time
has fewer digits than the line before is refused as cut (it would read as a 1970 time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from hrnn_lit.errors import ConfigError, DataError

XING_COLUMNS = {
    "user_id": "user",
    "item_id": "item",
    "created_at": "ts",
    "interaction_type": "type",
}
LASTFM_COLUMNS = ["user", "timestamp", "artid", "artname", "traid", "traname"]
TIME_UNITS = ("s", "ms", "iso")
SOURCE_KINDS = ("xing", "lastfm", "events")
EVENTS_OPTIONS = ("user_col", "item_col", "time_col", "time_unit", "separator")

# Plausibility bounds that catch a wrong time unit: seconds past 2100 are milliseconds,
# milliseconds before 1973 are seconds (and milliseconds past 2100 are finer units); negative
# seconds are no Unix time.
_YEAR_2100_S = 4_102_444_800
_YEAR_1973_MS = 94_694_400_000
_MAX_EXACT_FLOAT = 2**53
_INT_TEXT = r"^(-?(?:0|[1-9][0-9]*))(?:\.0+)?$"  # canonical integer, optionally with .000
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)
_LASTFM_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

Locate = Callable[[int], str]


def _fail(path: Path, problem: str) -> DataError:
    """A DataError whose message is ``<path>: <problem>`` on a single line."""
    return DataError(" ".join(f"{path}: {problem}".split()))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _polars_reason(exc: Exception) -> str:
    """The first line of a polars error, in our words where we know it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if "more fields than defined" in reason:
        return "a row has more fields than the header (wrong separator?)"
    return reason


def _existing(path: str | Path) -> Path:
    """The path, checked to be a non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise _fail(p, "file not found")
    if not p.is_file():
        raise _fail(p, "not a regular file")
    if p.stat().st_size == 0:
        raise _fail(p, "file is empty (0 bytes)")
    return p


def _csv_header(p: Path, separator: str, quote_char: str | None) -> list[str]:
    try:
        names = (
            pl.scan_csv(p, separator=separator, quote_char=quote_char, infer_schema=False)
            .collect_schema()
            .names()
        )
    except pl.exceptions.NoDataError:
        raise _fail(p, "file is empty (no header line)") from None
    except pl.exceptions.PolarsError as exc:
        raise _fail(p, f"cannot read header: {_polars_reason(exc)}") from None
    return [name.strip() for name in names]


def _require_columns(
    p: Path, found: Sequence[str], expected: Sequence[str], sep: str | None
) -> None:
    """Raises naming the missing columns, what was expected and what the file has."""
    missing = [c for c in expected if c not in found]
    if missing:
        hint = ""
        if sep is not None and len(found) == 1 and sep not in found[0]:
            hint = f" (is the file separated by {sep!r}?)"
        raise _fail(
            p,
            f"missing column(s) {missing}: expected {list(expected)}, found {list(found)}{hint}",
        )


def _first_row(df: pl.DataFrame, mask: pl.Expr) -> int | None:
    """Index of the first row where ``mask`` holds, or None."""
    hit = df.select(pl.arg_where(mask).first()).item()
    return None if hit is None else int(hit)


def _check_no_nulls(p: Path, df: pl.DataFrame, columns: dict[str, str], locate: Locate) -> None:
    """``columns`` maps frame column -> name shown to the user."""
    for col, shown in columns.items():
        row = _first_row(df, pl.col(col).is_null())
        if row is not None:
            raise _fail(p, f"missing value in column {shown!r} at {locate(row)}")


def _check_nonempty(p: Path, df: pl.DataFrame) -> None:
    if df.height == 0:
        raise _fail(p, "no events (the file has a header but no rows)")


def _line_after_header(row: int) -> str:
    return f"line {row + 2}"


def _collect(p: Path, lf: pl.LazyFrame, what: str) -> pl.DataFrame:
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise _fail(p, f"cannot read {what}: {_polars_reason(exc)}") from None


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
        row = _first_row(df, text.is_not_null() & text.cast(pl.Int64, strict=False).is_null())
        if row is not None:
            value = df.get_column(col)[row]
            return _fail(
                p,
                f"non-integer value {_show(value)} in column {col!r} at {_line_after_header(row)}",
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
    p = _existing(path)
    header = _csv_header(p, "\t", None)
    _require_columns(p, header, list(XING_COLUMNS), "\t")
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
            raise (_xing_int_error(p) or _fail(p, _polars_reason(exc))) from None
    _check_nonempty(p, df)
    _check_no_nulls(p, df, {v: k for k, v in XING_COLUMNS.items()}, _line_after_header)
    row = _first_row(df, pl.col("ts") > _YEAR_2100_S)
    if row is not None:
        raise _fail(
            p,
            f"created_at {df.get_column('ts')[row]} at {_line_after_header(row)} is after year"
            " 2100 in seconds: XING times must be Unix seconds (milliseconds?)",
        )
    row = _first_row(df, pl.col("ts") < 0)
    if row is not None:
        raise _fail(
            p,
            f"created_at {df.get_column('ts')[row]} at {_line_after_header(row)} is negative:"
            " XING times must be Unix seconds",
        )
    _check_last_line(p, df.get_column("ts"), "created_at", _line_after_header)
    return df


def _check_last_line(p: Path, times: pl.Series, column: str, locate: Locate) -> None:
    """A file that does not end with a newline may have lost the end of its last line: if
    that line's time has fewer digits than the line before, it was cut."""
    if times.len() < 2:
        return
    with p.open("rb") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return

    def digits(v) -> int:
        return len(str(v).strip().lstrip("+-").split(".")[0])

    if digits(times[-1]) < digits(times[-2]):
        raise _fail(
            p,
            f"the last line ({locate(times.len() - 1)}) looks cut: no newline at the end and"
            f" its {column} {_show(str(times[-1]).strip())} is shorter than the line before",
        )


# --------------------------------------------------------------------------- Last.fm


def _parse_iso(values: pl.Series, first_format: str | None = None) -> pl.Series:
    """ISO-8601 strings -> Int64 Unix seconds (UTC when no offset); null where unparseable.
    Tries ``first_format`` alone first, the full list only when something is left over."""

    def parse(fmt: str) -> pl.Expr:
        return pl.col("v").str.to_datetime(fmt, strict=False, time_unit="us").dt.epoch("s")

    frame = values.str.strip_chars().alias("v").to_frame()
    if first_format is not None:
        out = frame.select(parse(first_format)).to_series()
        if out.null_count() == values.null_count():
            return out
    return frame.select(pl.coalesce([parse(fmt) for fmt in _ISO_FORMATS])).to_series()


def _check_parsed(
    p: Path, raw: pl.Series, parsed: pl.Series, column: str, locate: Locate, expected: str
) -> None:
    bad = parsed.is_null() & raw.is_not_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise _fail(
            p,
            f"unparseable timestamp {_show(raw[row])} in column {column!r} at {locate(row)}"
            f" (expected {expected})",
        )


def read_lastfm(path: str | Path) -> pl.DataFrame:
    """Last.fm 1K ``userid-timestamp-artid-artname-traid-traname.tsv``: tab-separated, no
    header, ISO-8601 UTC times. The item is the track MBID, or ``artist<TAB>track`` when the
    MBID is empty (a tab never occurs inside a field, so the join is unambiguous); rows with
    neither are dropped. Quoting is off: names contain quote characters."""
    p = _existing(path)
    with p.open("rb") as fh:
        first = fh.readline().decode("utf-8", "replace").rstrip("\r\n")
    n_fields = len(first.split("\t"))
    if n_fields != len(LASTFM_COLUMNS):
        raise _fail(
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
    raw = _collect(
        p, lf.select(["user", "timestamp", "artname", "traid", "traname"]), "Last.fm file"
    )

    def locate(row: int) -> str:
        return f"line {row + 1}"

    _check_no_nulls(p, raw, {"user": "userid", "timestamp": "timestamp"}, locate)
    ts = _parse_iso(raw.get_column("timestamp"), _LASTFM_FORMAT)
    _check_parsed(p, raw.get_column("timestamp"), ts, "timestamp", locate, "2009-05-04T23:08:57Z")
    fallback = pl.concat_str([pl.col("artname").fill_null(""), pl.col("traname")], separator="\t")
    df = raw.select(
        pl.col("user"),
        pl.coalesce(pl.col("traid"), fallback).alias("item"),
        ts.alias("ts"),
    ).filter(pl.col("item").is_not_null())
    df = df.with_columns(
        user=canonical_ids(df.get_column("user")), item=canonical_ids(df.get_column("item"))
    )
    _check_no_nulls(p, df, {"user": "userid"}, locate)
    return df.filter(pl.col("item").is_not_null())


# --------------------------------------------------------------------------- generic events


def canonical_ids(s: pl.Series) -> pl.Series:
    """Text ids in canonical form (module docstring): stripped, empty -> null, integers and
    whole decimals (``12``, `` 12``, ``12.0``) as integers; Int64 when every id is one."""
    text = s.str.strip_chars()
    text = pl.select(pl.when(text.str.len_bytes() > 0).then(text)).to_series().alias(s.name)
    digits = text.str.extract(_INT_TEXT, 1)
    as_int = digits.cast(pl.Int64, strict=False)  # null beyond Int64: stays text
    if as_int.null_count() == text.null_count():
        return as_int
    canon = pl.select(
        pl.when(as_int.is_not_null()).then(as_int.cast(pl.String)).otherwise(text)
    ).to_series()
    return canon.alias(s.name)


def _id_column(p: Path, s: pl.Series, column: str, from_text: bool) -> pl.Series:
    dtype = s.dtype
    if dtype == pl.String:
        return canonical_ids(s)
    if dtype.is_integer():
        return s.cast(pl.Int64)
    if dtype.is_float():
        whole = s.is_finite() & (s == s.floor()) & (s.abs() <= _MAX_EXACT_FLOAT)
        if whole.all():
            return s.cast(pl.Int64)
        raise _fail(
            p,
            f"column {column!r} holds non-integer numbers (or beyond 2**53, not exact in "
            "float64); ids must be ints or text",
        )
    if dtype == pl.Categorical or dtype == pl.Enum:
        return s.cast(pl.String)
    raise _fail(p, f"column {column!r} has unsupported id type {dtype}")


def _numeric_time(p: Path, s: pl.Series, column: str, unit: str, locate: Locate) -> pl.Series:
    """Numbers (or numeric text) in ``unit`` -> Int64 seconds, with a plausibility check."""
    if s.dtype == pl.String:
        text = s.str.strip_chars()
        num = text.cast(pl.Int64, strict=False)
        if num.null_count() != s.null_count():
            num = text.cast(pl.Float64, strict=False)
        bad = num.is_null() & s.is_not_null()
        if bad.any():
            row = int(bad.arg_true()[0])
            hint = " (looks like a date: use time_unit='iso')" if "-" in str(s[row])[1:] else ""
            raise _fail(
                p,
                f"non-numeric timestamp {_show(s[row])} in column {column!r} at {locate(row)}"
                f" for time_unit={unit!r}{hint}",
            )
        s = num
    elif not s.dtype.is_numeric():
        raise _fail(
            p, f"column {column!r} of type {s.dtype} cannot be read with time_unit={unit!r}"
        )
    if s.dtype.is_float():
        if not s.is_finite().all():
            raise _fail(p, f"column {column!r} holds non-finite timestamps")
        s = s.floor()
    s = s.cast(pl.Int64)
    if unit == "s":
        row = _first_row(s.to_frame("v"), pl.col("v") > _YEAR_2100_S)
        if row is not None:
            raise _fail(
                p,
                f"timestamp {s[row]} in column {column!r} at {locate(row)} is after year 2100 in"
                " seconds: are these milliseconds? (use time_unit='ms')",
            )
        row = _first_row(s.to_frame("v"), pl.col("v") < 0)
        if row is not None:
            raise _fail(
                p,
                f"timestamp {s[row]} in column {column!r} at {locate(row)} is negative:"
                " times in seconds must be Unix seconds (after 1970)",
            )
        return s
    row = _first_row(s.to_frame("v"), pl.col("v") < _YEAR_1973_MS)
    if row is not None:
        raise _fail(
            p,
            f"timestamp {s[row]} in column {column!r} at {locate(row)} is before 1973 in"
            " milliseconds: are these seconds? (use time_unit='s')",
        )
    row = _first_row(s.to_frame("v"), pl.col("v") > _YEAR_2100_S * 1000)
    if row is not None:
        raise _fail(
            p,
            f"timestamp {s[row]} in column {column!r} at {locate(row)} is after year 2100 in"
            " milliseconds: is the unit finer than ms?",
        )
    return s // 1000


def _time_column(p: Path, s: pl.Series, column: str, unit: str, locate: Locate) -> pl.Series:
    if s.dtype == pl.Date:
        return s.cast(pl.Datetime("us")).dt.epoch("s")
    if isinstance(s.dtype, pl.Datetime):
        return s.dt.epoch("s")
    if unit != "iso":
        return _numeric_time(p, s, column, unit, locate)
    if s.dtype != pl.String:
        raise _fail(
            p,
            f"column {column!r} holds {s.dtype} values, not ISO-8601 text:"
            " use time_unit='s' or 'ms'",
        )
    ts = _parse_iso(s)
    _check_parsed(p, s, ts, column, locate, "ISO-8601 like 2009-05-04T23:08:57Z")
    return ts


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
            raise _fail(p, f"cannot read Parquet file: {_polars_reason(exc)}") from None
        _require_columns(p, found, columns, None)
        return _collect(p, lf.select(columns), "Parquet file"), False, lambda r: f"row {r + 1}"
    if separator is None:
        separator = {".csv": ",", ".tsv": "\t", ".txt": "\t"}.get(suffix)
        if separator is None:
            raise _fail(
                p,
                f"unsupported file type {suffix or '(none)'!r}: expected .csv, .tsv, .txt or"
                " .parquet (or pass separator=)",
            )
    found = _csv_header(p, separator, '"')
    _require_columns(p, found, columns, separator)
    lf = pl.scan_csv(p, separator=separator, infer_schema=False).rename(lambda name: name.strip())
    return _collect(p, lf.select(columns), "file"), True, _line_after_header


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
    p = _existing(path)
    columns = list(dict.fromkeys([user_col, item_col, time_col]))
    if len(columns) != 3:
        raise ConfigError(f"user_col, item_col and time_col must differ, got {columns}")
    raw, from_text, locate = _scan_events(p, columns, separator)
    _check_nonempty(p, raw)
    _check_no_nulls(p, raw, {c: c for c in columns}, locate)
    ids = pl.DataFrame(
        {
            "user": _id_column(p, raw.get_column(user_col), user_col, from_text),
            "item": _id_column(p, raw.get_column(item_col), item_col, from_text),
        }
    )
    _check_no_nulls(p, ids, {"user": user_col, "item": item_col}, locate)  # blank ids
    if from_text and time_unit != "iso":
        _check_last_line(p, raw.get_column(time_col), time_col, locate)
    return ids.with_columns(
        ts=_time_column(p, raw.get_column(time_col), time_col, time_unit, locate)
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
