"""Raw event columns: the checks every reader makes on its file and the canonical forms
of ids and times (hrnn_lit.data.sources has the readers).

Every bad input raises :class:`DataError` with a one-line message naming the file and the
problem (``fail``); polars exceptions never escape for the cases checked here.

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

from hrnn_lit.errors import DataError

TIME_UNITS = ("s", "ms", "iso")

# Plausibility bounds that catch a wrong time unit: seconds past 2100 are milliseconds,
# milliseconds before 1973 are seconds (and milliseconds past 2100 are finer units); negative
# seconds are no Unix time.
YEAR_2100_S = 4_102_444_800
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

Locate = Callable[[int], str]  # row index -> where it is in the file ("line 12")


# --------------------------------------------------------------------------- files and columns


def fail(path: Path, problem: str) -> DataError:
    """A DataError whose message is ``<path>: <problem>`` on a single line."""
    return DataError(" ".join(f"{path}: {problem}".split()))


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def polars_reason(exc: Exception) -> str:
    """The first line of a polars error, in our words where we know it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if "more fields than defined" in reason:
        return "a row has more fields than the header (wrong separator?)"
    return reason


def existing_file(path: str | Path) -> Path:
    """The path, checked to be a non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise fail(p, "file not found")
    if not p.is_file():
        raise fail(p, "not a regular file")
    if p.stat().st_size == 0:
        raise fail(p, "file is empty (0 bytes)")
    return p


def csv_header(p: Path, separator: str, quote_char: str | None) -> list[str]:
    try:
        names = (
            pl.scan_csv(p, separator=separator, quote_char=quote_char, infer_schema=False)
            .collect_schema()
            .names()
        )
    except pl.exceptions.NoDataError:
        raise fail(p, "file is empty (no header line)") from None
    except pl.exceptions.PolarsError as exc:
        raise fail(p, f"cannot read header: {polars_reason(exc)}") from None
    return [name.strip() for name in names]


def require_columns(
    p: Path, found: Sequence[str], expected: Sequence[str], sep: str | None
) -> None:
    """Raises naming the missing columns, what was expected and what the file has."""
    missing = [c for c in expected if c not in found]
    if missing:
        hint = ""
        if sep is not None and len(found) == 1 and sep not in found[0]:
            hint = f" (is the file separated by {sep!r}?)"
        raise fail(
            p,
            f"missing column(s) {missing}: expected {list(expected)}, found {list(found)}{hint}",
        )


def first_row(df: pl.DataFrame, mask: pl.Expr) -> int | None:
    """Index of the first row where ``mask`` holds, or None."""
    hit = df.select(pl.arg_where(mask).first()).item()
    return None if hit is None else int(hit)


def check_no_nulls(p: Path, df: pl.DataFrame, columns: dict[str, str], locate: Locate) -> None:
    """``columns`` maps frame column -> name shown to the user."""
    for col, shown in columns.items():
        row = first_row(df, pl.col(col).is_null())
        if row is not None:
            raise fail(p, f"missing value in column {shown!r} at {locate(row)}")


def check_nonempty(p: Path, df: pl.DataFrame) -> None:
    if df.height == 0:
        raise fail(p, "no events (the file has a header but no rows)")


def line_after_header(row: int) -> str:
    return f"line {row + 2}"


def collect(p: Path, lf: pl.LazyFrame, what: str) -> pl.DataFrame:
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise fail(p, f"cannot read {what}: {polars_reason(exc)}") from None


def check_last_line(p: Path, times: pl.Series, column: str, locate: Locate) -> None:
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
        raise fail(
            p,
            f"the last line ({locate(times.len() - 1)}) looks cut: no newline at the end and"
            f" its {column} {show(str(times[-1]).strip())} is shorter than the line before",
        )


# --------------------------------------------------------------------------- ids


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


def id_column(p: Path, s: pl.Series, column: str, from_text: bool) -> pl.Series:
    dtype = s.dtype
    if dtype == pl.String:
        return canonical_ids(s)
    if dtype.is_integer():
        return s.cast(pl.Int64)
    if dtype.is_float():
        whole = s.is_finite() & (s == s.floor()) & (s.abs() <= _MAX_EXACT_FLOAT)
        if whole.all():
            return s.cast(pl.Int64)
        raise fail(
            p,
            f"column {column!r} holds non-integer numbers (or beyond 2**53, not exact in "
            "float64); ids must be ints or text",
        )
    if dtype == pl.Categorical or dtype == pl.Enum:
        return s.cast(pl.String)
    raise fail(p, f"column {column!r} has unsupported id type {dtype}")


# --------------------------------------------------------------------------- times


def parse_iso(values: pl.Series, first_format: str | None = None) -> pl.Series:
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


def check_parsed(
    p: Path, raw: pl.Series, parsed: pl.Series, column: str, locate: Locate, expected: str
) -> None:
    bad = parsed.is_null() & raw.is_not_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise fail(
            p,
            f"unparseable timestamp {show(raw[row])} in column {column!r} at {locate(row)}"
            f" (expected {expected})",
        )


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
            raise fail(
                p,
                f"non-numeric timestamp {show(s[row])} in column {column!r} at {locate(row)}"
                f" for time_unit={unit!r}{hint}",
            )
        s = num
    elif not s.dtype.is_numeric():
        raise fail(p, f"column {column!r} of type {s.dtype} cannot be read with time_unit={unit!r}")
    if s.dtype.is_float():
        if not s.is_finite().all():
            raise fail(p, f"column {column!r} holds non-finite timestamps")
        s = s.floor()
    s = s.cast(pl.Int64)
    if unit == "s":
        row = first_row(s.to_frame("v"), pl.col("v") > YEAR_2100_S)
        if row is not None:
            raise fail(
                p,
                f"timestamp {s[row]} in column {column!r} at {locate(row)} is after year 2100 in"
                " seconds: are these milliseconds? (use time_unit='ms')",
            )
        row = first_row(s.to_frame("v"), pl.col("v") < 0)
        if row is not None:
            raise fail(
                p,
                f"timestamp {s[row]} in column {column!r} at {locate(row)} is negative:"
                " times in seconds must be Unix seconds (after 1970)",
            )
        return s
    row = first_row(s.to_frame("v"), pl.col("v") < _YEAR_1973_MS)
    if row is not None:
        raise fail(
            p,
            f"timestamp {s[row]} in column {column!r} at {locate(row)} is before 1973 in"
            " milliseconds: are these seconds? (use time_unit='s')",
        )
    row = first_row(s.to_frame("v"), pl.col("v") > YEAR_2100_S * 1000)
    if row is not None:
        raise fail(
            p,
            f"timestamp {s[row]} in column {column!r} at {locate(row)} is after year 2100 in"
            " milliseconds: is the unit finer than ms?",
        )
    return s // 1000


def time_column(p: Path, s: pl.Series, column: str, unit: str, locate: Locate) -> pl.Series:
    if s.dtype == pl.Date:
        return s.cast(pl.Datetime("us")).dt.epoch("s")
    if isinstance(s.dtype, pl.Datetime):
        return s.dt.epoch("s")
    if unit != "iso":
        return _numeric_time(p, s, column, unit, locate)
    if s.dtype != pl.String:
        raise fail(
            p,
            f"column {column!r} holds {s.dtype} values, not ISO-8601 text:"
            " use time_unit='s' or 'ms'",
        )
    ts = parse_iso(s)
    check_parsed(p, s, ts, column, locate, "ISO-8601 like 2009-05-04T23:08:57Z")
    return ts
