"""Training and evaluation throughput of hrnn_lit, through its public API (``make bench``).

Per config, in a fresh process: seeded synthetic data through the real SessionDataModule;
the LightningModule built from the checkout's own ``conf/model/<model>.yaml`` (Hydra
compose + instantiate, as the CLI does) with the config's settings; a real
``pytorch_lightning.Trainer`` (no logger, checkpoints or progress bar; a fresh user order
every epoch). Training: the first ``--warmup`` chunks (Lightning batches of 64 time steps,
one update per step) are not timed, then ``--epochs`` epochs of at most the config's
``chunks`` chunks are (events / seconds, CUDA synchronised at the two ends only).
Evaluation: ``trainer.test`` on the first test users holding ``eval_events`` scored events
(their whole history replayed), timed from the test loop's start to its end. Medians over
``--repeats`` fits per process; peak RSS after the first fit + test.

``--baseline-rev REV`` measures another revision side by side in the same run: a temporary
``git worktree`` of REV, and per config this same worker run with ``--tree`` on it (so it
imports REV's hrnn_lit and composes REV's conf; the timing code is the same on both sides),
the two processes alternating (new first for even configs, REV first for odd ones). Ratios
new / REV per config go to bench.json (``vs_baseline``) and the console.

Configs: ``a_*`` = Setting A, the GRU4Rec comparison (cross-entropy, H=100, B=128, 2048
negatives by popularity^0.5, a 20k-item catalogue, ~350k generated events); ``d_*`` = the
default data (conf/data/synthetic.yaml as it is) with TOP1 and in-batch negatives, H=100,
B=100, whole epochs. ``*_autograd`` = ``model.engine=autograd`` (the plain reference path);
the others ``auto``. Not in the default set: ``a_session_rnn_200k`` (200k-item catalogue),
``a_session_rnn_bf16`` (trainer precision bf16-mixed), ``a_gru4rec_xe`` (the official
GRU4Rec's full cross-entropy recipe: logQ 1, tied embedding; bench_official.py),
``a_session_rnn_h8`` (8 units, 16 samples: the step's fixed cost, with almost no arithmetic).
``--threads`` defaults to 1 (a shared 2-core machine: intra-op threads of these small ops
mostly wait on each other); ``make bench`` passes 2, as the issue's figures use.

    python experiments/bench.py --threads 2                   # default configs, bench.json
    python experiments/bench.py --configs a_session_rnn a_hrnn_init --repeats 5
    python experiments/bench.py --baseline-rev 23d3f7c        # side by side with a revision
    python experiments/bench.py --quick --json /tmp/b.json    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def _tree() -> Path:
    """The checkout whose hrnn_lit and conf/ are measured: ``--tree`` (a worker of
    ``--baseline-rev``), else this file's own."""
    if "--tree" in sys.argv:
        return Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


TREE = _tree()
sys.path.insert(0, str(TREE))  # before anything imports hrnn_lit
# the tree's hrnn_lit first, as in a real run: it sets OpenMP's spin (GOMP_SPINCOUNT) before
# torch loads, which decides how well a step's parallel regions use the second core
import hrnn_lit  # noqa: E402, F401

STEPS_PER_BATCH = 64  # time steps per chunk, as conf/data
EVAL_BATCH = 512
LR = 0.1
# Setting A's data: lighter filters than the paper's, so the generated data keeps its size
PREPROCESS = dict(
    min_item_support=1, min_session_len=2, min_user_sessions=2, max_user_sessions=None
)
GEN = dict(  # ~347k events, ~19.1k items (the catalogue padded to 20k), 9k users
    n_users=9000, n_items=22000, n_topics=40, mean_sessions=8.0, mean_session_len=5.0,
    zipf_exponent=0.6, n_hot=2000, group_pool_size=200, p_repeat=0.3,
)  # fmt: skip
QUICK_GEN = dict(n_users=300, n_items=2200, n_hot=300, group_pool_size=50)
QUICK_DEFAULT = ["data.source.n_users=300"]  # the default data's quick size
NETS = ("attention_hrnn", "hrnn_history")  # networks on the model API (their conf's class)


