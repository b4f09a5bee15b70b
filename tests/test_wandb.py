"""An offline W&B run: one run per job, a syncable directory holding the metrics."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from hrnn_lit.run import run
from tests.conftest import compose_cfg

BLOCK = 32768


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb transaction log (LevelDB log format after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def test_offline_wandb_run_is_syncable_with_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg(["logger=wandb", "callbacks=none", "logger.wandb.name=unit"], tmp_path)
    results = run(cfg)
    import wandb

    assert wandb.run is None, "wandb.finish() was called"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, "the syncable transaction log exists"
    for _ in range(40):  # the writer process may still be flushing after finish()
        records = read_wandb_records(logs[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.25)
    history: dict[str, list] = {}
    config_keys: set[str] = set()
    names = set()
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "config":
            config_keys |= {item.key for item in rec.config.update}
        elif kind == "run":
            names.add(rec.run.display_name)
    assert history["test/recall@5"][-1] == pytest.approx(results["test/recall@5"])
    assert "train/loss_epoch" in history and "val/mrr@5" in history
    assert "perf/train_events_per_s" in history
    logged = " ".join(history)
    assert "test_by_position/table/" in logged, "breakdown table logged"
    assert "test_by_position/recall@5_table/" in logged, "breakdown chart logged"
    assert "test_by_history/table/" in logged
    assert {"model", "data", "seed"} <= config_keys
    assert "unit" in names
