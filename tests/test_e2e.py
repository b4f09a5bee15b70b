"""Each model config composes and runs one short epoch end to end; the CLI's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hrnn_lit.errors import ConfigError
from hrnn_lit.run import run
from tests.conftest import TINY, compose_cfg

MODELS = ["session_rnn", "rnn_concat", "hrnn_init", "hrnn_all", "hrnn_init_output"]
KS = (5, 10, 20)


@pytest.mark.parametrize("model", MODELS)
def test_model_runs_one_epoch(model, tmp_path):
    cfg = compose_cfg([f"model={model}", "logger=none", "callbacks=none"], tmp_path)
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == pytest.approx(results)
    assert saved["model"] == model and saved["data"] == "synthetic" and saved["seed"] == 0
    for k in KS:
        for m in ("recall", "mrr", "ndcg"):
            assert 0.0 <= saved[f"test/{m}@{k}"] <= 1.0
            assert f"val/{m}@{k}" in saved
    # recall is monotone in K and bounds MRR / NDCG
    assert saved["test/recall@5"] <= saved["test/recall@10"] <= saved["test/recall@20"]
    assert saved["test/mrr@20"] <= saved["test/ndcg@20"] <= saved["test/recall@20"]
    assert saved["test/n_events"] > 0
    assert saved["perf/train_events_per_s"] > 0 and saved["perf/eval_events_per_s"] > 0


def test_losses_and_adam_run(tmp_path):
    for i, ov in enumerate(
        [
            ["model.loss=cross-entropy", "model.n_sample=32"],
            ["model.loss=bpr", "model.optimizer=adam", "model.lr=0.01"],
        ]
    ):
        cfg = compose_cfg(["logger=none", "callbacks=none", *ov], tmp_path / str(i))
        results = run(cfg)
        assert 0.0 <= results["test/recall@20"] <= 1.0


def test_fit_on_train_skips_validation(tmp_path):
    cfg = compose_cfg(["logger=none", "callbacks=none", "data.fit_split=train"], tmp_path)
    results = run(cfg)
    assert "test/recall@5" in results and "val/recall@5" not in results


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.batch_size=-3", "data.batch_size"),
        ("eval.ks=[]", "eval.ks"),
        ("model.loss=hinge", "model.loss"),
        ("model.dropout_user=1.5", "model.dropout_user"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.precision=16-mixed", "trainer.precision"),
    ],
)
def test_bad_config_values_name_the_key(override, key, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(cfg)
    assert not (tmp_path / "results.json").exists()


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_writes_results_and_prints_table(tmp_path):
    out = tmp_path / "run"
    p = cli([*TINY, "model=session_rnn", f"hydra.run.dir={out}"], Path.cwd())
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "session_rnn"
    assert "Recall" in p.stdout and f"{results['test/recall@5']:.4f}" in p.stdout
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "csv" / "metrics.csv").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.batch_size=-1", "data.batch_size"),
        ("eval.ks=[]", "eval.ks"),
        ("model=nope", "model"),
    ],
)
def test_cli_bad_config_is_one_line_not_a_traceback(override, needle, tmp_path):
    p = cli([override, f"hydra.run.dir={tmp_path / 'run'}"], Path.cwd())
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    first = p.stderr.strip().splitlines()[0]
    assert needle in first, p.stderr
    assert not (tmp_path / "run" / "results.json").exists()
