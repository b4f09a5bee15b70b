"""The prepared GPU check: the one training path on CUDA against the CPU, data-parallel
training, the bench on CUDA and the official GRU4Rec comparison.

    python experiments/gpu_check.py --out OUT [--official DIR] [--skip-bench]

Run it on a machine with a CUDA GPU (one is enough), from the repository root, with this
project installed. Every step has its own time limit and writes its output under OUT; a
failed step is recorded and the next one runs. OUT/gpu_check.txt is the summary to commit
to experiments/results/ (with the JSON files next to it).

0. **CUDA matches the CPU**: one epoch of each built-in recurrent model and of the model-API
   networks on the default data in float64 (``trainer.precision=64-true``), in-batch
   negatives and no dropout (no random draws, which differ between devices), on the GPU
   and on the CPU: the test metrics must agree to 1e-6 (relative).

1. **1-rank NCCL group, end to end**: ``torchrun --nproc_per_node=1 -m hrnn_lit
   trainer=gpu`` (a torchrun group is joined even with one rank, so rank discovery, the
   ``cpu:gloo,cuda:nccl`` group, ``torch.cuda.set_device`` and the broadcast of the module
   after it is on its GPU all run), then the collectives themselves on CUDA tensors in a
   1-rank NCCL group (average_gradients with dense and row-sparse grads, gather_cat,
   check_in_sync).
2. **2 ranks as far as the GPUs allow**: with 2+ GPUs, ``trainer=ddp
   trainer.accelerator=gpu trainer.devices=2`` end to end, and its test metrics next to the
   1-rank run's. With one GPU, NCCL refuses two ranks on one device, so two ranks share
   cuda:0 over gloo (which takes CUDA tensors) and run the same collectives on CUDA
   tensors; the averaged gradients are checked against the mean computed by hand.
3. **The bench on CUDA** (``bench.py --device cuda``, config (a)'s default configs, one
   repeat): ``bench_cuda.json``.
4. **The official GRU4Rec code side by side with hrnn_lit on config (a), same GPU**:
   experiments/bench_official.py's export of config (a)'s data, the official ``run.py``
   on it with ``-d cuda:0`` and config (a)'s settings with the full cross-entropy recipe
   (bench_official.params("full", epochs)), and ``bench.py --device cuda --configs
   a_gru4rec_xe`` for ours. Needs a checkout of
   https://github.com/hidasib/GRU4Rec_PyTorch_Official (``--official DIR``, with pandas
   installed and the float32 patch described in bench_official.py); skipped without one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TINY = [
    "logger=none", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1",
    "model=hrnn_init",
]  # fmt: skip

# step 0: model -> overrides that switch off its random draws (negatives sampled on the
# device and dropout masks differ between CPU and CUDA generators)
NO_DRAWS = {
    "session_rnn": ["model.n_sample=0", "model.dropout_user=0", "model.dropout_init=0"],
    "hrnn_init": ["model.n_sample=0", "model.dropout_user=0", "model.dropout_init=0"],
    "hrnn_history": ["model.n_sample=0", "model.net.dropout_user=0", "model.net.dropout_init=0"],
    "attention_hrnn": ["model.n_sample=0", "model.net.dropout=0"],
}
METRIC_RTOL = 1e-6

COLLECTIVES = r"""
import os, sys, torch, torch.distributed as dist
from omegaconf import OmegaConf
from hrnn_lit import distributed, launch

mode = sys.argv[1]  # nccl | gloo: 2 ranks on cuda:0 over gloo (one GPU) | cpu (a dry run)
cfg = OmegaConf.create({"trainer": {"accelerator": "cpu" if mode == "cpu" else "gpu"}})
shared_gpu = mode == "gloo"
if shared_gpu:  # launch.setup would give rank 1 cuda:1: set the group up by hand
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method="env://")
    world = launch.World(dist.get_rank(), dist.get_world_size(), 0, 1, torch.device("cuda", 0))
else:
    world = launch.setup(cfg)
