"""Rank discovery (SLURM, torchrun, hrnn_lit's own launcher), device placement order, and a
two-node torchrun run on one machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf

from hrnn_lit import distributed, launch
from hrnn_lit.errors import ConfigError
from hrnn_lit.run import run
from tests.conftest import TINY, compose_cfg

# rank 3 of 4, the second of two tasks on the second of two nodes, as srun sets it
SLURM = {
    "SLURM_JOB_ID": "7213456",
    "SLURM_JOB_NAME": "hrnn_lit_train",
    "SLURM_NODELIST": "node[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}


# the README's SLURM command: 2 nodes x 4 GPUs, one rank per GPU
SLURM_SWEEP = [
    "hydra/launcher=slurm", "hydra.launcher.nodes=2", "trainer.accelerator=gpu",
    "trainer.devices=4",
]  # fmt: skip


def test_slurm_multi_node_rank_address_and_port():
    before = dict(os.environ)
    r = launch.discover(SLURM)
    assert r == launch.Rendezvous(
        "slurm", "node07", 15000 + 3456, rank=3, size=4, local_rank=1, local_size=2
    )
    assert dict(os.environ) == before, "discovery leaves the environment alone"


def test_slurm_master_variables_win_and_one_task_is_no_group():
    r = launch.discover({**SLURM, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456"})
    assert (r.address, r.port) == ("10.0.0.5", 23456)
    assert launch.discover({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert launch.discover({**SLURM, "SLURM_JOB_NAME": "interactive"}) is None


def test_slurm_tasks_per_node_forms():
    env = {**SLURM, "SLURM_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "2"}
    del env["SLURM_NTASKS_PER_NODE"]
    assert launch._slurm_tasks_here(env) == 2
    assert launch._slurm_tasks_here({**env, "SLURM_NODEID": "0"}) == 3


def test_slurm_ntasks_without_per_node_is_a_config_error():
    env = {k: v for k, v in SLURM.items() if "PER_NODE" not in k}
    with pytest.raises(ConfigError, match="SLURM environment.*ntasks-per-node"):
        launch.discover(env)


def test_torchrun_and_own_workers():
    torchrun = {
        "TORCHELASTIC_RUN_ID": "none",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }
    assert launch.discover(torchrun) == launch.Rendezvous(
        "torchrun", "127.0.0.1", 29511, rank=1, size=2, local_rank=0, local_size=1
    )
    own = {launch.WORKER_ENV: "2,3,40001", **SLURM}  # a worker hrnn_lit started wins
    assert launch.discover(own) == launch.Rendezvous("hrnn_lit", "127.0.0.1", 40001, 2, 3, 2, 3)
    assert launch.discover({}) is None
    bad = {k: v for k, v in torchrun.items() if k != "MASTER_PORT"}
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        launch.discover(bad)


def _gpu_cfg(accelerator: str, devices: int = 2):
    return OmegaConf.create({"trainer": {"accelerator": accelerator, "devices": devices}})


def test_gpu_rank_selects_its_device_before_the_group_exists(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(SLURM))
    calls = []
    with (
        mock.patch.object(torch.cuda, "set_device", lambda i: calls.append(("set_device", i))),
        mock.patch.object(
            torch.distributed,
            "init_process_group",
            lambda backend, **kw: calls.append(("init", backend, kw)),
        ),
    ):
        world = launch.setup(_gpu_cfg("gpu"))
    assert calls == [
        ("set_device", 1),
        (
            "init",
            "cpu:gloo,cuda:nccl",
            {"init_method": "tcp://node07:18456", "rank": 3, "world_size": 4},
        ),
    ]
    assert (world.rank, world.size, world.local_rank, world.local_size) == (3, 4, 1, 2)
    assert world.device == torch.device("cuda", 1) and world.owns_group


def test_cpu_rank_uses_gloo_and_no_device(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(SLURM))
    seen = []
    with (
        mock.patch.object(torch.cuda, "set_device", lambda i: seen.append(i)),
        mock.patch.object(
            torch.distributed, "init_process_group", lambda backend, **kw: seen.append(backend)
        ),
    ):
        world = launch.setup(_gpu_cfg("cpu"))
    assert seen == ["gloo"] and world.device == torch.device("cpu")


def test_devices_must_match_the_ranks_a_launcher_started_on_the_node(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(SLURM))  # 2 tasks on this node
    with pytest.raises(ConfigError, match=r"trainer.devices=4, but SLURM tasks per node .* 2"):
        launch.setup(_gpu_cfg("cpu", devices=4))


def test_launch_knows_nothing_of_training_and_its_workers_run_the_given_command(
    monkeypatch, tmp_path
):
    """No launch <-> run import circle: launch imports nothing of hrnn_lit but errors, and
    starts its workers with the command its caller gives (hrnn_lit.run's own entry)."""
    import ast

    tree = ast.parse(Path(launch.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert {m for m in imported if m and m.startswith("hrnn_lit")} == {"hrnn_lit.errors"}
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    monkeypatch.setattr(os, "environ", {})
    with pytest.raises(ValueError, match="worker command"):
        launch._start_workers(cfg, 2, 12345, ())
    started = []
    with mock.patch.object(subprocess, "Popen", lambda cmd, **kw: started.append(cmd)):
        launch._start_workers(cfg, 3, 12345, ["python", "-m", "hrnn_lit.run"])
    cfg_file = str(tmp_path / ".ddp_config.yaml")
    assert started == [["python", "-m", "hrnn_lit.run", cfg_file]] * 2


def test_replicate_moves_the_module_before_broadcasting_its_tensors():
    module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.BatchNorm1d(3))
    events = []
    real_to = module.to

    def to(device):
        events.append(("to", torch.device(device)))
        return real_to("cpu")  # stands in for the GPU

    def broadcast(t, src):
        events.append(("broadcast", t.data_ptr(), src))

    with mock.patch.object(torch.distributed, "broadcast", broadcast):
        module.to = to
        distributed.replicate(module, torch.device("cuda", 1))
    state = module.state_dict()
    assert events[0] == ("to", torch.device("cuda", 1))
    # after the move: every parameter and buffer, in place (their storage as they are now)
    assert events[1:] == [("broadcast", t.data_ptr(), 0) for t in state.values()]
    assert len(events) == 1 + 6  # embedding weight; norm weight, bias, mean, var, count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(node_rank: int, port: int, overrides: list[str]) -> list[str]:
    """The README's two-node command; both "nodes" are this machine, so node 0's address
    is 127.0.0.1."""
    torchrun = Path(sys.executable).with_name("torchrun")  # this Python's torchrun
    exe = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *exe, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "hrnn_lit", *overrides,
    ]  # fmt: skip


def test_two_node_torchrun_equals_one_node_two_processes(tmp_path):
    common = ["logger=none", "model=hrnn_init", "num_threads=1"]
    one_node = run(compose_cfg([*common, "trainer=ddp", "trainer.devices=2"], tmp_path / "one"))
    port = _free_port()
    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    procs = [
        subprocess.Popen(
            torchrun_command(k, port, [*TINY, *common, f"paths.output_dir={out}"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # so that a hung pair can be stopped with its workers
        )
        for k in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=540)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    two_nodes = json.loads((out / "results.json").read_text())
    assert two_nodes["world_size"] == one_node["world_size"] == 2
    tests = [k for k in one_node if k.startswith("test/")]
    assert tests and one_node["test/n_events"] > 0
    assert {k: two_nodes[k] for k in tests} == {k: one_node[k] for k in tests}  # bit for bit


def test_slurm_launcher_spans_nodes_with_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=SLURM_SWEEP, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert list(launcher.setup) == []  # the port comes from the job id, the same on every node


def test_readme_multi_node_commands_are_the_tested_ones():
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Multi-device training", 1)[1].split("\n## ", 1)[0]
    commands = ("torchrun ", "python ")
    lines = [
        shlex.split(line.split("  #")[0])
        for line in section.splitlines()
        if line.startswith(commands)
    ]
    torchrun = [line for line in lines if line[:1] == ["torchrun"]]
    flags = torchrun_command(0, 29500, [])
    assert [line[1:] for line in torchrun] == [flags[flags.index("--nnodes=2") :]]
    slurm = [line for line in lines if "hydra/launcher=slurm" in line]
    assert [line[line.index("-m", 3) + 1 :] for line in slurm] == [SLURM_SWEEP]
