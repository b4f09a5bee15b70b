"""Processed-split cache: Parquet splits keyed by a hash of the raw file and the settings.

The key covers the raw file's bytes, the reader's settings and the preprocessing settings,
so a changed file or setting is never served stale. Entries are written to a temporary
directory and renamed into place, so an interrupted run leaves no half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import polars as pl

from hrnn_lit.data.preprocess import SPLITS, Splits, split_stats

FORMAT_VERSION = 1  # bump when the preprocessing code changes what it produces


def file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_source(source) -> dict:
    """A JSON-able description of a (partial) reader: function name and arguments."""
    if isinstance(source, functools.partial):
        name = f"{source.func.__module__}.{source.func.__qualname__}"
        return {
            "fn": name,
            "args": [str(a) for a in source.args],
            "kwargs": {k: str(v) for k, v in sorted(source.keywords.items())},
        }
    return {"fn": f"{getattr(source, '__module__', '')}.{getattr(source, '__qualname__', source)}"}


def cache_key(raw_path: str | Path | None, source, preprocess: dict) -> str:
    payload = {
        "version": FORMAT_VERSION,
        "raw": file_digest(raw_path) if raw_path is not None else None,
        "source": describe_source(source),
        "preprocess": {k: preprocess[k] for k in sorted(preprocess)},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def save_splits(splits: Splits, directory: Path) -> None:
    """Write every split as Parquet plus stats.json into ``directory`` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        for name, frame in splits.items().items():
            frame.write_parquet(tmp / f"{name}.parquet")
        stats = {name: split_stats(frame) for name, frame in splits.items().items()}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if directory.exists():  # a concurrent run wrote the same entry first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_splits(directory: Path) -> Splits | None:
    """The cached splits, or None when the entry is absent or incomplete."""
    directory = Path(directory)
    files = {name: directory / f"{name}.parquet" for name in SPLITS}
    if not all(f.exists() for f in files.values()):
        return None
    return Splits(**{name: pl.read_parquet(f) for name, f in files.items()})
