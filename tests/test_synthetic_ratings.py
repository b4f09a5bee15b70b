"""data=synthetic_ratings: the generated rating log has what it promises (no repeats, a long
tail, sessions the gap rule recovers, drifting tastes) and runs through the normal pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from omegaconf import OmegaConf

from hrnn_lit.data.preprocess import preprocess, sessionize
from hrnn_lit.data.sources import read_events
from hrnn_lit.data.synthetic_ratings import (
    HEADER,
    RatingsSpec,
    Simulation,
    simulate,
    write_ratings_file,
)
from hrnn_lit.errors import ConfigError
from hrnn_lit.run import run
from tests.conftest import compose_cfg

SMALL = {"n_users": 300, "n_items": 800}
QUICK = ["logger=none", "callbacks=none", "data.batch_size=16", "model.hidden_size=16"]


def preset() -> dict:
    """The data config's preprocessing settings (the session-aware preset)."""
    cfg = compose_cfg(["data=synthetic_ratings"], "/tmp/unused")
    return OmegaConf.to_container(cfg.data.preprocess)


@pytest.fixture(scope="module")
def default_sim() -> Simulation:
    """The default size (conf/data/synthetic_ratings.yaml's generate keys)."""
    cfg = compose_cfg(["data=synthetic_ratings"], "/tmp/unused")
    keys = OmegaConf.to_container(cfg.data.generate)
    seed = keys.pop("seed")
    for k in ("_target_", "_partial_"):
        keys.pop(k)
    return simulate(RatingsSpec(**keys), seed)


@pytest.fixture(scope="module")
def default_file(default_sim, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ratings") / "ratings.csv"
    frame = default_sim.frame.select(HEADER).sort(["userId", "movieId"])
    frame.write_csv(path)
    return path


def events_of(path: Path) -> pl.DataFrame:
    return read_events(path, user_col="userId", item_col="movieId", time_col="timestamp")


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_ratings_file(tmp_path / "a.csv", seed=3, **SMALL)
    b = write_ratings_file(tmp_path / "b.csv", seed=3, **SMALL)
    c = write_ratings_file(tmp_path / "c.csv", seed=4, **SMALL)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.read_text().splitlines()[0] == ",".join(HEADER)  # MovieLens ratings.csv header
    frame = pl.read_csv(a)
    assert frame.equals(frame.sort(["userId", "movieId"]))  # the real file's order
    assert set(frame["rating"].unique()) <= {x / 2 for x in range(1, 11)}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ConfigError, match="n_user"):
        write_ratings_file(tmp_path / "d.csv", n_user=3)


def test_no_user_rates_an_item_twice(default_sim, default_file):
    raw = default_sim.frame
    assert raw.height > 50_000
    assert raw.select("userId", "movieId").is_duplicated().sum() == 0
    splits = preprocess(events_of(default_file), **preset())
    for fit, held in (("train", "test"), ("valid_train", "valid_test")):
        both = pl.concat([getattr(splits, fit), getattr(splits, held)])
        assert both.height > 50_000
        assert both.select("user", "item").is_duplicated().sum() == 0