@dataclass(frozen=True)
class Setting:
    data: str  # gru4rec (GEN) | default (conf/data/synthetic.yaml)
    loss: str
    hidden: int  # session (and user) GRU units
    batch: int  # training slots B
    n_sample: int  # extra negatives per step (0: in-batch only)
    catalogue: int | None  # model catalogue (None: the data's items)
    chunks: int | None  # chunks per measured epoch (None: whole epochs)
    eval_events: int  # scored test events evaluated (whole users)
    precision: str = "32-true"
    model: tuple = ()  # more model keys: (key, value) pairs


@dataclass(frozen=True)
class Config:
    setting: Setting
    model: str  # conf/model name: session_rnn | hrnn_init | attention_hrnn | hrnn_history
    engine: str = "auto"


A = Setting("gru4rec", "cross-entropy", 100, 128, 2048, 20_000, chunks=5, eval_events=8000)
D = Setting("default", "top1", 100, 100, 0, None, chunks=None, eval_events=8000)
XE = dataclasses.replace(A, model=(("logq", 1.0), ("constrained_embedding", True)))
MODELS = ("session_rnn", "hrnn_init", "session_rnn_autograd", "hrnn_init_autograd",
          "attention_hrnn", "hrnn_history")  # fmt: skip
CONFIGS = {
    f"{p}_{m}": Config(s, m.removesuffix("_autograd"), "autograd" if "autograd" in m else "auto")
    for p, s in (("a", A), ("d", D))
    for m in MODELS
}
DEFAULT_CONFIGS = list(CONFIGS)
CONFIGS |= {
    "a_session_rnn_200k": Config(dataclasses.replace(A, catalogue=200_000, eval_events=2000),
                                 "session_rnn"),
    "a_session_rnn_bf16": Config(dataclasses.replace(A, precision="bf16-mixed"), "session_rnn"),
    "a_gru4rec_xe": Config(XE, "session_rnn"),
    # (a) with 8 units and 16 samples: a step's fixed cost (dispatch, autograd, optimiser)
    "a_session_rnn_h8": Config(dataclasses.replace(A, hidden=8, n_sample=16), "session_rnn"),
    "a_gru4rec_xe_autograd": Config(XE, "session_rnn", "autograd"),
}  # fmt: skip


def quick_setting(s: Setting) -> Setting:
    cat = None if s.catalogue is None else s.catalogue // 10
    return dataclasses.replace(s, catalogue=cat, chunks=2, eval_events=200)


# ====================================================================== worker side
def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compose(overrides: list[str]):
    """The checkout's conf/ composed with ``overrides`` (as the CLI composes it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(TREE / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def make_datamodule(data: str, batch: int, quick: bool):
    """Setting A's generated data (``gru4rec``) or the default data, set up for fitting."""
    from hydra.utils import instantiate

    from hrnn_lit.data.datamodule import SessionDataModule
    from hrnn_lit.data.synthetic import generate_events

    steps = STEPS_PER_BATCH // 4 if quick else STEPS_PER_BATCH
    if data == "default":
        over = [f"data.batch_size={batch}", f"data.steps_per_batch={steps}"]
        dm = instantiate(compose(over + (QUICK_DEFAULT if quick else [])).data)
    else:
        gen = GEN | QUICK_GEN if quick else GEN
        dm = SessionDataModule(
            source=functools.partial(generate_events, seed=0, **gen),
            name=f"bench-{data}", preprocess=PREPROCESS, batch_size=batch,
            eval_batch_size=EVAL_BATCH, steps_per_batch=steps, fit_split="train",
            shuffle_users=True, seed=0,
        )  # fmt: skip
    dm.setup("fit")
    return dm


def first_users(steps, n_scored: int):
    """The Steps of the first test users holding >= n_scored scored events (whole users,
    history included), so that evaluation stays within its time budget."""
    import dataclasses

    import numpy as np

    cum = np.cumsum(steps.score)
    if cum[-1] <= n_scored:
        return steps
    keep = steps.user <= steps.user[int(np.searchsorted(cum, n_scored))]
    # per-step arrays cut to the kept users; anything else (each user's seen items, in trees
    # that have them: keyed by event, valid for any whole users) kept as it is
    fields = {f.name: getattr(steps, f.name) for f in dataclasses.fields(steps)}
    cut = {k: v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v
           for k, v in fields.items()}  # fmt: skip
    return type(steps)(**cut)


def catalogue(dm, size: int | None):
    """(n_items, item counts): the data's items, padded with unseen items of count 1."""
    import numpy as np

    counts = dm.item_counts
    if size is not None and size > counts.size:
        counts = np.r_[counts, np.ones(size - counts.size, np.int64)]
    return int(counts.size), counts


