"""Shared cores: one default training run alone, then two started at once.

    python experiments/bench_contention.py --json bench_contention.json   (make bench-contention)

Each run is ``python -m hrnn_lit logger=none`` (plus ``--override``s) in its own output
folder; its speed is results.json's ``perf/train_events_per_s``. The share of a run started
together with another is its speed over the lone run's speed in the same bench (target:
each >= 0.75). ``--repeats N`` alternates N lone and N paired rounds and compares medians.
``--baseline`` runs the old default for comparison: every usable CPU as a torch thread,
GNU OpenMP's default spinning (``GOMP_SPINCOUNT=300000``, what it does when
``OMP_WAIT_POLICY`` is unset; hrnn_lit now sets ``GOMP_SPINCOUNT=10000``), and no
adaptation (a fixed num_threads is never lowered). The load average before and after
goes into the JSON: on a busy machine "alone" is not alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(out: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "hrnn_lit", "logger=none", "+trainer.enable_progress_bar=false",
        f"paths.output_dir={out}", *overrides,
    ]  # fmt: skip
    with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path) -> dict:
    code = proc.wait()
    if code != 0:
        tail = out.with_suffix(".log").read_text()[-2000:]
        raise SystemExit(f"run in {out} exited with status {code}:\n{tail}")
    r = json.loads((out / "results.json").read_text())
    return {
        "train_events_per_s": r["perf/train_events_per_s"],
        "num_threads": r.get("perf/num_threads"),
        "num_threads_end": r.get("perf/num_threads_end"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--override", action="append", default=[], help="a Hydra override")
    ap.add_argument("--baseline", action="store_true", help="the old default threads")
    args = ap.parse_args()

    from hrnn_lit.runtime import usable_cpus

    env = dict(os.environ)
    overrides = list(args.override)
    if args.baseline:
        env["GOMP_SPINCOUNT"] = "300000"
        overrides.append(f"num_threads={usable_cpus()}")
    load_before = os.getloadavg()
    alone, together = [], []
    with tempfile.TemporaryDirectory(prefix="bench_contention_") as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"alone{i}"
            out.mkdir()
            alone.append(finish(start(out, overrides, env), out))
            print(f"[contention] round {i} alone: {alone[-1]}", flush=True)
            outs = [Path(tmp) / f"together{i}_{k}" for k in (0, 1)]
            for o in outs:
                o.mkdir()
            procs = [start(o, overrides, env) for o in outs]  # started at once
            pair = [finish(p, o) for p, o in zip(procs, outs)]
            together.append(pair)
            print(f"[contention] round {i} together: {pair}", flush=True)
            time.sleep(1)
    lone = statistics.median(r["train_events_per_s"] for r in alone)
    shares = [
        statistics.median(pair[k]["train_events_per_s"] for pair in together) / lone for k in (0, 1)
    ]
    summary = {
        "command": " ".join(["python", "experiments/bench_contention.py", *sys.argv[1:]]),
        "overrides": overrides,
        "omp_wait_policy": env.get("OMP_WAIT_POLICY"),
        "gomp_spincount": env.get("GOMP_SPINCOUNT", "10000 (hrnn_lit's default)"),
        "usable_cpus": usable_cpus(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "alone": alone,
        "together": together,
        "alone_events_per_s": lone,
        "share": shares,
        "min_share": min(shares),
        "target_min_share": 0.75,
    }
    print(
        f"[contention] alone {lone:,.0f} events/s; two at once: shares "
        f"{shares[0]:.2f} and {shares[1]:.2f} (target >= 0.75); load before "
        f"{load_before[0]:.2f}, after {summary['load_average_after'][0]:.2f} on "
        f"{summary['usable_cpus']} usable CPUs",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
