"""Reliability matrix, data side (issue 21): canonical ids (one test per rule), times that
cannot be Unix seconds, a cache that verifies every entry and rebuilds bad ones, racing
cache writers, and the one-line account of the data stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from hrnn_lit.data import cache
from hrnn_lit.data.columns import canonical_ids
from hrnn_lit.data.sources import read_events, read_xing
from hrnn_lit.errors import DataError
from hrnn_lit.run import _instantiate
from tests.conftest import compose_cfg
from tests.test_reliability import write_events

T = 1_600_000_000
HEADER = "user_id,item_id,timestamp\n"


def _csv(path: Path, rows: list[str], newline_at_end: bool = True) -> Path:
    path.write_text(HEADER + "\n".join(rows) + ("\n" if newline_at_end else ""))
    return path


# ----------------------------------------------------------------------- ids, one per rule


def test_ids_rule_1_surrounding_whitespace_is_stripped(tmp_path):
    df = read_events(_csv(tmp_path / "e.csv", [f" 12,a ,{T}", f"12,a,{T + 1}", f"12 , a,{T + 2}"]))
    assert df.schema["user"] == pl.Int64 and df.get_column("user").to_list() == [12, 12, 12]
    assert df.get_column("item").to_list() == ["a", "a", "a"]
    xing = tmp_path / "interactions.csv"
    xing.write_text(
        "user_id\titem_id\tinteraction_type\tcreated_at\n"
        f" 7\t100 \t1\t{T}\n7\t100\t1\t{T + 5}\n"
    )
    assert read_xing(xing).get_column("user").to_list() == [7, 7]


def test_ids_rule_1_an_id_blank_after_stripping_is_a_missing_value(tmp_path):
    with pytest.raises(DataError, match=r"missing value in column 'user_id' at line 3"):
        read_events(_csv(tmp_path / "e.csv", [f"1,a,{T}", f"  ,a,{T + 1}"]))


def test_ids_rule_2_whole_decimals_are_integers_only_where_exact(tmp_path):
    df = read_events(_csv(tmp_path / "e.csv", [f"1,5,{T}", f"1.0,5.00,{T + 1}", f"-3,6,{T + 2}"]))
    assert df.schema["user"] == pl.Int64 and df.get_column("user").to_list() == [1, 1, -3]
    assert df.get_column("item").to_list() == [5, 5, 6]
    pq = tmp_path / "e.parquet"
    pl.DataFrame({"user_id": [1.0, 2.0], "item_id": [3, 4], "timestamp": [T, T]}).write_parquet(pq)
    assert read_events(pq).get_column("user").to_list() == [1, 2]
    pl.DataFrame({"user_id": [1.5, 2.0], "item_id": [3, 4], "timestamp": [T, T]}).write_parquet(pq)
    with pytest.raises(DataError, match="non-integer numbers"):
        read_events(pq)
    pl.DataFrame({"user_id": [2.0**60], "item_id": [3], "timestamp": [T]}).write_parquet(pq)
    with pytest.raises(DataError, match="2\\*\\*53"):
        read_events(pq)


def test_ids_rule_3_mixed_text_keeps_one_spelling_per_integer():
    s = canonical_ids(pl.Series("u", ["1", "1.0", " 1 ", "abc", "1.5", "2.000"]))
    assert s.dtype == pl.String
    assert s.to_list() == ["1", "1", "1", "abc", "1.5", "2"]


def test_ids_rule_4_leading_zeros_keep_the_text_form():
    s = canonical_ids(pl.Series("u", ["007", "7", "0"]))
    assert s.to_list() == ["007", "7", "0"] and s.dtype == pl.String
    assert canonical_ids(pl.Series("u", ["0", "10"])).to_list() == [0, 10]


def test_one_user_read_as_1_and_1_0_gives_the_same_users_as_1_alone(tmp_path):
    rows = [f"{u},{i},{T + 40 * k}" for k, (u, i) in enumerate([(1, 5), (2, 6), (1, 7)])]
    plain = read_events(_csv(tmp_path / "a.csv", rows))
    mixed = read_events(_csv(tmp_path / "b.csv", [rows[0], rows[1], "1.0" + rows[2][1:]]))
    assert plain.equals(mixed)


# ----------------------------------------------------------------------------- times


def test_negative_time_in_seconds_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"timestamp -5 .* line 3 is negative"):
        read_events(_csv(tmp_path / "e.csv", [f"1,a,{T}", "1,b,-5"]))


def test_last_line_cut_inside_its_timestamp_is_refused(tmp_path):
    path = _csv(tmp_path / "e.csv", [f"1,a,{T}", f"1,b,{T + 9}", "2,c,16"], newline_at_end=False)
    with pytest.raises(DataError, match=r"last line \(line 4\) looks cut"):
        read_events(path)
    xing = tmp_path / "interactions.csv"
    xing.write_text(
        "user_id\titem_id\tinteraction_type\tcreated_at\n" f"7\t100\t1\t{T}\n7\t101\t1\t1600"
    )
    with pytest.raises(DataError, match="looks cut"):
        read_xing(xing)
    # the same line with its newline is a complete (if early) time
    assert read_events(_csv(tmp_path / "ok.csv", [f"1,a,{T}", "2,c,16"])).height == 2


# ----------------------------------------------------------------------------- cache


def events_cfg(tmp_path: Path, *extra: str):
    path = tmp_path / "events.csv"
    if not path.exists():
        write_events(path, {f"u{u}": [[1, 2, 3], [2, 3, 4], [3, 4, 1, 2]] for u in range(6)})
    return compose_cfg(
        [
            "data=events",
            f"data.path={path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "data.preprocess.min_item_support=1",
            "data.preprocess.min_user_sessions=1",
            "data.preprocess.min_session_len=1",
            *extra,
        ],
        tmp_path / "out",
    )


def load(tmp_path: Path, *extra: str):
    dm = _instantiate(events_cfg(tmp_path, *extra).data)
    return dm, dm.load_splits()


def entry_dir(tmp_path: Path) -> Path:
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    return entry


def same(a, b) -> bool:
    return all(a.items()[k].equals(b.items()[k]) for k in a.items())


def test_cache_entry_has_a_manifest_and_is_used(tmp_path):
    dm, first = load(tmp_path)
    assert not dm.cache_hit and "preprocessed in" in dm.notices[0]
    manifest = json.loads((entry_dir(tmp_path) / "manifest.json").read_text())
    assert manifest["key"] == entry_dir(tmp_path).name.split("-")[-1]
    assert manifest["inputs"]["preprocess"]["min_session_len"] == 1
    assert manifest["files"]["train.parquet"]["rows"] == first.train.height
    dm2, second = load(tmp_path)
    assert dm2.cache_hit and same(first, second)
    assert dm2.notices[0].startswith("data events: loaded from the cache")


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate", "bytes, the manifest says"),
        ("zero", "bytes, the manifest says"),
        ("garbage", "does not match its checksum"),
        ("delete", "train.parquet is missing"),
        ("manifest", "no manifest.json"),
    ],
)
def test_bad_cache_entry_is_reported_in_one_line_and_rebuilt(tmp_path, capsys, damage, reason):
    _, good = load(tmp_path)
    f = entry_dir(tmp_path) / "train.parquet"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        f.write_bytes(b"")
    elif damage == "garbage":
        f.write_bytes(bytes(len(data)))
    elif damage == "delete":
        f.unlink()
    else:
        (entry_dir(tmp_path) / "manifest.json").unlink()
    capsys.readouterr()
    dm, rebuilt = load(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cache: ") and reason in err[0]
    assert not dm.cache_hit and same(good, rebuilt)
    assert cache.check_entry(entry_dir(tmp_path)) is None, "the rebuilt entry is good"
    dm3, _ = load(tmp_path)
    assert dm3.cache_hit


def test_cache_entry_swapped_for_another_valid_entry_is_detected(tmp_path, capsys):
    _, good = load(tmp_path)
    right = entry_dir(tmp_path)
    shutil.move(right, tmp_path / "kept")
    load(tmp_path, "data.preprocess.min_session_len=3")  # another key's entry
    other = entry_dir(tmp_path)
    shutil.move(other, right)  # now sits under the first key's name
    capsys.readouterr()
    dm, rebuilt = load(tmp_path)
    err = capsys.readouterr().err
    assert "entry swapped?" in err and not dm.cache_hit and same(good, rebuilt)


def test_racing_cache_writers_the_loser_drops_its_copy(tmp_path):
    _, splits = load(tmp_path)
    entry = entry_dir(tmp_path)
    before = (entry / "manifest.json").read_text()
    # a second writer of the same key finishing after the first: its rename fails
    inputs = json.loads(before)["inputs"]
    assert cache.save_splits(splits, entry, inputs) is False
    assert (entry / "manifest.json").read_text() == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name], "no temp dir left"


def test_data_path_that_is_a_directory_is_one_line(tmp_path):
    cfg = compose_cfg(["data=events", f"data.path={tmp_path}"], tmp_path / "out")
    with pytest.raises(DataError, match="not a regular file"):
        _instantiate(cfg.data).load_splits()


def test_a_killed_writers_old_temporary_directory_is_removed(tmp_path):
    import os

    (tmp_path / "cache").mkdir()
    load(tmp_path)
    entry_name = entry_dir(tmp_path).name
    shutil.rmtree(tmp_path / "cache" / entry_name)
    old = tmp_path / "cache" / f".{entry_name}.dead.tmp"
    fresh = tmp_path / "cache" / f".{entry_name}.live.tmp"
    for d in (old, fresh):
        d.mkdir()
    os.utime(old, (1, 1))  # written long ago by a process that was killed
    _instantiate(events_cfg(tmp_path).data).load_splits()
    assert not old.exists() and fresh.exists(), "a recent one may belong to a live writer"



def test_two_writers_renaming_at_the_same_moment(tmp_path, monkeypatch):
    """Both writers reach the rename together (a barrier): one wins, the other drops its
    copy, neither raises (was: OSError Directory not empty)."""
    import os
    import threading

    _, splits = load(tmp_path)
    entry = entry_dir(tmp_path)
    inputs = json.loads((entry / "manifest.json").read_text())["inputs"]
    shutil.rmtree(entry)
    barrier, real_rename = threading.Barrier(2), os.rename

    def rename_together(src, dst):
        if str(src).endswith(".tmp"):
            barrier.wait(timeout=30)
        return real_rename(src, dst)

    monkeypatch.setattr(cache.os, "rename", rename_together)
    results, errors = [], []

    def write():
        try:
            results.append(cache.save_splits(splits, entry, inputs))
        except Exception as e:  # pragma: no cover - the failure this test guards against
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(results) == [False, True]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]
    assert cache.check_entry(entry) is None
