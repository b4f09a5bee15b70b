"""Data-parallel ranks: who they are, where they meet, and the workers hrnn_lit starts itself.

``trainer.devices=N > 1`` runs N processes, one single-device Lightning Trainer each; the
module averages gradients across them after every backward (hrnn_lit/distributed.py has
the collectives, and says why torch's DistributedDataParallel is not used).

The ranks come from one of three places, looked up in this order (``discover``):

- **hrnn_lit's own local launcher**: the job's process is rank 0 and starts ranks
  1..N-1 with the command its caller gives (hrnn_lit.run: ``python -m hrnn_lit.run
  CONFIG``) on the job's resolved config, with ``HRNN_LIT_WORKER=rank,size,port`` in their
  environment. The workers never go through Hydra, so a Hydra multirun (basic or joblib
  launcher) is never re-launched;
- **torchrun / torchelastic** (one or many nodes), or any launcher that sets ``RANK`` and
  ``WORLD_SIZE``: rank, world size, local rank and ranks per node, and the rendezvous
  address from the variables Lightning's TorchElasticEnvironment reads (``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); the group joins torchrun's
  store (``env://``);
- **SLURM** (``srun``, or submitit with tasks_per_node = trainer.devices; one or many
  nodes): Lightning's SLURMEnvironment: the root node is the first host of
  ``SLURM_NODELIST``, the port is derived from ``SLURM_JOB_ID`` (``MASTER_ADDR`` /
  ``MASTER_PORT`` win when set), the local rank is ``SLURM_LOCALID``.

On a GPU each rank first selects ``cuda:<local rank>`` (before anything is created on
it), and the group is ``cpu:gloo,cuda:nccl``: NCCL for device tensors, gloo for the few
CPU tensors the evaluation gathers. On a CPU the group is gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from hrnn_lit.errors import ConfigError

WORKER_ENV = "HRNN_LIT_WORKER"


@dataclass(frozen=True)
class Rendezvous:
    """Where a rank stands in its group and where the group meets."""

    source: str  # "hrnn_lit" | "torchrun" | "slurm"
    address: str
    port: int
    rank: int
    size: int
    local_rank: int
    local_size: int  # ranks on this node (they share its cores)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: list[subprocess.Popen] = field(default_factory=list)
    owns_group: bool = False  # setup created the process group: teardown destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(env: Mapping[str, str] | None = None) -> Rendezvous | None:
    """The rank this process was started as, or None when no launcher started it."""
    env = os.environ if env is None else env
    if WORKER_ENV in env:
        rank, size, port = (int(x) for x in env[WORKER_ENV].split(","))
        return Rendezvous("hrnn_lit", "127.0.0.1", port, rank, size, rank, size)
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return _torchrun(env)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return _slurm(env) if int(env["SLURM_NTASKS"]) > 1 else None
    return None


def _torchrun(env: Mapping[str, str]) -> Rendezvous:
    try:
        return Rendezvous(
            "torchrun",
            env["MASTER_ADDR"],
            int(env["MASTER_PORT"]),
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    except KeyError as e:
        raise ConfigError(f"torchrun environment: variable {e.args[0]} is not set") from None


def _slurm(env: Mapping[str, str]) -> Rendezvous:
    """Lightning's SLURMEnvironment reads os.environ; run it on ``env`` and leave
    os.environ as it was (it writes MASTER_ADDR/MASTER_PORT as it resolves them)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env, saved = dict(env), dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        try:
            slurm = SLURMEnvironment(auto_requeue=False)
        except RuntimeError as e:  # e.g. --ntasks without --ntasks-per-node
            raise ConfigError(f"SLURM environment: {e}") from None
        return Rendezvous(
            "slurm",
            slurm.main_address,
            slurm.main_port,
            slurm.global_rank(),
            slurm.world_size(),
            slurm.local_rank(),
            _slurm_tasks_here(env),
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _slurm_tasks_here(env: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_TASKS_PER_NODE reads e.g. "4", "2(x3)" or "2(x2),1"."""
    per_node = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    counts = []
    for part in per_node.split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_gpu(cfg: DictConfig) -> bool:
    return cfg.trainer.get("accelerator") in ("gpu", "cuda")


def setup(cfg: DictConfig, worker: Sequence[str] = ()) -> World:
    """Join or create the process group (``trainer.devices`` ranks; 1: nothing to do).

    A torchrun group is joined even with one rank (it runs the same collectives as a larger
    one); hrnn_lit's own launcher starts ranks 1..N-1 here, each as the command ``worker``
    with the resolved config's file appended (needed only then).
    """
    gpu = _on_gpu(cfg)
    if dist.is_initialized():  # created by the caller, who also destroys it
        local = int(os.environ.get("LOCAL_RANK", 0))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        device = _device(gpu, local)
        return World(dist.get_rank(), dist.get_world_size(), local, local_size, device)
    found = discover()
    if found is not None:
        _check_devices(cfg, found)
        device = _device(gpu, found.local_rank)
        if found.source == "torchrun":  # torchrun's agent may host the store: join it
            init = "env://"
        else:
            init = f"tcp://{_host(found.address)}:{found.port}"
        _init(gpu, init, found.rank, found.size)
        return World(
            found.rank, found.size, found.local_rank, found.local_size, device, owns_group=True
        )
    devices = cfg.trainer.get("devices", 1)
    n = devices if isinstance(devices, int) else 1
    if n <= 1:  # one process: Lightning places it (and reports a missing GPU)
        return World(device=torch.device("cuda", 0) if gpu else torch.device("cpu"))
    device = _device(gpu, 0)
    port = _free_port()
    workers = _start_workers(cfg, n, port, worker)
    _init(gpu, f"tcp://127.0.0.1:{port}", 0, n)
    return World(0, n, 0, n, device, workers, owns_group=True)


def _check_devices(cfg: DictConfig, found: Rendezvous) -> None:
    """trainer.devices > 1 says how many ranks a node runs: it must be what the launcher
    started (1, the default, leaves the count to the launcher)."""
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 1 and devices != found.local_size:
        how = {"torchrun": "torchrun --nproc_per_node", "slurm": "SLURM tasks per node"}
        raise ConfigError(
            f"trainer.devices={devices}, but {how.get(found.source, 'the launcher')} started "
            f"{found.local_size} rank(s) on this node: set trainer.devices={found.local_size}"
        )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address  # IPv6 literal in a URL


def _device(gpu: bool, local_rank: int) -> torch.device:
    """Select this rank's GPU before any CUDA tensor or NCCL communicator exists."""
    if not gpu:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _init(gpu: bool, init_method: str, rank: int, size: int) -> None:
    backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)


def _start_workers(
    cfg: DictConfig, n: int, port: int, worker: Sequence[str]
) -> list[subprocess.Popen]:
    if not worker:
        raise ValueError("launch.setup: trainer.devices > 1 needs the worker command")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / ".ddp_config.yaml"
    OmegaConf.save(cfg, cfg_file, resolve=True)
    workers = []
    for rank in range(1, n):
        env = {**os.environ, WORKER_ENV: f"{rank},{n},{port}"}
        log = open(out / f".ddp_rank{rank}.log", "w")  # noqa: SIM115 - closed with the process
        workers.append(
            subprocess.Popen(
                [*worker, str(cfg_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return workers


def teardown(world: World, failed: bool = False) -> None:
    """Leave the process group; rank 0 waits for its workers and reports a failed one."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    for w in world.workers:
        if failed:
            w.terminate()
        code = w.wait()
        if code != 0 and not failed:
            raise RuntimeError(f"a DDP worker exited with status {code}; see .ddp_rank*.log")
