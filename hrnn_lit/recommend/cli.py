"""``mode=recommend``: top-k items for each user of an events file, from a checkpoint
(docs/design.md §13). The events are observed through ``Recommender.observe_many`` and
ranked by ``recommend_many``: the Python API's code path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from hrnn_lit import checkpoints
from hrnn_lit.data.sources import read_events
from hrnn_lit.errors import ConfigError
from hrnn_lit.recommend.checkpoint import EVENTS_COLUMNS
from hrnn_lit.recommend.recommender import Recommender, _check

SOURCE_KEYS = tuple(EVENTS_COLUMNS)


def columns(saved: dict, overrides: list[str] | None) -> dict:
    """The checkpoint's column settings, with ``data.source.KEY=value`` overrides."""
    out = {k: saved.get(k, v) for k, v in EVENTS_COLUMNS.items()}
    for o in overrides or []:
        key, _, value = o.lstrip("+").partition("=")
        if key.startswith("data.source."):
            name = key[len("data.source.") :]
            if name not in SOURCE_KEYS:
                raise ConfigError(f"{key}: not a column setting (one of {list(SOURCE_KEYS)})")
            out[name] = None if value in ("null", "") else value
    return out


def output_path(value) -> Path:
    """The output file, its directory created and checked writable (before any work)."""
    if value is None or str(value) == "":
        raise ConfigError("recommend.output must name a file (.csv or .parquet)")
    out = Path(str(value))
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"recommend.output: {out} must end in .csv or .parquet")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"recommend.output: cannot create {out.parent} ({e.strerror})") from None
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise ConfigError(f"recommend.output: cannot write {out} (not a writable file location)")
    return out


def write_atomic(frame: pl.DataFrame, out: Path) -> None:
    """CSV or Parquet by the file name, through a temporary file: no half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if out.suffix.lower() == ".parquet":
            frame.write_parquet(tmp)
        else:
            frame.write_csv(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recommend(cfg: DictConfig) -> dict:
    """Read ``recommend.input``, observe it, write the top ``recommend.k`` per user."""
    r = cfg.recommend
    _check(k=r.k, at=r.at, exclude=r.exclude)
    if not r.get("input"):
        raise ConfigError("recommend.input must name an events file (CSV, TSV or Parquet)")
    path = checkpoints.resolve(cfg)
    if path is None:
        raise ConfigError("ckpt_path must name a checkpoint when mode=recommend")
    out = output_path(r.output)
    rec = Recommender.from_checkpoint(path)
    if r.get("session_gap") is not None:
        rec.session_gap = int(r.session_gap)
    if rec.session_gap is None:
        raise ConfigError(
            f"ckpt_path: {path} was trained on sessions given by its files; pass "
            "recommend.session_gap=SECONDS to cut the input's sessions by idle time"
        )
    events = read_events(r.input, **columns(rec.columns, checkpoints.explicit_overrides()))
    done = rec.observe_many(events, "user", "item", "ts")
    print(f"recommend: {done.line()}")
    users = events.get_column("user").unique(maintain_order=True)
    recs = rec.recommend_many(users.to_list(), int(r.k), r.at, r.exclude)
    write_atomic(recs, out)
    print(f"recommendations: {out} ({users.len()} users, top {r.k}, at={r.at}, "
          f"exclude={r.exclude})")  # fmt: skip
    return {"output": str(out), "users": users.len(), "observed": done.n_events,
            "skipped_items": done.n_unknown_items, "new_users": done.n_new_users}  # fmt: skip
