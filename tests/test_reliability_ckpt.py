"""Reliability matrix, training side (issue 21): checkpoint and config mistakes stop with one
line, a resumed run applies and records a changed optimiser setting, the divergence guard,
non-finite scores at evaluation, and batches wider than the users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hrnn_lit.config import validate
from hrnn_lit.errors import ConfigError, NumericalError
from hrnn_lit.loggers import resume_wandb_runs
from hrnn_lit.run import run
from tests.conftest import compose_cfg
from tests.test_reliability import cli, metrics

BASE = ["logger=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch run with the default callbacks: its last.ckpt."""
    out = tmp_path_factory.mktemp("trained")
    run(compose_cfg(BASE, out))
    return out / "checkpoints" / "last.ckpt"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04garbage"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, mode, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        run(compose_cfg([*BASE, f"mode={mode}", f"ckpt_path={bad}"], tmp_path / "out"))
    assert one_line(e).startswith(f"ckpt_path: {bad} is not a readable checkpoint")


def test_resuming_a_checkpoint_of_another_size_is_one_line(tmp_path, trained):
    cfg = compose_cfg([*BASE, f"ckpt_path={trained}", "model.hidden_size=8"], tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert "model.hidden_size: 16 in the checkpoint, 8 here" in one_line(e)
    assert not (tmp_path / "results.json").exists()


def test_resuming_with_another_optimiser_is_refused(tmp_path, trained):
    cfg = compose_cfg([*BASE, f"ckpt_path={trained}", "model.optimizer=adam"], tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert one_line(e).startswith("model.optimizer:") and "'adagrad'" in str(e.value)


def test_resume_applies_and_records_a_changed_lr(tmp_path, trained):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(trained.read_bytes())
    cfg = compose_cfg([*BASE, "ckpt_path=last", "trainer.max_epochs=2", "model.lr=0.05"], out)
    results = run(cfg)
    assert results["resumed_from"]["changed"] == {"model.lr": [0.1, 0.05]}
    after = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["epoch"] == 1
    assert {g["lr"] for g in after["optimizer_states"][0]["param_groups"]} == {0.05}
    assert after["hyper_parameters"]["lr"] == 0.05
    saved = json.loads((out / "results.json").read_text())
    assert saved["resumed_from"]["changed"] == {"model.lr": [0.1, 0.05]}


def test_ckpt_path_auto_starts_fresh_without_a_checkpoint(tmp_path):
    results = run(compose_cfg([*BASE, "ckpt_path=auto"], tmp_path))
    assert "resumed_from" not in results and (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_config_numbers_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=f"model.lr must be a number >= 0.0, got {value}"):
        validate(compose_cfg([f"model.lr={value}"], tmp_path))


def test_huge_lr_diverges_and_stops_with_one_line_without_a_checkpoint(tmp_path):
    cfg = compose_cfg([*BASE, "model.lr=1e30", "trainer.max_epochs=2"], tmp_path)
    with pytest.raises(NumericalError) as e:
        run(cfg)
    msg = one_line(e)
    assert msg.startswith("training diverged: the parameter norm") and "epoch 0" in msg
    assert "No checkpoint was written" in msg
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "results.json").exists()


def test_nan_stop_before_any_checkpoint_does_not_promise_one(tmp_path):
    cfg = compose_cfg(
        [*BASE, "+callbacks.poison._target_=tests.helpers.PoisonAtBatch",
         "+callbacks.poison.batch=1"],  # fmt: skip
        tmp_path,
    )
    with pytest.raises(NumericalError) as e:
        run(cfg)
    msg = one_line(e)
    assert "No checkpoint was written" in msg and "Checkpoints hold" not in msg


def test_nan_in_one_items_output_bias_stops_evaluation(tmp_path, trained):
    ckpt = torch.load(trained, weights_only=True)
    (key,) = [k for k in ckpt["state_dict"] if k.endswith("out_b.weight")]
    ckpt["state_dict"][key][5] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(NumericalError) as e:
        run(compose_cfg([*BASE, "mode=test", f"ckpt_path={bad}"], tmp_path / "out"))
    assert "item index 5" in one_line(e) and "refusing to report metrics" in str(e.value)
    assert not (tmp_path / "out" / "results.json").exists()


def test_batch_wider_than_the_users_is_clamped_to_the_same_run(tmp_path, capsys):
    wide = run(compose_cfg([*BASE, "data.batch_size=100000"], tmp_path / "wide"))
    out = capsys.readouterr().out
    line = [s for s in out.splitlines() if s.startswith("data.batch_size=100000")]
    assert len(line) == 1 and "users of the fit split: using" in line[0]
    n = int(line[0].split("using ")[1].split()[0])
    exact = run(compose_cfg([*BASE, f"data.batch_size={n}"], tmp_path / "exact"))
    assert metrics(wide) == metrics(exact)


def test_data_stage_line_before_training(tmp_path, capsys):
    run(compose_cfg([*BASE, "callbacks=none"], tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data synthetic: generated and preprocessed in ")


def test_resumed_wandb_logger_continues_the_checkpoints_run():
    from omegaconf import OmegaConf

    cfgs = OmegaConf.create({"wandb": {"_target_": "x.WandbLogger", "project": "p"}})
    resume_wandb_runs(cfgs, "abc123")
    assert cfgs.wandb.id == "abc123" and cfgs.wandb.resume == "allow"


# ------------------------------------------------------------------ mode=test (CLI)


@pytest.fixture(scope="module")
def session_rnn_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("session_rnn")
    run(compose_cfg([*BASE, "model=session_rnn"], out))
    return out / "checkpoints" / "last.ckpt"


def test_mode_test_takes_the_model_config_from_the_checkpoint(tmp_path, session_rnn_ckpt):
    done = cli(
        ["logger=none", "mode=test", f"ckpt_path={session_rnn_ckpt}", f"hydra.run.dir={tmp_path}"]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"mode=test: model session_rnn as configured in {session_rnn_ckpt}" in done.stdout
    assert json.loads((tmp_path / "results.json").read_text())["model"] == "session_rnn"


def test_mode_test_with_a_conflicting_model_stops_with_one_line(tmp_path, session_rnn_ckpt):
    done = cli(
        ["logger=none", "mode=test", "model=hrnn_init", f"ckpt_path={session_rnn_ckpt}",
         f"hydra.run.dir={tmp_path}"]
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model=hrnn_init conflicts with")
    assert "name: 'session_rnn' in the checkpoint, 'hrnn_init' here" in lines[0]
    assert not (tmp_path / "results.json").exists()


def test_resumed_run_continues_the_wandb_run_of_its_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(compose_cfg(["logger=wandb"], tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    run_id = ckpt["hrnn_lit_run"]["wandb_id"]
    run(compose_cfg(["logger=wandb", "ckpt_path=last", "trainer.max_epochs=2"], tmp_path))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)


def test_a_checkpoint_of_other_data_is_one_line(tmp_path, trained):
    cfg = compose_cfg([*BASE, "mode=test", f"ckpt_path={trained}", "data.source.seed=3"], tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = one_line(e)
    assert msg.startswith(f"ckpt_path: {trained} does not fit this model (n_items: ")
    assert "another dataset or preprocessing?" in msg


def test_mid_epoch_resume_with_another_plan_is_refused(tmp_path):
    run(compose_cfg([*BASE, "+trainer.max_steps=32"], tmp_path))  # stops inside epoch 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 32 and ckpt["hrnn_lit_run"]["data"]["batch_size"] == 16
    with pytest.raises(ConfigError, match="^data: the splits differ"):
        run(compose_cfg([*BASE, "ckpt_path=last", "data.preprocess.session_gap=1801"], tmp_path))
    for change in ("data.batch_size=8", "data.steps_per_batch=8", "data.seed=5"):
        cfg = compose_cfg([*BASE, "ckpt_path=last", change], tmp_path)
        with pytest.raises(ConfigError) as e:
            run(cfg)
        key = change.split("=")[0]
        assert one_line(e).startswith(f"{key}: ") and "written mid-epoch" in str(e.value)
