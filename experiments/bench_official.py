"""The official GRU4Rec PyTorch code on config (a)'s data, for "ours / official" ratios.

Exports the data of ``bench.py``'s config (a) (train and test splits, as TAB-separated
SessionId / ItemId / Time files) and, with ``--official``, runs that code's ``run.py`` on
them with config (a)'s settings (cross-entropy, one GRU layer of 100, B=128, 2048 negatives
by popularity^0.5, lr 0.1) on the CPU with ``--threads`` threads, and prints its training
and evaluation events/s next to ours from ``bench.py`` (the same settings, the one training
path and its plain autograd reference) in the same process tree; ``--json bench.json``
merges the comparison into the bench's results (key ``official_comparison``).

``--recipe full`` (the default) is the official code's full cross-entropy recipe: logQ 1 and
the tied (constrained) item embedding, ours ``a_gru4rec_xe``; ``--recipe onehot`` is one-hot
input without logQ, ours ``a_session_rnn``.

The official code is not part of this project: clone
https://github.com/hidasib/GRU4Rec_PyTorch_Official yourself (it needs pandas). Under
numpy 2 its compatibility-mode initialisation builds float64 arrays; give its
``torch.tensor(...)`` calls in ``_reset_weights_to_compatibility_mode`` a
``dtype=torch.float32`` to run it.

    python experiments/bench_official.py --out /tmp/g4r               # export only
    python experiments/bench_official.py --out /tmp/g4r --official ~/GRU4Rec_PyTorch_Official \
        --threads 2 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PARAMS = (  # the official run.py's -ps, config (a)'s settings; {recipe}: RECIPES' values
    "loss=cross-entropy,layers=100,batch_size=128,n_sample=2048,sample_alpha=0.5,"
    "n_epochs={epochs},embedding=0,{recipe},learning_rate=0.1,momentum=0.0,elu_param=0"
)
RECIPES = {  # name: (the official code's parameters, ours: bench.py configs)
    "full": ("constrained_embedding=True,logq=1.0", ["a_gru4rec_xe", "a_gru4rec_xe_autograd"]),
    "onehot": (
        "constrained_embedding=False,logq=0.0",
        ["a_session_rnn", "a_session_rnn_autograd"],
    ),
}


def params(recipe: str, epochs: int) -> str:
    return PARAMS.format(epochs=epochs, recipe=RECIPES[recipe][0])


def export(out: Path, quick: bool = False) -> dict[str, int]:
    """Write train.tsv and test.tsv of config (a)'s data; returns the test predictions
    (events that are not a session's first)."""
    import bench
    import polars as pl

    dm = bench.make_datamodule("gru4rec", 128, quick)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        df = getattr(dm.splits, name).select(
            pl.col("session").alias("SessionId"),
            pl.col("item").alias("ItemId"),
            pl.col("ts").alias("Time"),
        )
        df.write_csv(out / f"{name}.tsv", separator="\t")
    test = dm.splits.test
    return {"test_predictions": test.height - test["session"].n_unique()}


def run_official(
    official: Path, data: Path, threads: int, epochs: int, n_pred: int, recipe: str
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [
        sys.executable, str(official / "run.py"), str(data / "train.tsv"),
        "-ps", params(recipe, epochs), "-d", "cpu", "-t", str(data / "test.tsv"),
        "-m", "20",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    text = proc.stdout
    train = [float(x) for x in re.findall(r"\|\s*([\d.]+) e/s\]", text)]
    took = re.search(r"Evaluation took ([\d.]+)s", text)
    if proc.returncode or not train or not took:
        tail = (text + proc.stderr)[-2000:]
        raise RuntimeError(f"{official / 'run.py'} failed (exit {proc.returncode}):\n{tail}")
    return {
        "train_events_per_s": sorted(train)[len(train) // 2],
        "eval_events_per_s": n_pred / float(took.group(1)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the TSV files")
    ap.add_argument("--official", type=Path, help="checkout of GRU4Rec_PyTorch_Official")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2, help="official code's epochs")
    ap.add_argument("--quick", action="store_true", help="tiny data (a smoke test)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    ap.add_argument("--configs", nargs="+", help="bench.py configs of ours (default: the recipe's)")
    ap.add_argument("--repeats", type=int, default=3, help="bench.py repeats (medians)")
    ap.add_argument("--json", type=Path, help="merge the comparison into this JSON file")
    args = ap.parse_args()
    info = export(args.out, args.quick)
    print(f"wrote {args.out}/train.tsv, test.tsv ({info['test_predictions']} test predictions)")
    if args.official is None:
        return 0
    args.configs = args.configs or RECIPES[args.recipe][1]
    official = run_official(
        args.official, args.out, args.threads, args.epochs, info["test_predictions"], args.recipe
    )
    ours_json = args.out / "ours.json"
    subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--configs", *args.configs, "--threads",
         str(args.threads), "--repeats", str(args.repeats), "--json", str(ours_json)]
        + (["--quick"] if args.quick else []),
        check=True, capture_output=True,
    )  # fmt: skip
    ours = json.loads(ours_json.read_text())["configs"]
    comparison = {
        "threads": args.threads,
        "recipe": args.recipe,
        "official_params": params(args.recipe, args.epochs),
        "official": official,
        "ours": {},
    }
    print(f"threads {args.threads}: {'':34} {'ours':>10} {'official':>10} {'ratio':>7}")
    for name in args.configs:
        res = ours[name]
        row = {
            "engine": res.get("engine"),
            "train_events_per_s": res["train_events_per_s"],
            "eval_events_per_s": res["eval_events_per_s"],
            "train_vs_official": res["train_events_per_s"] / official["train_events_per_s"],
            "eval_vs_official": res["eval_events_per_s"] / official["eval_events_per_s"],
        }
        comparison["ours"][name] = row
        for what in ("train", "eval"):
            a, b = row[f"{what}_events_per_s"], official[f"{what}_events_per_s"]
            print(f"  {name + ' ' + what + ' events/s':44} {a:10,.0f} {b:10,.0f} {a / b:7.2f}")
    if args.json is not None:  # merged into the bench's JSON (make bench writes bench.json)
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        merged["official_comparison"] = comparison
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"official_comparison written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
