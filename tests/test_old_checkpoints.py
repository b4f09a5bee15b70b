"""Checkpoints written before the one training path (revision 23d3f7c, the hand-written
engine; tests/data/before_one_path/) test to the metrics that revision reported and resume,
including a custom network recorded under its class's old path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hrnn_lit.run import run
from tests.conftest import compose_cfg

DATA = Path(__file__).parent / "data" / "before_one_path"
SIZES = {"hrnn_init": ["model.hidden_size=8", "model.user_hidden_size=8"], "attention_hrnn": []}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_an_old_checkpoint_tests_to_its_recorded_metrics(tmp_path, name):
    want = json.loads((DATA / f"{name}.json").read_text())["metrics"]
    ckpt = DATA / f"{name}.ckpt"
    got = run(compose_cfg(["logger=none", "mode=test", f"ckpt_path={ckpt}"], tmp_path))
    tests = {k: v for k, v in want.items() if k.startswith("test/")}
    assert tests and {k: got[k] for k in tests} == pytest.approx(tests, abs=1e-12)


def test_an_old_checkpoint_resumes(tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(DATA / "hrnn_init.ckpt", out / "checkpoints" / "last.ckpt")
    overrides = ["logger=none", "ckpt_path=last", "trainer.max_epochs=2", *SIZES["hrnn_init"]]
    results = run(compose_cfg(overrides, out))
    assert results["resumed_from"]["epoch"] == 0 and 0 < results["test/recall@20"] <= 1
