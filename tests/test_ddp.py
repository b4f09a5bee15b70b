"""Data-parallel runs: real 2-process gloo groups on CPU."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert two["test_repeat/n_events"] + two["test_explore/n_events"] == two["test/n_events"]
    for key, value in one.items():
        if key.startswith(("test/", "test_by_", "test_repeat/", "test_explore/")):
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


def test_a_network_touching_more_rows_than_b_plus_s_trains_data_parallel(tmp_path):
    """TiedNet's one item table gets up to 2 B + S touched rows per step (the built-in
    step's bound is B + S): gradients are averaged over the ranks (check_in_sync after
    training would fail otherwise) and the run ends with results."""
    over = ["logger=none", "callbacks=none", "model=session_rnn",
            "model.net={_target_:tests.nets.TiedNet,hidden_size:8}", "model.n_sample=4",
            "trainer=ddp"]  # fmt: skip
    res = run(compose_cfg(over, tmp_path))
    assert res["world_size"] == 2 and res["engine"] == "autograd"
    assert 0 < res["test/recall@20"] <= 1
    assert not torch.distributed.is_initialized()


def _average_on_rank(rank: int, port: int, max_rows: int | None, out: str) -> None:
    import torch.distributed as dist

    from hrnn_lit.distributed import average_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    table, dense = torch.zeros(50, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    rows = torch.arange(0, 30) if rank == 0 else torch.tensor([7, 45])  # rank 0: over 10
    g = torch.Generator().manual_seed(rank)
    vals = torch.randn(len(rows), 3, generator=g)
    table.grad = torch.sparse_coo_tensor(rows[None], vals, table.shape)
    dense.grad = torch.full((4,), float(rank + 1))
    average_gradients([dense, table], max_rows)
    torch.save({"table": table.grad.to_dense(), "dense": dense.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("max_rows", [10, 40, None])
def test_average_gradients_takes_any_number_of_touched_rows(max_rows, tmp_path):
    """Two gloo ranks touching 30 and 2 rows: every rank ends with the mean of the two
    ranks' gradients, whether max_rows bounds both ranks (40), only one (10) or is not given."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.spawn(_average_on_rank, args=(port, max_rows, out), nprocs=2, join=True)
    want = torch.zeros(50, 3)
    for rank, rows in ((0, torch.arange(0, 30)), (1, torch.tensor([7, 45]))):
        g = torch.Generator().manual_seed(rank)
        want[rows] += torch.randn(len(rows), 3, generator=g) / 2
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(got["table"], want, rtol=0, atol=1e-7)
        torch.testing.assert_close(got["dense"], torch.full((4,), 1.5))


def test_ddp_prints_no_lightning_advice_and_says_whose_events_per_s(tmp_path):
    """The CLI under trainer=ddp: no Lightning "sync_dist" lines on the console nor in the
    worker's log; perf/ gives the total over the 2 ranks and the per-process rate."""
    import subprocess
    import sys

    from tests.conftest import TINY

    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *TINY, "trainer=ddp", "logger=none",
         "callbacks=none", f"hydra.run.dir={out}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    advice = "sync_dist=True)` when logging"
    assert advice not in p.stderr + p.stdout and "Warning" not in p.stderr, p.stderr
    assert advice not in (out / ".ddp_rank1.log").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    for kind in ("train", "eval"):
        total, each = res[f"perf/{kind}_events_per_s"], res[f"perf/{kind}_events_per_s_per_process"]
        assert total > 0 and each == pytest.approx(total / 2)