dev, rank, n = world.device, world.rank, world.size
torch.manual_seed(rank)
module = torch.nn.Sequential(torch.nn.Embedding(50, 8, sparse=True), torch.nn.Linear(8, 3))
distributed.replicate(module, dev)
assert all(p.device == dev for p in module.parameters())
distributed.check_in_sync(module)
emb, lin = module[0], module[1]
out = lin(emb(torch.tensor([rank, 10 + rank, 10 + rank], device=dev))).sum()
out.backward()
dense = lin.weight.grad.clone()
sparse = emb.weight.grad.coalesce().to_dense()
every = [torch.zeros_like(dense) for _ in range(n)]
dist.all_gather(every, dense)
every_sparse = [torch.zeros_like(sparse) for _ in range(n)]
dist.all_gather(every_sparse, sparse)
distributed.average_gradients(list(module.parameters()), max_rows=4)
assert torch.allclose(lin.weight.grad, sum(every) / n, atol=1e-6)
assert torch.allclose(emb.weight.grad.to_dense(), sum(every_sparse) / n, atol=1e-6)
got = distributed.gather_cat(torch.arange(rank + 1, device=dev))
assert got.tolist() == [i for r in range(n) for i in range(r + 1)], got
print(f"rank {rank}/{n} on {dev}: backend {dist.get_backend()}: replicate, average_gradients "
      f"(dense + sparse), gather_cat, check_in_sync OK", flush=True)
if shared_gpu:
    dist.destroy_process_group()
else:
    launch.teardown(world)
