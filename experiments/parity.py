"""Accuracy parity: the official GRU4Rec PyTorch code and hrnn_lit's session RNN on the same
train/test files with mapped settings, several seeds, side by side (recall@20, MRR@20).

Both read the same TAB-separated files (SessionId, ItemId, Time; hrnn_lit through
``data=presplit``, ignoring any UserId so that its batches are session-parallel like the
official code's) and rank every next item of the test sessions against all train items,
ties counted against the target (``-e conservative`` / ``eval.ties=conservative``).

The official code is not part of this project: pass the path of your checkout of
https://github.com/hidasib/GRU4Rec_PyTorch_Official (it needs pandas; under numpy 2 see
``bench_official.py``). It seeds its initial weights itself (numpy seed 42); the seed here
seeds torch before its run (negative samples and dropout). Settings map as follows
(official -> hrnn_lit): layers -> hidden_size, batch_size -> data.batch_size, learning_rate
-> lr, n_sample, sample_alpha, logq, constrained_embedding, embedding as named;
dropout_p_embed -> dropout_embed and dropout_p_hidden -> dropout_hidden with an input
embedding, dropout_p_embed -> dropout_hidden with one-hot input (there the official code's
input embedding is the GRU itself); bpr-max's elu_param a -> final_act=elu-a.

    python experiments/parity.py --export-synthetic /tmp/parity --users 1500
    python experiments/parity.py --data /tmp/parity --official ~/GRU4Rec_PyTorch_Official \\
        --settings equal equal_b128 features bprmax bprmax_preset --seeds 0 1 2 --epochs 5 \\
        --md table.md

(docs/parity.md: the result on that data.) The dropout rows with one-hot input, on the
generated rating log, against hrnn_lit with the official cell and initialisation:

    python experiments/parity.py --export-synthetic /tmp/parity_r --dataset synthetic_ratings \
        --users 1000
    python experiments/parity.py --data /tmp/parity_r --official ~/GRU4Rec_PyTorch_Official \
        --settings dropout --variant "torch:" \
        --variant "official:model.gru_variant=official model.gru_init=official"

One official option at a time (``--options``): each row changes one official parameter from
the equal setting at batch 50 (``OPTIONS``), and hrnn_lit runs the official model there
(``official_model``: the official cell with one-hot input, torch's ``nn.GRUCell`` with an
embedding or the tied one, the official initialisation, Adagrad's epsilon inside the square
root, sessions in time order); ``--sample-store`` is the official ``-ss``:

    python experiments/parity.py --data /tmp/parity_r --official ~/GRU4Rec_PyTorch_Official \
        --options all --seeds 0 1 2 --epochs 3 --sample-store 1000000 --md options.md

Official options without a row are in ``NO_ROW`` (why each has none).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

COMMON = dict(layers=100, batch_size=50, learning_rate=0.05, n_sample=2048, sample_alpha=0.5)
# name: (official parameters, hrnn_lit overrides beyond the common mapping)
SETTINGS = {
    "equal": (  # the equal setting: cross-entropy, one-hot input, no logQ
        dict(loss="cross-entropy", embedding=0, constrained_embedding=False, logq=0.0),
        [],
    ),
    "equal_b128": (  # the same at batch 128
        dict(loss="cross-entropy", embedding=0, constrained_embedding=False, logq=0.0,
             batch_size=128),
        [],
    ),
    "features": (  # every official feature on: logQ, tied embedding, both dropouts
        dict(loss="cross-entropy", constrained_embedding=True, embedding=0, logq=1.0,
             dropout_p_embed=0.2, dropout_p_hidden=0.2),
        [],
    ),
    "bprmax": (  # BPR-max with the official elu on the scores, tied embedding, dropouts
        dict(loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=0.5, bpreg=1.0,
             dropout_p_embed=0.2, dropout_p_hidden=0.2, sample_alpha=0.0),
        [],
    ),
    "dropout": (  # one-hot input with the official input dropout (on the GRU's new state)
        dict(loss="cross-entropy", embedding=0, constrained_embedding=False, logq=0.0,
             dropout_p_embed=0.3),
        [],
    ),
    "dropout_logq": (  # the same with logQ
        dict(loss="cross-entropy", embedding=0, constrained_embedding=False, logq=1.0,
             dropout_p_embed=0.3),
        [],
    ),
    "bprmax_preset": (  # model=gru4rec_bprmax's recipe (the official coveo paramfile's style)
        dict(loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1.0, bpreg=1.85,
             dropout_p_embed=0.35, dropout_p_hidden=0.0, sample_alpha=0.2, momentum=0.4),
        [],
    ),
}  # fmt: skip

# One official option at a time from the equal setting at batch 50 (issue 25). name: the
# official parameters changed from OPTION_BASE (a preset row sets its whole recipe).
OPTION_BASE = dict(loss="cross-entropy", embedding=0, constrained_embedding=False, logq=0.0)
BPRMAX = dict(loss="bpr-max", elu_param=0.0, bpreg=1.0)
OPTIONS = {
    "base": {},
    "loss=bpr-max": BPRMAX,
    "bpr-max,elu_param=0.5": {**BPRMAX, "elu_param": 0.5},
    "bpr-max,bpreg=2": {**BPRMAX, "bpreg": 2.0},
    "dropout_p_embed=0.3": {"dropout_p_embed": 0.3},
    "embedding=100": {"embedding": 100},
    "embedding=100,dropout_p_hidden=0.3": {"embedding": 100, "dropout_p_hidden": 0.3},
    "constrained_embedding=True": {"constrained_embedding": True},
    "logq=1": {"logq": 1.0},
    "n_sample=0": {"n_sample": 0},
    "n_sample=512": {"n_sample": 512},
    "sample_alpha=0": {"sample_alpha": 0.0},
    "sample_alpha=1": {"sample_alpha": 1.0},
    "learning_rate=0.1": {"learning_rate": 0.1},
    "momentum=0.3": {"momentum": 0.3},
    "batch_size=128": {"batch_size": 128},
    "preset gru4rec_xe": SETTINGS["features"][0],
    "preset gru4rec_bprmax": SETTINGS["bprmax_preset"][0],
    "embedding=100,dropout_p_embed=0.3": {"embedding": 100, "dropout_p_embed": 0.3},
    "bpr-max,elu_param=1": {**BPRMAX, "elu_param": 1.0},
}
# official options (GRU4Rec.__init__, GRU4Rec.fit, run.py) that have no row of their own
NO_ROW = {
    "layers=100/100": "no equivalent: hrnn_lit's session GRU has one layer (model.hidden_size)",
    "dropout_p_hidden, one-hot input": "no effect in the official code with one layer (no "
    "layer after the first, which is the embedding); the mapping sets no hrnn_lit dropout",
    "elu_param, cross-entropy": "no effect: the official code applies elu in bpr-max only",
    "logq, bpr-max": "no effect in the official code (cross-entropy only); the mapping sets "
    "model.logq=0 (hrnn_lit would apply it to any loss)",
    "embedding=layersize": "embedding of the layer's size: the embedding rows (E = H)",
    "embedding=E, E != layers": "the official compatibility-mode init stops (it sets the "
    "GRUCell's weight_ih as [3E, H], torch's shape is [3H, E]), so the rows use E = H",
    "n_epochs": "trainer.max_epochs, the same in every row",
    "sample_cache_max_size (-ss)": "how many samples the official code draws at once; "
    "hrnn_lit draws each step's (the same distribution)",
    "compatibility_mode": "always on in run.py: model.gru_init=official",
}


def option_params(name: str, epochs: int) -> dict:
    """The official parameters of an ``OPTIONS`` row."""
    return {**COMMON, "n_epochs": epochs, "momentum": 0.0, "elu_param": 0.0, **OPTION_BASE,
            **OPTIONS[name]}  # fmt: skip


def official_model(params: dict) -> list[str]:
    """hrnn_lit's options that make its session RNN the official model (docs/parity.md):
    the official cell with one-hot input, torch's (``nn.GRUCell``) with an input embedding
    or the tied one; the official initialisation, Adagrad epsilon and session order."""
    one_hot = not params.get("constrained_embedding") and not params.get("embedding")
    return [f"model.gru_variant={'official' if one_hot else 'torch'}", "model.gru_init=official",
            "model.adagrad_eps=inside", "data.shuffle_users=false"]  # fmt: skip


def official_params(setting: str, epochs: int) -> dict:
    return {**COMMON, "n_epochs": epochs, "momentum": 0.0, "elu_param": 0.0, **SETTINGS[setting][0]}


def ours_overrides(params: dict) -> list[str]:
    """hrnn_lit's keys for the official parameters (module docstring)."""
    tied, emb = params.get("constrained_embedding", False), params.get("embedding", 0)
    d_embed, d_hidden = params.get("dropout_p_embed", 0.0), params.get("dropout_p_hidden", 0.0)
    if not tied and not emb:  # one-hot: the official input dropout acts on the GRU's state
        d_embed, d_hidden = 0.0, d_embed
    elu = params.get("elu_param", 0.0)
    act = f"elu-{elu}" if params["loss"] == "bpr-max" and elu > 0 else "linear"
    return [
        "model=session_rnn",
        f"model.loss={params['loss']}",
        f"model.hidden_size={params['layers']}",
        f"data.batch_size={params['batch_size']}",
        f"model.lr={params['learning_rate']}",
        f"model.momentum={params.get('momentum', 0.0)}",
        f"model.n_sample={params['n_sample']}",
        f"model.sample_alpha={params['sample_alpha']}",
        f"model.logq={params.get('logq', 0.0) if params['loss'] == 'cross-entropy' else 0.0}",
        f"model.constrained_embedding={str(bool(tied)).lower()}",
        f"model.embedding={emb}",
        f"model.dropout_embed={d_embed}",
        f"model.dropout_hidden={d_hidden}",
        f"model.bpreg={params.get('bpreg', 1.0)}",
        f"model.final_act={act}",
        f"trainer.max_epochs={params['n_epochs']}",
    ]


