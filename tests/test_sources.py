"""Raw readers: canonical frames from XING, Last.fm and generic events files, and one-line
DataErrors that name the file and the problem for every bad input."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from hrnn_lit.data.sources import read_events, read_lastfm, read_source, read_xing
from hrnn_lit.data.synthetic_xing import write_xing_file
from hrnn_lit.errors import ConfigError, DataError

XING_HEADER = "user_id\titem_id\tinteraction_type\tcreated_at\n"
T0 = 1_241_478_537  # 2009-05-04T23:08:57Z


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _fails(read, path: Path, *fragments: str, **kwargs) -> str:
    """Calls ``read(path)``; checks a one-line DataError naming the file and each fragment."""
    with pytest.raises(DataError) as info:
        read(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- XING


def test_read_xing_keeps_file_order_and_int_dtypes(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "interactions.csv",
        XING_HEADER + "7\t100\t1\t1500\n3\t200\t4\t1000\n7\t100\t2\t1400\n",
    )
    df = read_xing(path)
    assert df.columns == ["user", "item", "ts", "type"]
    assert all(dtype == pl.Int64 for dtype in df.dtypes)
    assert df.rows() == [(7, 100, 1500, 1), (3, 200, 1000, 4), (7, 100, 1400, 2)]


def test_read_xing_reads_the_synthetic_file(tmp_path: Path) -> None:
    path = write_xing_file(tmp_path / "interactions.csv", n_users=200, n_items=300, seed=1)
    df = read_xing(path)
    assert df.height == len(path.read_text().splitlines()) - 1
    assert set(df.get_column("type").unique()) == {1, 2, 3, 4}
    assert df.get_column("ts").is_sorted()


def test_synthetic_file_format(tmp_path: Path) -> None:
    path = write_xing_file(tmp_path / "interactions.csv", n_rows=5_000, seed=2)
    assert path.read_text().splitlines()[0] == XING_HEADER.rstrip("\n")
    df = read_xing(path)
    assert df.height == 5_000
    steps = (
        df.with_row_index("i")
        .sort(["user", "ts", "i"])
        .select(pl.col("ts").diff().over("user").drop_nulls())
        .to_series()
    )
    assert (steps == 0).any()  # equal timestamps
    assert not (steps == 1800).any()  # steps inside sessions < 1800 s, gaps > 1800 s
    assert (steps > 1800).any()
    repeats = df.filter(pl.col("type") == 1).select(["user", "item"]).is_duplicated()
    assert repeats.any()  # repeated clicks on the same item


def test_read_xing_errors(tmp_path: Path) -> None:
    _fails(read_xing, tmp_path / "absent.csv", "file not found")
    _fails(read_xing, _write(tmp_path / "zero.csv", ""), "empty")
    _fails(read_xing, _write(tmp_path / "header.csv", XING_HEADER), "no events")
    message = _fails(
        read_xing,
        _write(
            tmp_path / "renamed.csv", "user_id\titem\tinteraction_type\tcreated_at\n1\t2\t1\t3\n"
        ),
        "missing column",
        "item_id",
    )
    assert "expected" in message and "found" in message and "'item'" in message
    _fails(
        read_xing,
        _write(tmp_path / "comma.csv", "user_id,item_id,interaction_type,created_at\n1,2,1,3\n"),
        "missing column",
        "separated",
    )
    _fails(
        read_xing,
        _write(tmp_path / "text_id.csv", XING_HEADER + "1\t2\t1\t3\n1\tabc\t1\t4\n"),
        "non-integer",
        "'abc'",
        "item_id",
        "line 3",
    )
    _fails(
        read_xing,
        _write(tmp_path / "hole.csv", XING_HEADER + "1\t2\t1\t3\n1\t\t1\t4\n"),
        "missing value",
        "item_id",
        "line 3",
    )
    _fails(
        read_xing,
        _write(tmp_path / "millis.csv", XING_HEADER + f"1\t2\t1\t{T0}000\n"),
        "after year 2100",
        "line 2",
    )
    _fails(
        read_xing,
        _write(tmp_path / "ragged.csv", XING_HEADER + "1\t2\t1\t3\t9\n"),
        "more fields than the header",
    )


# ----------------------------------------------------------------------------- Last.fm


def _lastfm_line(user: str, when: str, traid: str, artist: str, track: str) -> str:
    return f"{user}\t{when}\tart-mbid\t{artist}\t{traid}\t{track}\n"


def test_read_lastfm_track_ids_fallback_and_iso_times(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "lastfm.tsv",
        _lastfm_line("user_000001", "2009-05-04T23:08:57Z", "t-1", "Deep Dish", "Fuck Me Im Famous")
        + _lastfm_line("user_000001", "2009-05-04T13:54:10Z", "", 'The "Artist', 'Say "Hi')
        + _lastfm_line("user_000002", "2009-05-04T13:54:11Z", "", "", "")
        + _lastfm_line("user_000002", "2009-05-05T00:00:00Z", "", "A", "Song"),
    )
    df = read_lastfm(path)
    assert df.columns == ["user", "item", "ts"]
    assert df.schema == {"user": pl.String, "item": pl.String, "ts": pl.Int64}
    assert df.rows() == [
        ("user_000001", "t-1", T0),
        ("user_000001", 'The "Artist\tSay "Hi', T0 - 33_287),
        ("user_000002", "A\tSong", 1_241_481_600),
    ]


def test_read_lastfm_errors(tmp_path: Path) -> None:
    _fails(read_lastfm, tmp_path / "absent.tsv", "file not found")
    _fails(read_lastfm, _write(tmp_path / "zero.tsv", ""), "empty")
    _fails(
        read_lastfm,
        _write(tmp_path / "five.tsv", "u\t2009-05-04T23:08:57Z\ta\tb\tc\n"),
        "expected 6",
        "found 5",
    )
    _fails(
        read_lastfm,
        _write(
            tmp_path / "badtime.tsv",
            _lastfm_line("u", "2009-05-04T23:08:57Z", "t", "a", "b")
            + _lastfm_line("u", "yesterday", "t", "a", "b"),
        ),
        "unparseable timestamp",
        "'yesterday'",
        "line 2",
    )


# ----------------------------------------------------------------------------- events


def test_read_events_csv_custom_columns_seconds(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,when\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n",
    )
    df = read_events(path, user_col="userId", item_col="movieId", time_col="when")
    assert df.schema == {"user": pl.Int64, "item": pl.Int64, "ts": pl.Int64}
    assert df.rows() == [(1, 31, 1260759144), (1, 1029, 1260759179)]


def test_read_events_tsv_milliseconds_and_text_ids(tmp_path: Path) -> None:
    for name in ("clicks.tsv", "clicks.txt"):
        path = _write(tmp_path / name, f"u\ti\tt\nalice\tx1\t{T0}123\nbob\t007\t{T0}999\n")
        df = read_events(path, user_col="u", item_col="i", time_col="t", time_unit="ms")
        assert df.schema == {"user": pl.String, "item": pl.String, "ts": pl.Int64}
        assert df.rows() == [("alice", "x1", T0), ("bob", "007", T0)]


def test_read_events_custom_separator_and_iso(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "log.dat",
        "user;item;time\n1;5;2009-05-04T23:08:57Z\n2;5;2009-05-05 01:08:57+02:00\n3;6;2009-05-04\n",
    )
    df = read_events(path, "user", "item", "time", time_unit="iso", separator=";")
    assert df.get_column("ts").to_list() == [T0, T0, 1_241_395_200]


def test_read_events_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pl.DataFrame(
        {"visitor": [3, 1], "product": ["a", "b"], "stamp": ["2009-05-04T23:08:57Z"] * 2}
    ).write_parquet(path)
    df = read_events(path, "visitor", "product", "stamp", time_unit="iso")
    assert df.schema == {"user": pl.Int64, "item": pl.String, "ts": pl.Int64}
    assert df.rows() == [(3, "a", T0), (1, "b", T0)]

    native = tmp_path / "native.parquet"
    when = datetime.fromtimestamp(T0, tz=timezone.utc)
    pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [when]}).write_parquet(native)
    assert read_events(native).rows() == [(1, 2, T0)]
    seconds = tmp_path / "seconds.parquet"
    pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [T0]}).write_parquet(seconds)
    assert read_events(seconds).rows() == [(1, 2, T0)]


def test_read_events_errors(tmp_path: Path) -> None:
    good = "user_id,item_id,timestamp\n"
    _fails(read_events, tmp_path / "absent.csv", "file not found")
    _fails(read_events, _write(tmp_path / "zero.csv", ""), "empty")
    _fails(read_events, _write(tmp_path / "header.csv", good), "no events")
    message = _fails(
        read_events,
        _write(tmp_path / "cols.csv", "user,item_id,time\n1,2,3\n"),
        "missing column",
        "'user_id'",
        "'timestamp'",
    )
    assert "expected" in message and "found" in message and "'time'" in message
    _fails(
        read_events,
        _write(tmp_path / "ms.csv", good + f"1,2,{T0}000\n"),
        "after year 2100",
        "milliseconds",
        "line 2",
    )
    _fails(
        read_events,
        _write(tmp_path / "s.csv", good + f"1,2,{T0}\n"),
        "before 1973",
        "seconds",
        time_unit="ms",
    )
    _fails(
        read_events,
        _write(tmp_path / "iso.csv", good + "1,2,2009-13-45T99:00:00Z\n"),
        "unparseable timestamp",
        "'2009-13-45T99:00:00Z'",
        time_unit="iso",
    )
    _fails(
        read_events,
        _write(tmp_path / "num_iso.csv", good + f"1,2,{T0}\n"),
        "unparseable timestamp",
        time_unit="iso",
    )
    _fails(
        read_events,
        _write(tmp_path / "text_s.csv", good + "1,2,2009-05-04T23:08:57Z\n"),
        "non-numeric timestamp",
        "time_unit='iso'",
    )
    _fails(
        read_events,
        _write(tmp_path / "hole.csv", good + "1,2,3\n,2,4\n"),
        "missing value",
        "'user_id'",
        "line 3",
    )
    _fails(read_events, _write(tmp_path / "events.json", "{}"), "unsupported file type")
    _fails(read_events, _write(tmp_path / "broken.parquet", "not parquet"), "Parquet")
    ints = tmp_path / "ints.parquet"
    pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [T0]}).write_parquet(ints)
    _fails(read_events, ints, "not ISO-8601", time_unit="iso")
    _fails(read_events, ints, "missing column", "'when'", time_col="when")
    empty = tmp_path / "empty.parquet"
    pl.DataFrame(
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    ).write_parquet(empty)
    _fails(read_events, empty, "no events")


# ----------------------------------------------------------------------------- dispatch


def test_read_source_dispatch(tmp_path: Path) -> None:
    xing = _write(tmp_path / "interactions.csv", XING_HEADER + "1\t2\t1\t3\n")
    assert read_source("xing", xing).columns == ["user", "item", "ts", "type"]
    lastfm = _write(tmp_path / "lfm.tsv", _lastfm_line("u", "2009-05-04T23:08:57Z", "t", "a", "b"))
    assert read_source("lastfm", lastfm).rows() == [("u", "t", T0)]
    events = _write(tmp_path / "e.csv", "a,b,c\nu,i,2009-05-04T23:08:57Z\n")
    df = read_source("events", events, user_col="a", item_col="b", time_col="c", time_unit="iso")
    assert df.rows() == [("u", "i", T0)]
    with pytest.raises(ConfigError, match="movielens"):
        read_source("movielens", events)
    with pytest.raises(ConfigError, match="time_unit"):
        read_source("events", events, time_unit="us")
    with pytest.raises(ConfigError, match="colour"):
        read_source("events", events, colour="red")
    with pytest.raises(ConfigError, match="no options"):
        read_source("xing", xing, time_unit="s")
