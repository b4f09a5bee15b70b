"""Kill and resume with a real SIGKILL (issue 21's lost-work cases): the default callbacks
keep a last.ckpt at every epoch end, a kill while a checkpoint is written leaves the previous
one intact, and a resumed run reaches the uninterrupted run's metrics and keeps its whole
metrics.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.test_reliability import cli, metrics

THREE_EPOCHS = ["logger=csv", "trainer.max_epochs=3"]  # default callbacks: no step saves
EPOCH = 110  # about the optimiser updates of a TINY epoch (7 batches of up to 16 steps)


def epoch_end(ckpt: dict, epoch: int) -> bool:
    """Whether the checkpoint was written at the end of ``epoch`` (all its batches done)."""
    loop = ckpt["loops"]["fit_loop"]
    done = loop["epoch_loop.batch_progress"]
    return (
        ckpt["epoch"] == epoch
        and loop["epoch_progress"]["current"]["processed"] == epoch + 1
        and done["is_last_batch"]
        and done["total"]["completed"] == 7 * (epoch + 1)
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    done = cli([*THREE_EPOCHS, f"hydra.run.dir={out}"])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def val_rows(run_dir: Path) -> list[tuple]:
    """(epoch, step, val/mrr@5) of every validation row of csv/metrics.csv."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/mrr@5") and r.get("epoch")]
    return [(r["epoch"], r["step"], round(float(r["val/mrr@5"]), 6)) for r in rows]


def assert_same_results(full: Path, resumed: Path) -> None:
    a = json.loads((full / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert metrics(a) and metrics(b) == metrics(a)
    assert val_rows(resumed) == val_rows(full) and len(val_rows(full)) == 3  # all epochs


def test_kill_after_epoch_1_with_default_callbacks_resumes_exactly(tmp_path, full_run):
    run_dir = tmp_path / "killed"
    killed = cli(
        [
            *THREE_EPOCHS,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=tests.helpers.KillAtUpdate",
            f"+callbacks.kill.update={2 * EPOCH + 20}",  # in epoch 2, after two finished
        ]
    )
    assert killed.returncode == -9
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert epoch_end(ckpt, 1)
    resumed = cli([*THREE_EPOCHS, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (epoch 1" in resumed.stdout
    assert_same_results(full_run, run_dir)
    info = json.loads((run_dir / "results.json").read_text())["resumed_from"]
    assert info["global_step"] == ckpt["global_step"] and info["changed"] == {}


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, full_run):
    run_dir = tmp_path / "killed"
    killed = cli(
        [
            *THREE_EPOCHS,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=tests.helpers.KillWhileSaving",
            "+callbacks.kill.save=2",  # epoch 1's checkpoint, half written
        ]
    )
    assert killed.returncode == -9
    ckpt_dir = run_dir / "checkpoints"
    orphans = list(ckpt_dir.glob(".last.ckpt.*"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0, "the half-written temp file"
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert epoch_end(ckpt, 0), "epoch 0's checkpoint, intact"
    resumed = cli([*THREE_EPOCHS, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"], "no orphan left"
    assert_same_results(full_run, run_dir)


def test_time_based_saves_resume_exactly(tmp_path, full_run):
    """every_n_minutes (the default's mid-epoch saves) tiny: a save at every batch end."""
    run_dir = tmp_path / "killed"
    every = "callbacks.model_checkpoint.every_n_minutes=1e-9"
    killed = cli(
        [
            *THREE_EPOCHS,
            every,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=tests.helpers.KillAtUpdate",
            "+callbacks.kill.update=40",  # batch ends at 16, 32, 48: killed at 48's end
        ]
    )
    assert killed.returncode == -9
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 32 and ckpt["epoch"] == 0, "the last batch end before"
    resumed = cli([*THREE_EPOCHS, every, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_results(full_run, run_dir)


def test_ckpt_path_last_with_nothing_to_resume_stops_with_one_line(tmp_path):
    done = cli(["logger=none", f"hydra.run.dir={tmp_path}", "ckpt_path=last"])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_path=last: nothing to resume")
    assert "ckpt_path=auto" in lines[0]
    assert not (tmp_path / "results.json").exists()