def export_synthetic(out: Path, users: int, dataset: str = "synthetic") -> None:
    """train.tsv and test.tsv of ``data=<dataset>`` (a generated one: its preprocessing and
    last-session-out split) with ``users`` generated users: SessionId, ItemId, Time,
    UserId."""
    sys.path.insert(0, str(REPO))
    import polars as pl
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    users_key = "data.generate.n_users" if dataset == "synthetic_ratings" else "data.source.n_users"
    overrides = [f"data={dataset}", f"{users_key}={users}", "data.fit_split=train"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dm = instantiate(cfg.data)
    splits = dm.load_splits()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        frame = getattr(splits, name).select(
            pl.col("session").alias("SessionId"), pl.col("item").alias("ItemId"),
            pl.col("ts").alias("Time"), pl.col("user").alias("UserId"),
        )  # fmt: skip
        frame.write_csv(out / f"{name}.tsv", separator="\t")
        print(f"{out / name}.tsv: {frame.height} events, {frame['SessionId'].n_unique()} sessions")


def official_init(seed: int) -> str:
    """Code that makes the official compatibility mode's np.random.seed(42), called before
    it draws the initial weights, seed 42 + ``seed``."""
    return (
        "import numpy; _seed = numpy.random.seed; "
        f"numpy.random.seed = lambda s=None: _seed(s + {seed} if s == 42 else s); "
    )


def run_official(
    official: Path,
    data: Path,
    params: dict,
    seed: int,
    threads: int,
    store: int | None = None,
    vary_init: bool = False,
) -> dict:
    """The official run.py under torch.manual_seed(seed): recall@20 and MRR@20. ``store``:
    its sample store size (``-ss``; None: its default). ``vary_init``: its initial weights
    drawn with numpy seed 42 + seed instead of its fixed 42, so that its seeds' spread
    includes the initialisation as hrnn_lit's does."""
    ps = ",".join(f"{k}={v}" for k, v in params.items())
    argv = [str(official / "run.py"), str(data / "train.tsv"), "-ps", ps, "-d", "cpu",
            "-t", str(data / "test.tsv"), "-m", "20", "-e", "conservative"]  # fmt: skip
    argv += ["-ss", str(store)] if store else []
    code = (
        "import runpy, sys, torch, pandas; torch.manual_seed(int(sys.argv[1])); "
        # its logq line hands torch.tensor a pandas Series, which this torch refuses
        "_tensor = torch.tensor; torch.tensor = lambda x, *a, **k: _tensor("
        "x.to_numpy() if isinstance(x, pandas.Series) else x, *a, **k); "
        f"sys.path.insert(0, {str(official)!r}); sys.argv = sys.argv[2:]; "
        + (official_init(seed) if vary_init else "")
        + "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(seed), *argv], env=env, capture_output=True, text=True
    )
    m = re.search(r"Recall@20: ([\d.]+) MRR@20: ([\d.]+)", proc.stdout)
    if proc.returncode or not m:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"{official / 'run.py'} failed (exit {proc.returncode}):\n{tail}")
    return {"recall@20": float(m.group(1)), "mrr@20": float(m.group(2))}