"""


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.ok = True

    def step(self, name: str, cmd: list[str], timeout: int, env: dict | None = None) -> bool:
        t0 = time.perf_counter()
        log = self.out / f"{name}.log"
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True
            )
            code, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            code, text = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        log.write_text(f"$ {' '.join(cmd)}\n{text}")
        took = time.perf_counter() - t0
        self.add(f"[{name}] exit {code} in {took:.0f} s: {' '.join(cmd)} (log {log.name})")
        self.ok &= code == 0
        return code == 0

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self) -> None:
        (self.out / "gpu_check.txt").write_text("\n".join(self.lines) + "\n")


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def _torchrun(nproc: int, port: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={port}", *args,
    ]  # fmt: skip


def cuda_matches_cpu(out: Path, report: Report) -> None:
    """Step 0: the same float64 epoch on the GPU and on the CPU, test metrics compared."""
    base = ["logger=none", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1",
            "trainer.precision=64-true"]  # fmt: skip
    for model, no_draws in NO_DRAWS.items():
        runs = {}
        for where, trainer in (("cuda", "trainer=gpu"), ("cpu", "trainer=default")):
            run_dir = out / f"0_{model}_{where}"
            cmd = [sys.executable, "-m", "hrnn_lit", trainer, f"model={model}", *base,
                   *no_draws, f"paths.output_dir={run_dir}"]  # fmt: skip
            if report.step(f"0_{model}_{where}", cmd, timeout=600):
                runs[where] = _results(run_dir)
        if len(runs) < 2:
            continue
        keys = sorted(k for k in runs["cpu"] if k.startswith("test/") and "@" in k)
        worst = max(
            abs(runs["cuda"][k] - runs["cpu"][k]) / max(abs(runs["cpu"][k]), 1e-12) for k in keys
        )
        ok = bool(keys) and worst <= METRIC_RTOL
        report.ok &= ok
        report.add(
            f"  {model}: CUDA vs CPU float64 test metrics ({len(keys)}), worst relative "
            f"difference {worst:.2e} ({'OK' if ok else f'FAILED, > {METRIC_RTOL}'}); engine "
            f"{runs['cuda'].get('engine')}, recall@20 {runs['cuda'].get('test/recall@20'):.4f}"
        )


def official_gpu(out: Path, official: Path, report: Report, epochs: int) -> None:
    sys.path[:0] = [str(HERE), str(ROOT)]
    import bench_official

    data = out / "g4r"
    info = bench_official.export(data)
    cmd = [
        sys.executable, str(official / "run.py"), str(data / "train.tsv"),
        "-ps", bench_official.params("full", epochs), "-d", "cuda:0",
        "-t", str(data / "test.tsv"), "-m", "20",
    ]  # fmt: skip
    if not report.step("4_official_gpu", cmd, timeout=900):
        return
    text = (out / "4_official_gpu.log").read_text()
    train = [float(x) for x in re.findall(r"\|\s*([\d.]+) e/s\]", text)]
    took = re.search(r"Evaluation took ([\d.]+)s", text)
    theirs = {
        "train_events_per_s": sorted(train)[len(train) // 2] if train else None,
        "eval_events_per_s": info["test_predictions"] / float(took.group(1)) if took else None,
    }
    ours_json = out / "4_ours_gpu.json"
    cmd = [
        sys.executable, str(HERE / "bench.py"), "--device", "cuda", "--configs",
        "a_gru4rec_xe", "--repeats", "3", "--json", str(ours_json),
    ]  # fmt: skip
    if not report.step("4_ours_gpu", cmd, timeout=900):
        return
    ours = json.loads(ours_json.read_text())["configs"]["a_gru4rec_xe"]
    row = {"official": theirs, "ours": {k: ours[k] for k in ours if k.endswith("_per_s")}}
    (out / "official_comparison_gpu.json").write_text(json.dumps(row, indent=2) + "\n")
    for what in ("train", "eval"):
        a, b = ours[f"{what}_events_per_s"], theirs[f"{what}_events_per_s"]
        ratio = f"{a / b:.2f}" if a and b else "n/a"
        report.add(
            f"  config (a), full XE recipe, {what} events/s on the GPU: ours {a:,.0f}, "
            f"official {b}, x{ratio}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--official", type=Path, help="checkout of GRU4Rec_PyTorch_Official")
    ap.add_argument("--epochs", type=int, default=2, help="the official code's epochs")
    ap.add_argument("--skip-bench", action="store_true", help="no step 3 (bench on CUDA)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    import torch

    if not torch.cuda.is_available():
        report.add("no CUDA device: nothing to check")
        report.write()
        return 1
    n_gpus = torch.cuda.device_count()
    report.add(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL "
        f"{'.'.join(map(str, torch.cuda.nccl.version()))}, {n_gpus} x "
        f"{torch.cuda.get_device_name(0)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    # 0. the one training path on CUDA against the CPU, float64, no random draws
    cuda_matches_cpu(out, report)

    script = out / "collectives.py"
    script.write_text(COLLECTIVES)

    # 1. one rank in an NCCL group: end to end, then the collectives on CUDA tensors
    one = out / "1_torchrun_nccl"
    if report.step(
        "1_torchrun_1rank",
        _torchrun(1, 29531, "-m", "hrnn_lit", "trainer=gpu", *TINY, f"paths.output_dir={one}"),
        timeout=300,
    ):
        r = _results(one)
        report.add(f"  world_size {r['world_size']}, test/recall@20 {r['test/recall@20']:.4f}")
    report.step("1_collectives_nccl", _torchrun(1, 29532, str(script), "nccl"), timeout=180)

    # 2. two ranks
    if n_gpus >= 2:
        two = out / "2_ddp_2gpus"
        cmd = [sys.executable, "-m", "hrnn_lit", "trainer=ddp", "trainer.accelerator=gpu"]
        if report.step("2_ddp_2gpus", [*cmd, *TINY, f"paths.output_dir={two}"], timeout=300):
            r = _results(two)
            report.add(f"  world_size {r['world_size']}, test/recall@20 {r['test/recall@20']:.4f}")
        report.step("2_collectives_nccl", _torchrun(2, 29533, str(script), "nccl"), timeout=180)
    else:
        report.add("one GPU: NCCL takes one rank per device; 2 ranks share cuda:0 over gloo")
        report.step("2_collectives_gloo_1gpu", _torchrun(2, 29534, str(script), "gloo"), 180)

    # 3. the bench on CUDA: config (a)
    if not args.skip_bench:
        bench_json = out / "bench_cuda.json"
        cmd = [sys.executable, str(HERE / "bench.py"), "--device", "cuda", "--repeats", "1",
               "--configs", "a_session_rnn", "a_hrnn_init", "a_attention_hrnn", "a_hrnn_history",
               "--json", str(bench_json)]  # fmt: skip
        report.step("3_bench_cuda", cmd, timeout=900)

    # 4. the official GRU4Rec next to ours on config (a), same GPU
    if args.official is None:
        report.add("[4_official] skipped: no --official checkout given")
    else:
        try:
            official_gpu(out, args.official.resolve(), report, args.epochs)
        except Exception as e:  # recorded, like a failed step
            report.add(f"[4_official] failed: {type(e).__name__}: {e}")
            report.ok = False
    report.add("all steps passed" if report.ok else "some steps FAILED (see the logs)")
    report.write()
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
