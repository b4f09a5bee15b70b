"""Processed-split cache: Parquet splits keyed by a hash of the raw file and the settings.

The key covers the raw file's bytes, the reader's settings and the preprocessing settings,
so a changed file or setting is never served stale. Entries are written to a temporary
directory and renamed into place, so an interrupted run leaves no half-written entry; of
processes writing the same key at once, the first rename wins and the others drop their
copy. Every entry carries ``manifest.json`` (the key, its inputs, each file's row count,
size and checksum), verified on every load: an entry that was truncated, corrupted,
swapped for another entry or partly deleted is reported in one line and rebuilt.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import polars as pl

from hrnn_lit.data.preprocess import SPLITS, Splits, split_stats

FORMAT_VERSION = 2  # bump when the preprocessing code changes what it produces
MANIFEST = "manifest.json"


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


def key_inputs(raw_path: str | Path | None, source, preprocess: dict) -> dict:
    """What an entry depends on (JSON-able): format version, raw file digest, reader and
    preprocessing settings."""
    return json.loads(
        json.dumps(
            {
                "version": FORMAT_VERSION,
                "raw": file_digest(raw_path) if raw_path is not None else None,
                "source": describe_source(source),
                "preprocess": {k: preprocess[k] for k in sorted(preprocess)},
            },
            sort_keys=True,
            default=str,
        )
    )


def key_of(inputs: dict) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def save_splits(splits: Splits, directory: Path, inputs: dict | None = None) -> bool:
    """Write every split as Parquet plus stats.json and the manifest into ``directory``
    atomically. False when another process renamed its copy of the entry into place first
    (this copy is dropped: both hold the same data)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        files = {}
        for name, frame in splits.items().items():
            f = tmp / f"{name}.parquet"
            frame.write_parquet(f)
            files[f.name] = {
                "rows": frame.height,
                "bytes": f.stat().st_size,
                "blake2b": file_digest(f),
            }
        stats = {name: split_stats(frame) for name, frame in splits.items().items()}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        manifest = {
            "key": key_of(inputs) if inputs is not None else None,
            "inputs": inputs,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, directory)  # fails if the entry exists (non-empty directory)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run wrote it first
            return False
        remove_stale(directory)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


STALE_S = 24 * 3600  # a writer's temporary directory this old belongs to a killed process


def remove_stale(directory: Path, max_age_s: float = STALE_S) -> None:
    """Delete temporary and discarded copies of this entry left by killed processes."""
    import time

    now = time.time()
    for p in directory.parent.glob(f".{directory.name}.*"):
        if p.suffix in (".tmp", ".bad") and p.is_dir():
            try:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def check_entry(directory: Path, key: str | None = None) -> str | None:
    """Why the entry cannot be used (one phrase), or None when its manifest checks out:
    present, for this key, every split with the recorded size, checksum and row count."""
    try:
        return _check_entry(Path(directory), key)
    except OSError as e:  # e.g. another process discarded the entry while it was read
        return f"unreadable ({type(e).__name__}: {e.strerror or e})"


def _check_entry(directory: Path, key: str | None) -> str | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest.json"
    if key is not None and manifest.get("key") != key:
        return f"manifest is for key {manifest.get('key')}, not {key} (entry swapped?)"
    for name in SPLITS:
        entry = files.get(f"{name}.parquet")
        f = directory / f"{name}.parquet"
        if not isinstance(entry, dict):
            return f"{f.name} is not in the manifest"
        if not f.is_file():
            return f"{f.name} is missing"
        if f.stat().st_size != entry.get("bytes"):
            return f"{f.name} has {f.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        if file_digest(f) != entry.get("blake2b"):
            return f"{f.name} does not match its checksum"
    return None


def load_splits(directory: Path, key: str | None = None) -> tuple[Splits | None, str | None]:
    """(splits, None) for a good entry; (None, None) when absent; (None, why) when the entry
    exists but cannot be used."""
    directory = Path(directory)
    if not directory.exists():
        return None, None
    why = check_entry(directory, key)
    if why is not None:
        return None, why
    files = json.loads((directory / MANIFEST).read_text())["files"]
    frames = {}
    for name in SPLITS:
        f = directory / f"{name}.parquet"
        try:
            frames[name] = pl.read_parquet(f)
        except Exception as e:  # checksum matched but unreadable: written by a broken run
            return None, f"{f.name} is unreadable ({type(e).__name__})"
        if frames[name].height != files[f.name]["rows"]:
            return None, f"{f.name} has {frames[name].height} rows, the manifest says " + str(
                files[f.name]["rows"]
            )
    return Splits(**frames), None


def discard_entry(directory: Path) -> None:
    """Move a bad entry out of the way (atomic rename), then delete it."""
    directory = Path(directory)
    trash = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.bad")
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(trash, ignore_errors=True)


def report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
