"""Data-parallel runs: real 2-process gloo groups on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hrnn_lit.run import run
from tests.conftest import compose_cfg

BASE = ["logger=none", "model=hrnn_init"]


def test_shards_are_disjoint_balanced_and_equally_long(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg([], tmp_path)
    loaders, users, targets = [], [], []
    for rank in range(3):
        dm = instantiate(cfg.data)
        dm.shard(rank, 3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loaders.append(len(loader))
        shard = loader.dataset.steps
        users.append(set(np.unique(shard.user).tolist()))
        targets.append(int(sum(b.n_events for b in loader)))
    assert len(set(loaders)) == 1, "every rank runs the same number of batches"
    assert not (users[0] & users[1]) and not (users[1] & users[2]) and not (users[0] & users[2])
    assert sum(targets) == len(dm.fit_steps), "no step lost or duplicated"
    assert max(targets) - min(targets) <= 0.1 * max(targets), targets


def test_two_process_eval_equals_one_process_for_same_checkpoint(tmp_path):
    run(compose_cfg(BASE, tmp_path / "train"))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    one = run(compose_cfg([*BASE, "mode=test", f"ckpt_path={ckpt}"], tmp_path / "one"))
    two = run(
        compose_cfg([*BASE, "mode=test", f"ckpt_path={ckpt}", "trainer=ddp"], tmp_path / "two")
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["test/n_events"] == one["test/n_events"] > 0
    for key, value in one.items():
        if key.startswith(("test/", "test_by_")):
            assert two[key] == pytest.approx(value, abs=1e-9), key
    assert not torch.distributed.is_initialized()


def test_two_process_training_runs_and_writes_results(tmp_path):
    results = run(compose_cfg([*BASE, "trainer=ddp"], tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["world_size"] == 2
    assert saved["test/recall@20"] == pytest.approx(results["test/recall@20"])
    assert 0 < saved["test/recall@20"] <= 1


def test_multirun_with_ddp_does_not_relaunch_the_sweep(tmp_path):
    import subprocess
    import sys

    from tests.conftest import TINY

    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hrnn_lit",
            "-m",
            *TINY,
            *BASE,
            "trainer=ddp",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = sorted(sweep.rglob("results.json"))
    assert [r.parent.name for r in results] == ["0", "1"], results
    seeds = [json.loads(r.read_text())["seed"] for r in results]
    assert seeds == [0, 1]
    assert all(json.loads(r.read_text())["world_size"] == 2 for r in results)
    assert not (sweep / "2").exists() and not list(sweep.rglob("multirun.yaml"))[1:]