def test_popularity_is_long_tailed(default_sim):
    counts = np.sort(default_sim.frame["movieId"].value_counts()["count"].to_numpy())[::-1]
    n_items = len(default_sim.item_ids)
    share_top = counts[: n_items // 10].sum() / counts.sum()
    share_bottom_half = counts[n_items // 2 :].sum() / counts.sum()
    assert share_top > 0.4  # uniform popularity: 0.1
    assert share_bottom_half < 0.15  # uniform: 0.5
    # the control: without the popularity bias and taste, no long tail
    flat = simulate(RatingsSpec(n_users=1000, zipf_exponent=0.0, taste_scale=0.0), 0).frame
    counts = np.sort(flat["movieId"].value_counts()["count"].to_numpy())[::-1]
    assert counts[: 3000 // 10].sum() / counts.sum() < 0.2


def test_gap_rule_recovers_the_generated_sessions(default_sim, default_file):
    cfg = preset()
    events = events_of(default_file)  # through the file: its order is user, movie
    sessions = sessionize(events, cfg["session_gap"])
    truth = default_sim.frame.select(
        pl.col("userId").alias("user"), pl.col("movieId").alias("item"), "session"
    )
    joined = sessions.join(truth, on=["user", "item"], suffix="_gen")
    assert joined.height == events.height == truth.height
    # the same partition of events: each found session is one generated session, and back
    pairs = joined.select("session", "session_gen").unique()
    assert pairs.height == truth["session"].n_unique() == sessions["session"].n_unique()
    # and after preprocessing, each split's session is part of one generated session
    splits = preprocess(events, **cfg)
    for name, frame in splits.items().items():
        found = frame.join(truth, on=["user", "item"], suffix="_gen")
        assert found.height == frame.height
        per = found.group_by("session").agg(pl.col("session_gen").n_unique())
        assert per["session_gen"].max() == 1, name
        # and no two split sessions share a generated one
        assert found.select("session", "session_gen").unique()["session_gen"].is_unique().all()


def session_similarity(sim: Simulation, lags: tuple[int, ...]) -> dict:
    """Mean cosine between the mean item factors of a user's sessions ``lag`` apart, and of
    random pairs of different users' sessions (key "other")."""
    f = sim.frame
    idx = sim.item_index(f["movieId"].to_numpy())
    ses = f["session"].to_numpy()
    n = int(ses.max()) + 1
    emb = np.zeros((n, sim.item_factors.shape[1]))
    np.add.at(emb, ses, sim.item_factors[idx])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    owner = np.zeros(n, dtype=np.int64)
    owner[ses] = f["userId"].to_numpy()
    out = {}
    for lag in lags:
        a = np.arange(n - lag)
        a = a[owner[a] == owner[a + lag]]
        assert len(a) > 200
        out[lag] = float((emb[a] * emb[a + lag]).sum(1).mean())
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, n, (2, 20_000))
    keep = owner[a] != owner[b]
    out["other"] = float((emb[a[keep]] * emb[b[keep]]).sum(1).mean())
    return out


def test_tastes_drift_across_sessions(default_sim):
    s = session_similarity(default_sim, (1, 8))
    assert s[1] > 0.2 and abs(s["other"]) < 0.05  # a user's sessions share a taste
    assert s[1] - s[8] > 0.15  # ... which moves: recent sessions are closer
    # the controls: without drift the taste stays (no decay), with full drift it is gone
    still = session_similarity(simulate(RatingsSpec(n_users=600, drift=0.0), 1), (1, 8))
    assert abs(still[1] - still[8]) < 0.06
    fresh = session_similarity(simulate(RatingsSpec(n_users=600, drift=1.0), 1), (1, 8))
    assert abs(fresh[1]) < 0.05


def test_train_end_to_end_writes_results(tmp_path):
    paths = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose_cfg(
        [
            "data=synthetic_ratings",
            "data.generate.n_users=300",
            "data.generate.n_items=800",
            "model=hrnn_init",
            "trainer.max_epochs=1",
            *QUICK,
            *paths,
        ],
        tmp_path / "out",
    )
    assert cfg.data.preprocess.min_item_support == 5  # the session-aware preset
    results = run(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == pytest.approx(results)
    assert saved["data"] == "synthetic_ratings" and saved["test/n_events"] > 0
    assert 0.0 <= saved["test/recall@5"] <= 1.0
    (raw,) = (tmp_path / "data" / "synthetic_ratings").iterdir()
    assert raw.name == "u300-i800-f8-s8.0-l6.0-t3.0-d0.35-z1.0-seed0.csv"
    # a second run uses the file and the cache as they are
    again = compose_cfg(
        [
            "mode=prepare",
            "data=synthetic_ratings",
            "data.generate.n_users=300",
            "data.generate.n_items=800",
            *paths,
        ],
        tmp_path / "out2",
    )
    run(again)
    assert len(list((tmp_path / "cache").iterdir())) == 1
