"""Raw file -> cache -> prepare/train, for every data config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from hrnn_lit.data.synthetic_xing import write_xing_file
from hrnn_lit.errors import DataError
from hrnn_lit.run import run
from tests.conftest import compose_cfg

QUICK = ["logger=none", "callbacks=none", "data.batch_size=16", "model.hidden_size=16"]


def paths(tmp_path: Path) -> list[str]:
    return [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}"]


def test_prepare_writes_splits_and_stats_and_uses_cache(tmp_path, capsys):
    raw = write_xing_file(tmp_path / "interactions.csv", seed=3)
    base = ["mode=prepare", "data=xing", f"data.path={raw}", *paths(tmp_path)]
    stats = run(compose_cfg(base, tmp_path / "out1"))
    out1 = capsys.readouterr().out
    assert "processed" in out1 and "valid_test" in out1
    saved = json.loads((tmp_path / "out1" / "stats.json").read_text())
    assert saved == stats
    assert set(saved) == {"train", "test", "valid_train", "valid_test"}
    for name, s in saved.items():
        frame = pl.read_parquet(tmp_path / "out1" / f"{name}.parquet")
        assert s["events"] == frame.height and s["users"] == frame["user"].n_unique()
    # same file + settings: served from the cache, same numbers
    assert run(compose_cfg(base, tmp_path / "out2")) == stats
    assert "cached" in capsys.readouterr().out
    # a changed setting is a different entry
    run(compose_cfg([*base, "data.preprocess.min_item_support=10"], tmp_path / "out3"))
    assert "processed" in capsys.readouterr().out
    # a changed file (same size, one byte different) is never served stale
    text = raw.read_text().splitlines()
    fields = text[1].split("\t")
    fields[2] = "4" if fields[2] != "4" else "1"
    text[1] = "\t".join(fields)
    raw.write_text("\n".join(text) + "\n")
    run(compose_cfg(base, tmp_path / "out4"))
    assert "processed" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_bad_file_writes_nothing_to_cache(tmp_path):
    raw = tmp_path / "interactions.csv"
    raw.write_text("user_id\titem_id\tinteraction_type\tcreated_at\n1\tx\t1\t5\n")
    cfg = compose_cfg(
        ["mode=prepare", "data=xing", f"data.path={raw}", *paths(tmp_path)], tmp_path / "out"
    )
    with pytest.raises(DataError, match="interactions.csv"):
        run(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "out" / "stats.json").exists()


def test_filter_that_empties_data_is_named(tmp_path):
    raw = write_xing_file(tmp_path / "interactions.csv", seed=1)
    cfg = compose_cfg(
        [
            "mode=prepare",
            "data=xing",
            f"data.path={raw}",
            "data.preprocess.min_item_support=100000",
            *paths(tmp_path),
        ],
        tmp_path / "out",
    )
    with pytest.raises(DataError, match="min_item_support"):
        run(cfg)


def test_xing_without_file_says_where_to_put_it(tmp_path):
    cfg = compose_cfg(["+experiment=xing", *paths(tmp_path)], tmp_path / "out")
    with pytest.raises(DataError, match=r"data\.path=.*synthetic_xing"):
        run(cfg)
    cfg = compose_cfg(
        ["+experiment=xing", "data.path=/nope/interactions.csv", *paths(tmp_path)], tmp_path / "out"
    )
    with pytest.raises(DataError, match="/nope/interactions.csv: file not found"):
        run(cfg)


def test_experiment_xing_on_synthetic_xing_runs(tmp_path):
    cfg = compose_cfg(
        [
            "+experiment=xing",
            "data=synthetic_xing",
            "trainer.max_epochs=1",
            "+data.generate.n_power_users=0",  # no 150-300-session users: a short plan
            *QUICK,
            *paths(tmp_path),
        ],
        tmp_path / "out",
    )
    assert cfg.model.name == "hrnn_all" and cfg.data.preprocess.min_item_support == 20
    results = run(cfg)
    assert results["data"] == "synthetic_xing" and results["test/n_events"] > 0
    assert (tmp_path / "data" / "synthetic_xing" / "small-seed0.tsv").exists()


def generated_events(n_users: int = 60, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = 1_500_000_000 + int(rng.integers(0, 10_000))
        taste = rng.integers(0, 40, size=8)
        for _ in range(int(rng.integers(3, 7))):
            t += int(rng.integers(4000, 90_000))
            for _ in range(int(rng.integers(2, 6))):
                t += int(rng.integers(5, 300))
                rows.append((f"u{u}", int(rng.choice(taste)), t))
    return pl.DataFrame(rows, schema=["uid", "song", "when"], orient="row")


def events_args(path) -> list[str]:
    """data=events on a generated file with custom column names and millisecond times."""
    return [
        "data=events",
        f"data.path={path}",
        "data.source.user_col=uid",
        "data.source.item_col=song",
        "data.source.time_col=when",
        "data.source.time_unit=ms",
    ]


def test_events_csv_with_ms_and_custom_columns_runs(tmp_path):
    df = generated_events().with_columns(pl.col("when") * 1000)
    path = tmp_path / "events.csv"
    df.write_csv(path)
    cfg = compose_cfg(
        [
            *events_args(path),
            *QUICK,
            *paths(tmp_path),
        ],
        tmp_path / "out",
    )
    results = run(cfg)
    assert results["data"] == "events" and results["test/n_events"] > 0


def test_events_parquet_with_wrong_unit_is_one_line_error(tmp_path):
    path = tmp_path / "events.parquet"
    generated_events().write_parquet(path)
    cfg = compose_cfg(
        [
            *events_args(path),
            *paths(tmp_path),
        ],
        tmp_path / "out",
    )
    with pytest.raises(DataError) as e:
        run(cfg)
    assert "events.parquet" in str(e.value) and "\n" not in str(e.value)


def test_lastfm_runs(tmp_path):
    df = generated_events(seed=2)
    path = tmp_path / "lastfm.tsv"
    iso = pl.from_epoch(df["when"], time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"{u}\t{t}\tart{s % 7}\tArtist {s % 7}\t{'' if s % 5 == 0 else f'trk-{s}'}\tSong {s}"
        for u, s, t in zip(df["uid"], df["song"], iso)
    ]
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg(
        ["data=lastfm", f"data.path={path}", *QUICK, *paths(tmp_path)], tmp_path / "out"
    )
    results = run(cfg)
    assert results["data"] == "lastfm" and results["test/n_events"] > 0