def model_config(cfg: Config, s: Setting):
    """conf/model/<model>.yaml with the setting's keys: the module's training keys, the
    built-in network's sizes (dropouts off), or a model-API network's sizes."""
    from omegaconf import OmegaConf

    root = compose([f"model={cfg.model}"])
    keys = dict(loss=s.loss, n_sample=s.n_sample, sample_alpha=0.5, optimizer="adagrad",
                lr=LR, engine=cfg.engine, **dict(s.model))  # fmt: skip
    if cfg.model in NETS:  # the class where the checkout has it; the sizes only
        net = {"_target_": root.model.net._target_, "hidden_size": s.hidden}
        if cfg.model == "hrnn_history":
            net["user_hidden_size"] = s.hidden
        keys["net"] = net
    else:
        keys |= dict(hidden_size=s.hidden, dropout_user=0.0, dropout_init=0.0)
        if cfg.model != "session_rnn":
            keys["user_hidden_size"] = s.hidden
    model = OmegaConf.to_container(root.model, resolve=True)
    return OmegaConf.create(model | keys), list(root.eval.ks), root.eval.ties


def timers(warmup: int, n_scored: int, cuda: bool):
    """Callbacks timing training from the end of the ``warmup``-th chunk to the end of the
    last one, and the test loop from its start to its end."""
    import pytorch_lightning as pl
    import torch

    def now() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.n = self.events = self.steps = 0
            self.t0 = self.t1 = self.test0 = self.test1 = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if warmup == 0 and self.t0 is None:
                self.t0 = now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += 1
            if self.n == warmup:
                self.t0 = now()
            elif self.n > warmup:
                self.events += batch.n_events
                self.steps += batch.input.shape[0]
                if not cuda:
                    self.t1 = now()

        def on_train_end(self, trainer, pl_module) -> None:
            if cuda and self.n > warmup:
                self.t1 = now()

        def on_test_start(self, trainer, pl_module) -> None:
            self.test0 = now()

        def on_test_end(self, trainer, pl_module) -> None:
            self.test1 = now()

        def result(self) -> dict:
            if self.t1 is None:
                raise RuntimeError("no chunk was timed: raise chunks/epochs or lower warmup")
            wall, cpu = self.t1[0] - self.t0[0], self.t1[1] - self.t0[1]
            eval_s = self.test1[0] - self.test0[0]
            return {"events": self.events, "steps": self.steps, "seconds": wall,
                    "cpu_seconds": cpu, "train_events_per_s": self.events / wall,
                    "eval_seconds": eval_s, "eval_events_per_s": n_scored / eval_s}  # fmt: skip

    return Timer()


