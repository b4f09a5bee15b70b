"""Reproducibility, resume after a kill, NaN stops, documented rules for odd inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import pytorch_lightning as lightning
import torch

from hrnn_lit.errors import NumericalError
from hrnn_lit.models.loss_checks import LossChecks
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.ops import native
from hrnn_lit.run import run
from tests.conftest import TINY, compose_cfg
from tests.helpers import small_dm


def metrics(results: dict) -> dict:
    return {k: v for k, v in results.items() if k.startswith(("test", "val/"))}


def test_same_seed_same_metrics_and_run_info(tmp_path):
    a = run(compose_cfg(["logger=none", "callbacks=none"], tmp_path / "a"))
    b = run(compose_cfg(["logger=none", "callbacks=none"], tmp_path / "b"))
    assert metrics(a) == metrics(b)
    c = run(compose_cfg(["logger=none", "callbacks=none", "seed=1"], tmp_path / "c"))
    assert metrics(c) != metrics(a)
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    assert set(info["git"]) == {"revision", "dirty"}
    assert info["native_kernels"] is (native.load() is not None)
    assert "hidden_size: 16" in (tmp_path / "a" / "config.yaml").read_text()


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *TINY, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    common = [
        "logger=none",
        "trainer.max_epochs=2",
        "callbacks.model_checkpoint.every_n_train_steps=32",
    ]
    full = cli([*common, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = tmp_path / "killed"
    killed = cli(
        [
            *common,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=tests.helpers.KillAtUpdate",
            "+callbacks.kill.update=80",
        ]
    )
    assert killed.returncode == -9, "the process was killed mid-epoch"
    assert not (run_dir / "results.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 64 and ckpt["epoch"] == 0, "a mid-epoch checkpoint"
    resumed = cli([*common, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    for key, value in metrics(a).items():
        assert round(b[key], 4) == round(value, 4), key


@pytest.mark.parametrize(
    "deferred,every,last_good", [(False, 16, 48), (True, 16, 48), (True, 32, 32)]
)
def test_nan_loss_stops_with_message_and_keeps_good_checkpoint(
    tmp_path, monkeypatch, deferred, every, last_good
):
    """The poisoned chunk's updates are 48-63. Deferred: the check CUDA runs (a chunk checked
    once the next one is queued), forced on CPU; the save at update 64 comes before the
    next chunk's end, where that check would run, and does the check itself."""
    if deferred:
        monkeypatch.setattr(RecurrentRecommender, "_checks_behind", lambda self: 1)
    cfg = compose_cfg(
        [
            "logger=none",
            "trainer.max_epochs=2",
            f"callbacks.model_checkpoint.every_n_train_steps={every}",
            "+callbacks.poison._target_=tests.helpers.PoisonAtBatch",
            "+callbacks.poison.batch=3",
        ],
        tmp_path,
    )
    with pytest.raises(NumericalError) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "batch 3" in msg and "update 48" in msg
    assert "last finite loss" in msg and "at update 47" in msg
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == last_good
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert not (tmp_path / "results.json").exists()


def test_deferred_checks_leave_no_chunk_unchecked(monkeypatch):
    checked = []
    monkeypatch.setattr(RecurrentRecommender, "_checks_behind", lambda self: 1)
    real = LossChecks._check_chunk
    monkeypatch.setattr(
        LossChecks,
        "_check_chunk",
        lambda self, losses, epoch, batch, first, kept: (
            checked.append((epoch, batch)) or real(self, losses, epoch, batch, first, kept)
        ),
    )
    dm = small_dm()
    model = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts, hidden_size=8)
    trainer = lightning.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, max_epochs=2,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    n = trainer.num_training_batches
    assert checked == [(e, b) for e in range(2) for b in range(n)]  # in order, each once
    assert model.checks.unchecked == []


def write_events(path: Path, sessions: dict[str, list[list[int]]]) -> None:
    rows, t = [], 1_600_000_000
    for user, user_sessions in sessions.items():
        for s in user_sessions:
            t += 10_000
            for item in s:
                t += 30
                rows.append((user, item, t))
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)


def test_rules_for_new_users_short_sessions_unknown_items_and_big_batches(tmp_path):
    sessions = {f"u{u}": [[1, 2, 3], [2, 3, 4], [3, 4, 1, 2]] for u in range(8)}
    sessions["new"] = [[1, 2, 4]]  # a test user with no earlier session
    sessions["short"] = [[1, 2], [3, 4], [2]]  # last session of one event: nothing to predict
    # 77 is seen in train but not in valid_train, the fit split: unknown to the model
    sessions["unknown"] = [[1, 2], [3, 4], [5, 77], [1, 77, 2]]
    path = tmp_path / "events.csv"
    write_events(path, sessions)
    base = [
        "data=events",
        f"data.path={path}",
        "logger=none",
        "callbacks=none",
        "data.preprocess.min_item_support=1",
        "data.preprocess.min_user_sessions=1",
        "data.preprocess.min_session_len=1",
        "data.preprocess.min_test_session_len=1",
        "data.fit_split=valid_train",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    small = run(compose_cfg([*base, "data.batch_size=2"], tmp_path / "small"))
    big = run(
        compose_cfg([*base, "data.batch_size=1000", "data.eval_batch_size=1000"], tmp_path / "big")
    )
    # 8 users x 3 targets + "new" 2 + "unknown" 1 (77 removed, 1 -> 2 remains); "short": 0
    assert small["test/n_events"] == big["test/n_events"] == 8 * 3 + 2 + 1
    assert small["data/n_test_users_without_history"] == 1
    assert small["data/n_dropped_test_events"] == 1
