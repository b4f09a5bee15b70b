"""Benchmark the prepare step (read_xing + preprocess) on a synthetic 10M-row XING file.

Generates the raw file once, then runs the prepare step ``--repeats`` times, each in a fresh
subprocess so that neither generation memory nor earlier runs inflate the peak RSS
(``ru_maxrss`` of the process that prepares). Prints a table of medians and optionally
writes JSON.

    python experiments/bench_prepare.py --rows 10000000 --repeats 3 --json bench.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def prepare_once(path: Path) -> dict:
    """Runs in the worker: time read + preprocess, report peak RSS of this process."""
    import resource

    from hrnn_lit.data.preprocess import preprocess, split_stats
    from hrnn_lit.data.sources import read_xing

    t0 = time.perf_counter()
    events = read_xing(path)
    t1 = time.perf_counter()
    splits = preprocess(events, source=str(path))
    t2 = time.perf_counter()
    return {
        "rows": events.height,
        "read_s": t1 - t0,
        "preprocess_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "splits": {name: split_stats(frame) for name, frame in splits.items().items()},
    }


def run_worker(path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows in the raw file")
    ap.add_argument("--out", type=Path, help="where to write the raw file (default: temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse --out if it already exists")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(prepare_once(args.worker)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "interactions.csv"
        gen_s = None
        if not (args.reuse and path.exists()):
            from hrnn_lit.data.synthetic_xing import write_xing_file

            t0 = time.perf_counter()
            write_xing_file(path, scale="paper", n_rows=args.rows, seed=args.seed)
            gen_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        runs = [run_worker(path) for _ in range(args.repeats)]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = runs[0]["rows"]
    result = {
        "rows": rows,
        "file_mb": round(size_mb, 1),
        "generate_s": None if gen_s is None else round(gen_s, 2),
        "repeats": args.repeats,
        "cpus": len(os.sched_getaffinity(0)),
        "read_s": round(median("read_s"), 3),
        "preprocess_s": round(median("preprocess_s"), 3),
        "total_s": round(median("total_s"), 3),
        "rows_per_s": round(rows / median("total_s")),
        "peak_rss_mb": round(median("peak_rss_mb"), 1),
        "max_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "runs_total_s": [round(r["total_s"], 3) for r in runs],
        "splits": runs[0]["splits"],
    }
    print(
        f"prepare step on {rows:,} rows ({size_mb:.0f} MB), {result['cpus']} CPUs, "
        f"median of {args.repeats}"
    )
    for label, key, unit in [
        ("read_xing", "read_s", "s"),
        ("preprocess", "preprocess_s", "s"),
        ("total", "total_s", "s"),
        ("throughput", "rows_per_s", "rows/s"),
        ("peak RSS", "peak_rss_mb", "MB"),
    ]:
        print(f"  {label:<12}{result[key]:>14,}  {unit}")
    for name, stats in result["splits"].items():
        print(f"  {name:<12}" + "  ".join(f"{k}={v:,}" for k, v in stats.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