def fit_and_test(cfg: Config, s: Setting, dm, n_items: int, counts, args) -> dict:
    """One fit + test of the LightningModule by a real Trainer, timed."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    pl.seed_everything(0, verbose=False)
    model_cfg, ks, ties = model_config(cfg, s)
    module = instantiate(model_cfg, _convert_="all", n_items=n_items, item_counts=counts,
                         ks=ks, ties=ties)  # fmt: skip
    cuda = args.device == "cuda"
    n_scored = int(dm.eval_steps["test"].score.sum())
    timer = timers(args.warmup, n_scored, cuda)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=args.epochs,
        limit_train_batches=(args.chunks or s.chunks or 1.0), limit_val_batches=0,
        num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1, log_every_n_steps=10,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, precision=s.precision, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    loss = trainer.callback_metrics.get("train/loss_epoch")
    metrics = trainer.test(module, datamodule=dm, verbose=False)
    out = timer.result() | {
        "final_loss": float(loss) if loss is not None else None,
        "recall@20": (metrics[0] if metrics else {}).get("test/recall@20"),
        "engine": getattr(module, "engine", None),
    }
    dm.trainer = None  # the datamodule would keep the trainer (and the model) alive
    del trainer, module
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def bench_config(name: str, args) -> dict:
    import torch

    cfg = CONFIGS[name]
    s = quick_setting(cfg.setting) if args.quick else cfg.setting
    t0 = time.perf_counter()
    dm = make_datamodule(s.data, s.batch, args.quick)
    n_test = int(dm.eval_steps["test"].score.sum())
    dm.eval_steps["test"] = first_users(dm.eval_steps["test"], s.eval_events)
    n_items, counts = catalogue(dm, s.catalogue)
    setup_s = time.perf_counter() - t0
    runs, rss = [], None
    for r in range(args.repeats):
        runs.append(fit_and_test(cfg, s, dm, n_items, counts, args))
        rss = rss or peak_rss_mb()
        _log(f"{name} repeat {r}: {runs[-1]['train_events_per_s']:,.0f} train ev/s, "
             f"{runs[-1]['eval_events_per_s']:,.0f} eval ev/s ({runs[-1]['engine']})")  # fmt: skip

    return {
        "setting": dataclasses.asdict(s),
        "model": cfg.model,
        "engine": runs[0]["engine"],
        "hrnn_lit": str(Path(hrnn_lit.__file__).resolve().parent),
        "n_items": n_items,
        "n_items_data": dm.n_items,
        "train_events_per_epoch": len(dm.fit_steps),
        "timed_events_per_run": runs[0]["events"],
        "eval_scored_events": int(dm.eval_steps["test"].score.sum()),
        "test_scored_events": n_test,
        "train_events_per_s": _median(r["train_events_per_s"] for r in runs),
        "eval_events_per_s": _median(r["eval_events_per_s"] for r in runs),
        "train_events_per_cpu_s": _median(r["events"] / r["cpu_seconds"] for r in runs),
        "us_per_step": _median(r["seconds"] / r["steps"] * 1e6 for r in runs),
        # CPU seconds of this process per wall second in timed training (1.0 = one core)
        "cpu_util": _median(r["cpu_seconds"] / r["seconds"] for r in runs),
        "recall@20": runs[-1]["recall@20"],
        "final_loss": runs[-1]["final_loss"],
        "peak_rss_mb": rss,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
        "runs": {k: [r[k] for r in runs] for k in ("train_events_per_s", "eval_events_per_s")},
    }


def native_kernels() -> bool | None:
    """Whether the checkout's native CPU kernels load (built here, before any timing, on a
    first run); None where it has none."""
    import importlib

    for where in ("hrnn_lit.models.native", "hrnn_lit.ops.native"):  # (a baseline revision)
        with contextlib.suppress(ImportError):
            return importlib.import_module(where).load() is not None
    return None


def worker(names: list[str], args) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance.treespec.*")
    warnings.filterwarnings("ignore", category=UserWarning)
    import pytorch_lightning  # noqa: F401  (sets its loggers' levels: quieted after it)
    import torch

    from hrnn_lit.runtime import keep_freed_memory

    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as hrnn_lit.run does for every training run
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    kernels = native_kernels()
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            out[name] = bench_config(name, args)
        except Exception as e:  # recorded: the other configs still run
            _log(f"{name}: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        out[name] |= {"wall_s": time.perf_counter() - t0, "native_kernels": kernels}
    return out


# ================================================================ orchestrator side
def run_worker(names: list[str], args, tree: Path) -> dict:
    """This file's worker in a fresh process, measuring the checkout ``tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", ",".join(names),
               "--tree", str(tree), "--json", str(path), "--repeats", str(args.repeats),
               "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--device",
               args.device, "--threads", str(args.threads)]  # fmt: skip
        cmd += (["--chunks", str(args.chunks)] if args.chunks else []) + (
            ["--quick"] if args.quick else []
        )
        done = subprocess.run(cmd, cwd=tree)
        if done.returncode != 0 or not path.exists():
            return {n: {"error": f"worker exit status {done.returncode}"} for n in names}
        res = json.loads(path.read_text())
    for r in res.values():  # the worker imported the tree it was given, or says so
        if "hrnn_lit" in r and Path(r["hrnn_lit"]) != tree / "hrnn_lit":
            r["error"] = f"imported {r['hrnn_lit']}, not {tree / 'hrnn_lit'}"
    return res


def git(*a: str, cwd: Path = TREE) -> str:
    return subprocess.run(["git", *a], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def revision() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it) of this checkout; None outside git."""
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "-uno"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


@contextlib.contextmanager
def worktree(rev: str):
    """A temporary detached ``git worktree`` of ``rev``: (its path, its commit)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tmp = Path(tempfile.mkdtemp(prefix="hrnn-bench-"))
    path = tmp / f"rev-{commit[:9]}"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=TREE)
        shutil.rmtree(tmp, ignore_errors=True)