def run_ours(
    data: Path, overrides: list[str], seed: int, threads: int, users: bool = False
) -> dict:
    """hrnn_lit on the same files: recall@20 and MRR@20 of the test. ``users``: read the
    UserId column (user-parallel batches, test sessions after the user's history); else
    sessions only, session-parallel like the official code."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "hrnn_lit", "data=presplit",
               f"data.train_path={data / 'train.tsv'}", f"data.test_path={data / 'test.tsv'}",
               f"data.user_col={'UserId' if users else 'null'}", *overrides, f"seed={seed}",
               f"num_threads={threads}",
               "logger=none", "callbacks=none", f"paths.output_dir={out}",
               "+trainer.enable_progress_bar=false"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        results = Path(out) / "results.json"
        if proc.returncode or not results.exists():
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise RuntimeError(f"hrnn_lit failed (exit {proc.returncode}):\n{tail}")
        res = json.loads(results.read_text())
    return {"recall@20": res["test/recall@20"], "mrr@20": res["test/mrr@20"]}


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def within(a: list[float], b: list[float]) -> bool:
    """The seeds' spread: the means differ by at most the two sample stds summed."""
    sd = sum(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (a, b))
    return abs(statistics.mean(a) - statistics.mean(b)) <= sd


def table(results: dict, seeds: list[int], epochs: int) -> str:
    """Markdown: official and hrnn_lit mean ± std per metric, and whether each row is
    within the seeds' spread (``within``) or the metrics outside it with the gap in %."""
    lines = [
        f"| setting ({len(seeds)} seeds, {epochs} epochs) | official recall@20 | hrnn_lit "
        "recall@20 | official mrr@20 | hrnn_lit mrr@20 | within spread |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for name, res in results.items():
        cells, out = [], []
        for m in ("recall@20", "mrr@20"):
            a, b = ([r[m] for r in res[who]] for who in ("official", "ours"))
            cells += [mean_std(a), mean_std(b)]
            if b and not within(a, b):
                gap = 100 * (statistics.mean(b) / statistics.mean(a) - 1)
                out.append(f"{m.split('@')[0]} {gap:+.1f}%")
        verdict = "no: " + ", ".join(out) if out else "yes" if res["ours"] else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export-synthetic", type=Path, help="write data=synthetic's TSVs here")
    ap.add_argument("--users", type=int, default=600, help="synthetic users to export")
    ap.add_argument(
        "--dataset", default="synthetic", choices=["synthetic", "synthetic_ratings"],
        help="the generated dataset --export-synthetic writes",
    )  # fmt: skip
    ap.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:OVERRIDES",
        help="an hrnn_lit variant, its own table row against the same official runs: a label, "
        "':', space-separated overrides (e.g. 'cell:model.gru_variant=official'); repeatable; "
        "none: the mapped settings only",
    )  # fmt: skip
    ap.add_argument("--data", type=Path, help="folder with train.tsv and test.tsv")
    ap.add_argument("--official", type=Path, help="checkout of GRU4Rec_PyTorch_Official")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument(
        "--options", nargs="+", choices=["all", *OPTIONS],
        help="one official option at a time (OPTIONS; all: every row) against hrnn_lit's "
        "official model, instead of --settings",
    )  # fmt: skip
    ap.add_argument("--sample-store", type=int, help="the official code's -ss (default its own)")
    ap.add_argument("--official-only", action="store_true", help="no hrnn_lit runs")
    ap.add_argument(
        "--vary-official-init", action="store_true",
        help="the official initial weights from numpy seed 42 + seed (default: its fixed 42)",
    )  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--user-parallel", action="store_true",
        help="hrnn_lit reads the files' UserId (user-parallel batches) instead of sessions only",
    )  # fmt: skip
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--json", type=Path, help="write every run's metrics here")
    args = ap.parse_args()
    if args.export_synthetic:
        export_synthetic(args.export_synthetic, args.users, args.dataset)
        args.data = args.data or args.export_synthetic
    if args.official is None:
        return 0
    if args.data is None:
        ap.error("--data (or --export-synthetic) is needed with --official")
    variants = [v.partition(":") for v in args.variant] or [("", "", "")]
    variants = [(label, extra.split()) for label, _, extra in variants]
    if args.options:
        names = list(OPTIONS) if "all" in args.options else args.options
        jobs = [(n, option_params(n, args.epochs)) for n in names]
        jobs = [(n, p, official_model(p)) for n, p in jobs]
    else:
        jobs = [(n, official_params(n, args.epochs), []) for n in args.settings]
    results: dict[str, dict[str, list[dict]]] = {}
    for name, params, base_extra in jobs:
        rows = [f"{name} [{label}]" if label else name for label, _ in variants]
        for row, (_, extra) in zip(rows, variants):
            results[row] = {"official": [], "ours": [], "params": params,
                            "ours_extra": base_extra + extra}  # fmt: skip
        for seed in args.seeds:
            a = run_official(
                args.official, args.data, params, seed, args.threads, args.sample_store,
                args.vary_official_init,
            )  # fmt: skip
            print(f"{name} seed {seed}: official {a}", flush=True)
            for row, (_, extra) in zip(rows, variants):
                results[row]["official"].append(a)
                if args.official_only:
                    continue
                ours = ours_overrides(params) + base_extra + extra
                b = run_ours(args.data, ours, seed, args.threads, args.user_parallel)
                results[row]["ours"].append(b)
                print(f"{row} seed {seed}: hrnn_lit {b}", flush=True)
        write(results, args)
    print(table(results, args.seeds, args.epochs))
    return 0


def write(results: dict, args: argparse.Namespace) -> None:
    """The table and every run so far (after each row, so that a cut run leaves its rows)."""
    if args.md:
        args.md.write_text(table(results, args.seeds, args.epochs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
