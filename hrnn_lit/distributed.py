"""Data-parallel training over N processes (``trainer.devices=N``), one Lightning process
per rank.

Why not Lightning's DDP strategy: hrnn_lit makes one optimiser update per time step, many
per Lightning batch, and torch's DistributedDataParallel reducer supports one backward per
forward. So each rank runs a single-device Trainer, and the module averages gradients
across ranks after every backward (dense grads: one all-reduce; row-sparse item-table
grads: one all-gather of the touched rows), keeping the rows-only updates.

Ranks are created in one of two ways:
- by hrnn_lit: the job's process is rank 0 and starts ranks 1..N-1 as
  ``python -m hrnn_lit.distributed CONFIG RANK WORLD PORT`` on the job's resolved config.
  The workers never go through Hydra, so a Hydra multirun is never re-launched;
- externally, by torchrun or SLURM (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/
  ``SLURM_NTASKS`` in the environment; with submitit set tasks_per_node = trainer.devices).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

WORKER_ENV = "HRNN_LIT_WORKER"


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _external() -> tuple[int, int, int] | None:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
        )
    return None


def setup(cfg: DictConfig) -> World:
    """Join or create the process group for ``trainer.devices`` ranks (1: nothing to do)."""
    devices = cfg.trainer.get("devices", 1)
    n = devices if isinstance(devices, int) else 1
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cfg.trainer.get("accelerator") in ("gpu", "cuda") else "gloo"
    if WORKER_ENV in os.environ:  # started by rank 0 below
        rank, size, port = (int(x) for x in os.environ[WORKER_ENV].split(","))
        _init(backend, f"tcp://127.0.0.1:{port}", rank, size)
        return World(rank, size, rank)
    external = _external()
    if external is not None:
        rank, size, local = external
        if size > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            _init(backend, "env://", rank, size)
        return World(rank, size, local)
    if n <= 1:
        return World()
    port = _free_port()
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
                [sys.executable, "-m", "hrnn_lit.distributed", str(cfg_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    _init(backend, f"tcp://127.0.0.1:{port}", 0, n)
    return World(0, n, 0, workers)


def _init(backend: str, init_method: str, rank: int, size: int) -> None:
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)


def teardown(world: World, failed: bool = False) -> None:
    """Leave the process group; rank 0 waits for its workers and reports a failed one."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    for w in world.workers:
        if failed:
            w.terminate()
        code = w.wait()
        if code != 0 and not failed:
            raise RuntimeError(f"a DDP worker exited with status {code}; see .ddp_rank*.log")


def gather_cat(t: Tensor) -> Tensor:
    """Concatenate a 1-d tensor of any length from every rank (rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def average_gradients(params: list[Tensor], max_rows: int) -> None:
    """Average every parameter's gradient over the ranks.

    Dense grads (and a has-grad flag each) go in one all-reduce. Row-sparse grads (at most
    ``max_rows`` touched rows per table) are padded to ``max_rows`` rows and all-gathered in
    one call for indices and one for values, then summed as a sparse tensor.
    """
    world = dist.get_world_size()
    dense, sparse = [], []
    for p in params:
        (sparse if p.grad is not None and p.grad.is_sparse else dense).append(p)
    device = params[0].device
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense]
        + [torch.tensor([float(p.grad is not None) for p in dense], device=device)]
    )
    dist.all_reduce(flat)
    flags = flat[-len(dense) :]
    offset = 0
    for p, flag in zip(dense, flags.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) / world if flag > 0 else None
        offset += n
    if not sparse:
        return
    idx_parts, val_parts = [], []
    for p in sparse:
        g = p.grad.coalesce()
        rows, vals = g.indices()[0], g.values()
        if rows.numel() > max_rows:
            raise RuntimeError(f"{rows.numel()} touched rows exceed max_rows={max_rows}")
        idx = torch.zeros(max_rows, dtype=torch.long, device=device)
        val = torch.zeros(max_rows, p.shape[1], dtype=vals.dtype, device=device)
        idx[: rows.numel()] = rows
        val[: rows.numel()] = vals
        idx_parts.append(idx)
        val_parts.append(val.reshape(-1))
    idx_all, val_all = torch.cat(idx_parts), torch.cat(val_parts)
    idx_g = [torch.zeros_like(idx_all) for _ in range(world)]
    val_g = [torch.zeros_like(val_all) for _ in range(world)]
    dist.all_gather(idx_g, idx_all)
    dist.all_gather(val_g, val_all)
    i_off = v_off = 0
    for p in sparse:
        d = p.shape[1]
        rows = torch.cat([g[i_off : i_off + max_rows] for g in idx_g])
        vals = torch.cat([g[v_off : v_off + max_rows * d].view(max_rows, d) for g in val_g])
        p.grad = torch.sparse_coo_tensor(rows[None], vals / world, p.shape).coalesce()
        i_off += max_rows
        v_off += max_rows * d


def check_in_sync(module: torch.nn.Module) -> None:
    """Raise if the ranks' parameters differ (they must stay identical after every step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    total = torch.stack([p.detach().double().sum() for p in module.parameters()])
    parts = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, total)
    if not all(torch.equal(parts[0], q) for q in parts[1:]):
        raise RuntimeError("data-parallel ranks hold different parameters after training")


def _worker_main(cfg_file: str) -> None:
    """Entry of ranks 1..N-1: the resolved job config, no Hydra."""
    from hrnn_lit.run import train

    cfg = OmegaConf.load(cfg_file)
    train(cfg)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