def _get(res: dict, name: str, key: str) -> float:
    v = res.get(name, {}).get(key)
    return float("nan") if v is None else v


def _div(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def compute_ratios(res: dict) -> dict:
    """Within the run: HRNN Init over the session RNN, the plain reference (autograd) over
    auto, the model-API networks over HRNN Init (train and eval)."""
    r = {}
    for p in "ad":

        def ratio(a: str, b: str, key: str, p: str = p) -> float:
            return _div(_get(res, f"{p}_{a}", key), _get(res, f"{p}_{b}", key))

        r[f"{p}/hrnn_init_vs_session_rnn/train"] = ratio("hrnn_init", "session_rnn",
                                                         "train_events_per_s")  # fmt: skip
        for m in ("session_rnn", "hrnn_init"):
            for what in ("train", "eval"):
                r[f"{p}/{m}_autograd_vs_auto/{what}"] = ratio(
                    f"{m}_autograd", m, f"{what}_events_per_s")
        for net in NETS:
            for what in ("train", "eval"):
                r[f"{p}/{net}_vs_hrnn_init/{what}"] = ratio(net, "hrnn_init",
                                                            f"{what}_events_per_s")  # fmt: skip
    return {k: v for k, v in r.items() if math.isfinite(v)}


def compute_vs_baseline(res: dict, base: dict) -> dict:
    out = {}
    for name, r in res.items():
        b = base.get(name, {})
        if "error" in r or not b or "error" in b:
            continue
        out[name] = {
            "train": _div(r["train_events_per_s"], b["train_events_per_s"]),
            "eval": _div(r["eval_events_per_s"], b["eval_events_per_s"]),
            "engine": r.get("engine"),
            "baseline_engine": b.get("engine"),
        }
    return out


def compute_targets(res: dict, ratios: dict, vs: dict) -> list[dict]:
    """The issue's speed targets (reported, not asserted)."""
    rows = []
    for p in "ad":
        for m in ("session_rnn", "hrnn_init"):
            if f"{p}_{m}" in vs:
                rows.append((f"{p} {m} train vs baseline", vs[f"{p}_{m}"]["train"], 0.95))
        rows.append((f"{p} hrnn_history / hrnn_init train",
                     ratios.get(f"{p}/hrnn_history_vs_hrnn_init/train"), 0.5))  # fmt: skip
        if _get(res, f"{p}_hrnn_init", "n_items") >= 15_000:  # (the issue's catalogue size)
            for net in NETS:
                rows.append((f"{p} {net} / hrnn_init eval",
                             ratios.get(f"{p}/{net}_vs_hrnn_init/eval"), 0.5))  # fmt: skip
    out = []
    for label, value, goal in rows:
        value = float("nan") if value is None else value
        met = value >= goal if math.isfinite(value) else None
        out.append({"target": label, "value": value, "op": ">=", "goal": goal, "met": met})
    return out


def _f(v, fmt: str = ",.0f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_report(result: dict) -> str:
    meta, res = result["meta"], result["configs"]
    base, vs = result.get("baseline_configs", {}), result.get("vs_baseline", {})
    head = (f"hrnn_lit bench: device {meta['device']}, {meta['cpus']} CPUs, torch threads "
            f"{meta['threads']}, medians of {meta['repeats']} repeats x {meta['epochs']} epochs "
            f"(warm-up {meta['warmup']} chunk), torch {meta['torch']}, lightning "
            f"{meta['lightning']}, native kernels {'on' if meta['native_kernels'] else 'off'}"
            f"{', QUICK sizes' if meta['quick'] else ''}")  # fmt: skip
    lines = [head]
    if meta.get("baseline"):
        b = meta["baseline"]
        lines.append(f"baseline: {b['rev']} ({b['commit'][:9]}) measured side by side; "
                     "x = this checkout / baseline")  # fmt: skip
    lines += ["", "train = events/s of training (Trainer.fit), eval = scored events/s of "
              "trainer.test (history replay included), R@20 its recall@20"]  # fmt: skip
    cols = f"{'config':<24}{'items':>8}{'B':>4}{'H':>4}  {'engine':<9}{'train':>8}{'eval':>8}"
    cols += f"{'R@20':>7}{'RSS MB':>8}{'us/step':>8}"
    if base:
        cols += f" |{'base train':>11}{'base eval':>10}{'train x':>8}{'eval x':>7}  base engine"
    lines.append(cols)
    for name, r in res.items():
        if "error" in r:
            lines.append(f"{name:<24} ERROR: {r['error']}")
            continue
        st = r["setting"]
        row = (f"{name:<24}{r['n_items']:>8,}{st['batch']:>4}{st['hidden']:>4}  "
               f"{str(r['engine']):<9}{_f(r['train_events_per_s']):>8}"
               f"{_f(r['eval_events_per_s']):>8}{_f(r['recall@20'], '.4f'):>7}"
               f"{_f(r['peak_rss_mb']):>8}{_f(r['us_per_step']):>8}")  # fmt: skip
        if base:
            b, x = base.get(name, {}), vs.get(name)
            if "error" in b:
                row += f" | baseline ERROR: {b['error'][:60]}"
            elif x:
                row += (f" |{_f(b['train_events_per_s']):>11}{_f(b['eval_events_per_s']):>10}"
                        f"{_f(x['train'], '.3f'):>8}{_f(x['eval'], '.3f'):>7}  "
                        f"{b.get('engine')}")  # fmt: skip
        lines.append(row)
    lines.append("")
    lines.append("CPU share of the worker in timed training (1.0 = a whole core; less = "
                 "preempted): " + ", ".join(f"{n} {r['cpu_util']:.2f}" for n, r in res.items()
                                           if r.get("cpu_util")))  # fmt: skip
    lines += ["", "ratios (same run):"]
    lines += [f"  {k:<46}{_f(v, '.3f')}" for k, v in result["ratios"].items()]
    lines += ["", "targets (reported, not asserted):"]
    for t in result["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  {t['target']:<42}{_f(t['value'], '.3f'):>8}  >= {t['goal']:<6}{mark}")
    return "\n".join(lines)


def _clean(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", help=f"subset of {', '.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=3, help="fits per config (medians)")
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs per fit")
    ap.add_argument("--chunks", type=int, help="chunks per epoch (default: per config)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed chunks at the start")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--baseline-rev", help="also measure this git revision, side by side")
    ap.add_argument("--json", type=Path, default=Path("bench.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # worker: comma-separated configs
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # worker: the checkout
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv
    if args.quick:
        args.repeats = args.repeats if "--repeats" in given else 1
        args.epochs = args.epochs if "--epochs" in given else 1
    if args.one:
        out = worker(args.one.split(","), args)
        args.json.write_text(json.dumps(_clean(out), indent=2) + "\n")
        return 0
    names = [n for c in args.configs or DEFAULT_CONFIGS for n in c.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    t0, load_start = time.perf_counter(), os.getloadavg()
    # one process per config (isolated RSS); --quick packs them into one process per tree
    groups = [names] if args.quick else [[n] for n in names]
    res, base = {}, {}
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(worktree(args.baseline_rev)) if args.baseline_rev else None
        for i, group in enumerate(groups):
            sides = [("new", TREE)] + ([("old", old[0])] if old else [])
            for side, tree in sides if i % 2 == 0 else sides[::-1]:
                _log(f"{'+'.join(group)}: {'this checkout' if side == 'new' else old[1][:9]}")
                (res if side == "new" else base).update(run_worker(group, args, tree))
    import pytorch_lightning
    import torch

    res = {n: res[n] for n in names}
    vs = compute_vs_baseline(res, base) if old else {}
    ratios = compute_ratios(res)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "revision": revision()[0],
        "dirty": revision()[1],
        "device": args.device, "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": platform.processor() or platform.machine(), "threads": args.threads,
        "repeats": args.repeats, "epochs": args.epochs, "warmup": args.warmup,
        "quick": args.quick, "torch": torch.__version__,
        "lightning": pytorch_lightning.__version__, "native_kernels": native_kernels(),
        "baseline": {"rev": args.baseline_rev, "commit": old[1]} if old else None,
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
    }  # fmt: skip
    result = {"meta": meta, "configs": res, "ratios": ratios}
    if old:
        result |= {"baseline_configs": {n: base[n] for n in names}, "vs_baseline": vs}
    result["targets"] = compute_targets(res, ratios, vs)
    print(format_report(result))
    print(f"\nbench: {meta['total_s']:.0f}s, results in {args.json}")
    args.json.write_text(json.dumps(_clean(result), indent=2) + "\n")
    return 1 if any("error" in r for r in [*res.values(), *base.values()]) else 0


if __name__ == "__main__":
    sys.exit(main())
