"""Recommending's speed (issue 24; figures in docs/benchmarks.md via experiments/results/).

1. Throughput: a model trained one epoch on the default data; ``mode=test``'s evaluation
   events/s against the recommender replaying the same users' events (their training
   history and test session) and ranking the top 20 once per user, in one process.
2. Latency: ``observe`` + ``recommend(k=20)`` for one user at a time, 1 thread, on a
   50k-item catalogue with H=100 (an untrained HRNN Init: speed does not depend on the
   weights), over users with a history.

    python experiments/recommend_speed.py --json recommend_speed.json
"""

from __future__ import annotations

import hrnn_lit  # noqa: F401  (its OpenMP setting, before torch loads)

# isort: split
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from hrnn_lit import Recommender
from hrnn_lit.nets.recurrent import RecurrentCore
from hrnn_lit.recommend.ids import Ids
from hrnn_lit.run import run

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def throughput(out: Path, threads: int, repeats: int) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={out}", "logger=none",
                                           "trainer.max_epochs=1", f"num_threads={threads}"])
        test_cfg = compose("config", overrides=[
            f"paths.output_dir={out / 'test'}", "logger=none", "mode=test",
            f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"num_threads={threads}"])
    run(cfg)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    test_users = dm.splits.test.get_column("user").unique().implode()
    events = pl.concat([dm.splits.train, dm.splits.test]).filter(pl.col("user").is_in(test_users))
    events = events.sort("user", "ts")
    users = events.get_column("user").unique(maintain_order=True).to_list()
    evals, recs = [], []
    for _ in range(repeats):  # alternately, medians
        evals.append(run(test_cfg)["perf/eval_events_per_s"])
        rec = Recommender.from_checkpoint(out / "checkpoints" / "last.ckpt")
        rec.users = type(rec.users)(rec.net, rec.device)  # no stored users: replay it all
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        rec.observe_many(events, "user", "item", "ts", session_col="session")
        rec.recommend_many(users, k=20)
        recs.append(events.height / (time.perf_counter() - t0))
    return {
        "threads": threads,
        "n_items": dm.n_items,
        "replayed_events": events.height,
        "users": len(users),
        "scored_test_events": int(dm.eval_steps["test"].score.sum()),
        "eval_events_per_s": float(np.median(evals)),
        "recommend_events_per_s": float(np.median(recs)),
        "ratio": float(np.median(recs) / np.median(evals)),
    }


def latency(n_items: int, hidden: int, n_users: int, n_calls: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = RecurrentCore(n_items, hidden_size=hidden, user_hidden_size=hidden)
    rec = Recommender(net, Ids(np.arange(n_items)), session_gap=1800)
    rng = np.random.default_rng(0)
    n_hist = 20 * n_users
    hist = pl.DataFrame({
        "user_id": np.repeat(np.arange(n_users), 20),
        "item_id": rng.integers(0, n_items, n_hist),
        "timestamp": 1_700_000_000 + np.tile(np.arange(20) * 600, n_users),
    })
    rec.observe_many(hist)
    times = []
    ts = 1_800_000_000
    for _ in range(n_calls):
        user = int(rng.integers(n_users))
        item = int(rng.integers(n_items))
        ts += 30
        t0 = time.perf_counter()
        rec.observe(user, item, ts)
        rec.recommend(user, k=20)
        times.append(time.perf_counter() - t0)
    ms = np.array(times[n_calls // 10 :]) * 1e3  # the first tenth: warm-up
    return {"n_items": n_items, "hidden_size": hidden, "users": n_users, "calls": ms.size,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        out["throughput"] = throughput(Path(tmp), args.threads, args.repeats)
    out["latency"] = latency(args.items, 100, 1000, args.calls)
    out["load_average_end"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
