"""Training and evaluation throughput of hrnn_lit (``make bench``).

Generates seeded synthetic data in memory (hrnn_lit.data.synthetic through the real
SessionDataModule and preprocessing), then, per config, in a fresh subprocess:

- **ours**: RecurrentRecommender fitted by a real ``pytorch_lightning.Trainer`` (no logger,
  no checkpoints, no progress bar, a fresh user order every epoch as conf/trainer does).
  The first ``--warmup`` chunks are not timed; then ``--epochs`` epochs of at most the
  config's ``chunks`` chunks (Lightning batches of 64 time steps, one update per step) are.
  Evaluation is ``trainer.test`` on whole test users (history replay included), timed by
  hrnn_lit's Throughput callback: scored events / seconds of the test loop.
- **plain**: the same RecurrentCore, loss, PopularitySampler and SparseRowOptimizer in a
  bare Python loop over the same PlanDataset chunks (no Lightning), timed the same way.
  It mirrors RecurrentRecommender.training_step line by line (keep the two in step), so
  ours / plain is Lightning's overhead.
  On CPU it is timed per phase with ``perf_counter`` (data; forward incl. negative
  sampling, zero_grad and the loss gradient; backward; optimiser; other), which costs < 1 us
  per step; on
  CUDA an extra pass with ``torch.cuda.synchronize`` between phases gives the split, and
  the timed runs synchronise only at the two ends of their window (both check a chunk's
  losses one chunk late there, as the module does).
- **ref**: the plain loop of the *session RNN* of the same setting, the in-run reference.
  Ratios across configs (HRNN / session RNN, 200k / 20k items) are also given normalised
  by each process's own reference, which cancels machine-speed drift between processes.

ours, plain and ref alternate within each repeat (order reversed every other repeat) and
medians over ``--repeats`` are reported. Peak RSS is ``ru_maxrss`` of the config's process
read right after its first Lightning fit + test (before any plain-loop model exists);
``--quick`` runs all configs in one process (RSS not isolated). Evaluation covers the first
test users holding the config's ``eval_events`` scored events (all of them with their
history), to bound its time. ``--threads`` defaults to 1: on a 2-core machine shared with
other jobs, two intra-op threads made a training step ~8x slower (each of the ~100 small
ops per step waits for both threads); pass ``--threads 2`` on an idle machine (on
2026-11-27 it trained (a) x1.5-1.7 faster than 1 thread in every run).

Configs: a_* = GRU4Rec comparison (cross-entropy, H=100, B=128, 2048 extra negatives by
popularity^0.5, 20k items, ~350k events); b_* = paper XING small (TOP1, in-batch negatives,
H=100, B=50, Adagrad) on data of paper XING scale (~545k events, ~59k items, 11.5k users);
c_* = b at H=500 (paper large). Training uses the train split (~398k steps for b/c, 242k
for a); an epoch is capped at the config's ``chunks`` to bound the time, except in
a_events. a_session_rnn_200k = a with a 200k-item catalogue (same
events; the catalogue is padded with unseen items of count 1, so the sampler spans it);
a_events = full epochs of a's session RNN on 1/8, 1/4 and 1/2 of a's users (linearity).
a_session_rnn_bf16 = a under trainer precision bf16-mixed (the two [B, B+S] products of the
backward in bfloat16), its reference the float32 plain loop of a, interleaved.

    python experiments/bench.py                        # all configs, bench.json
    python experiments/bench.py --configs a_session_rnn a_hrnn_init --repeats 5
    python experiments/bench.py --quick --json /tmp/b.json  # smoke test (< 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

STEPS_PER_BATCH = 64  # time steps per Lightning batch ("chunk"), as conf/data
EVAL_BATCH = 512  # slots in evaluation, as conf/data
LR = 0.1  # Adagrad, the reference's setting
# Lighter filters than the paper's (session-rec's), so the generated data keeps its size.
PREPROCESS = dict(
    min_item_support=1, min_session_len=2, min_user_sessions=2, max_user_sessions=None
)
GEN = {  # generate_events arguments; sizes after preprocessing in the comments
    # ~347k events, ~19.1k items (padded to the 20k catalogue), 9k users
    "gru4rec": dict(
        n_users=9000,
        n_items=22000,
        n_topics=40,
        mean_sessions=8.0,
        mean_session_len=5.0,
        zipf_exponent=0.6,
        n_hot=2000,
        group_pool_size=200,
        p_repeat=0.3,
    ),
    # paper XING scale: ~545k events, ~59.4k items, 11.5k users, ~90k sessions
    "xing": dict(
        n_users=11500,
        n_items=70000,
        n_topics=40,
        mean_sessions=7.8,
        mean_session_len=6.3,
        zipf_exponent=0.5,
        n_hot=3000,
        group_pool_size=200,
        p_repeat=0.3,
    ),
}
QUICK_GEN = {
    "gru4rec": dict(n_users=300, n_items=2200, n_hot=300, group_pool_size=50),
    "xing": dict(n_users=300, n_items=7000, n_hot=300, group_pool_size=50),
}
EVENT_FRACTIONS = (0.125, 0.25, 0.5)  # a_events: shares of a's users
RSS_LIMIT_MB = 2048
PHASES = ("data", "forward", "backward", "optimiser", "other")


@dataclass(frozen=True)
class Setting:
    data: str  # key of GEN
    loss: str
    hidden: int  # session and user GRU units
    batch: int  # training slots B
    n_sample: int  # extra negatives per step (0: in-batch only)
    catalogue: int | None  # model catalogue (None: the data's items)
    chunks: int  # chunks per measured epoch (limit_train_batches)
    eval_events: int  # scored test events to evaluate (whole users)
    sample_alpha: float = 0.5
    precision: str = "32-true"  # Trainer precision; bf16-mixed: bfloat16 backward products


@dataclass(frozen=True)
class Config:
    setting: Setting
    model: str  # session_rnn | hrnn_init
    ref: Setting | None = None  # the reference's setting when not ``setting``
    kind: str = "train"  # train | events (linearity in events)
    engine: str = "manual"  # model.engine of ours (the plain loop is always the manual step)


A = Setting("gru4rec", "cross-entropy", 100, 128, 2048, 20_000, chunks=5, eval_events=8000)
B = Setting("xing", "top1", 100, 50, 0, None, chunks=12, eval_events=8000)
C = dataclasses.replace(B, hidden=500, chunks=5, eval_events=3000)
A200 = dataclasses.replace(A, catalogue=200_000, eval_events=2000)
A_BF16 = dataclasses.replace(A, precision="bf16-mixed")
CONFIGS = {
    "a_session_rnn": Config(A, "session_rnn"),
    "a_hrnn_init": Config(A, "hrnn_init"),
    "b_session_rnn": Config(B, "session_rnn"),
    "b_hrnn_init": Config(B, "hrnn_init"),
    "c_session_rnn": Config(C, "session_rnn"),
    "c_hrnn_init": Config(C, "hrnn_init"),
    "a_session_rnn_200k": Config(A200, "session_rnn", ref=A),
    "a_session_rnn_bf16": Config(A_BF16, "session_rnn", ref=A),
    "a_events": Config(A, "session_rnn", kind="events"),
    # the autograd engine (the networks' own forward + autograd) and the example user model
    "a_session_rnn_autograd": Config(A, "session_rnn", engine="autograd"),
    "a_hrnn_init_autograd": Config(A, "hrnn_init", engine="autograd"),
    "a_attention_hrnn": Config(A, "attention_hrnn", engine="autograd"),
    "a_hrnn_history": Config(A, "hrnn_history", engine="autograd"),
}
AUTOGRAD_CONFIGS = [n for n, c in CONFIGS.items() if c.engine == "autograd"]


class Job(NamedTuple):
    """What one timed training run needs: the setting, the model, the data and catalogue,
    the bench's arguments, and the chunks per epoch (None: whole epochs) and epochs."""

    s: Setting
    model: str
    dm: object  # SessionDataModule
    n_items: int
    counts: object  # item counts (numpy)
    args: argparse.Namespace
    chunks: int | None
    epochs: int
    engine: str = "manual"


def quick_setting(s: Setting) -> Setting:
    cat = None if s.catalogue is None else s.catalogue // 10
    return dataclasses.replace(s, catalogue=cat, chunks=2, eval_events=200)


# ====================================================================== worker side
def _quiet() -> None:
    """Silence Lightning's banners and tips (after its import, which sets its levels)."""
    import pytorch_lightning  # noqa: F401

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="pytorch_lightning")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_datamodule(data: str, batch: int, quick: bool, n_users: int | None = None):
    from hrnn_lit.data.datamodule import SessionDataModule
    from hrnn_lit.data.synthetic import generate_events

    gen = dict(GEN[data], **(QUICK_GEN[data] if quick else {}))
    if n_users is not None:
        gen["n_users"] = n_users
    dm = SessionDataModule(
        source=functools.partial(generate_events, seed=0, **gen),
        name=f"bench-{data}",
        preprocess=PREPROCESS,
        batch_size=batch,
        eval_batch_size=EVAL_BATCH,
        steps_per_batch=STEPS_PER_BATCH // 4 if quick else STEPS_PER_BATCH,
        fit_split="train",
        shuffle_users=True,
        seed=0,
    )
    dm.setup("fit")
    return dm


def first_users(steps, n_scored: int):
    """The Steps of the first test users holding >= n_scored scored events (whole users,
    history included), so that evaluation stays within the time budget."""
    import numpy as np

    from hrnn_lit.data.batching import Steps

    cum = np.cumsum(steps.score)
    if cum[-1] <= n_scored:
        return steps
    last_user = steps.user[int(np.searchsorted(cum, n_scored))]
    keep = steps.user <= last_user
    return Steps(**{f.name: getattr(steps, f.name)[keep] for f in dataclasses.fields(Steps)})


def catalogue(dm, size: int | None):
    """(n_items, item counts) of the model: the data's items, padded with unseen items of
    count 1 up to ``size``."""
    import numpy as np

    counts = dm.item_counts
    if size is not None and size > counts.size:
        counts = np.r_[counts, np.ones(size - counts.size, np.int64)]
    return int(counts.size), counts


def model_kwargs(s: Setting, model: str) -> dict:
    if model == "attention_hrnn":  # the example network of the model API
        net = "hrnn_lit.nets.attention_hrnn.AttentionHRNN"
        return dict(net={"_target_": net, "hidden_size": s.hidden})
    if model == "hrnn_history":
        net = "hrnn_lit.nets.history.HistoryHRNN"
        return dict(net={"_target_": net, "hidden_size": s.hidden, "user_hidden_size": s.hidden})
    hier = model != "session_rnn"
    return dict(
        hidden_size=s.hidden,
        user_hidden_size=s.hidden if hier else 0,
        user_propagation="init" if hier else "none",
    )


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _chunk_timer(warmup: int, device):
    """A callback timing training from the end of the ``warmup``-th chunk to the end of
    the last one (data loading and epoch boundaries inside the window are included). On
    CUDA it synchronises only at those two ends, so that work the host queues ahead (the
    module checks a chunk's losses one chunk late there) is timed as it runs."""
    import pytorch_lightning as pl

    class ChunkTimer(pl.Callback):
        def __init__(self) -> None:
            self.n = self.events = self.steps = 0
            self.t0 = self.t1 = self.c0 = self.c1 = None

        def _mark(self) -> tuple[float, float]:
            _sync(device)
            return time.perf_counter(), time.process_time()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if warmup == 0 and self.t0 is None:
                self.t0, self.c0 = self._mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += 1
            if self.n == warmup:
                self.t0, self.c0 = self._mark()
            elif self.n > warmup:
                self.events += batch.n_events
                self.steps += batch.input.shape[0]
                last = (
                    trainer.current_epoch == trainer.max_epochs - 1
                    and batch_idx == trainer.num_training_batches - 1
                )
                if device.type != "cuda" or last:
                    self.t1, self.c1 = self._mark()

        def on_train_end(self, trainer, pl_module) -> None:
            if device.type == "cuda" and self.t1 is None and self.n > warmup:
                self.t1, self.c1 = self._mark()  # (an epoch shorter than expected)

        def result(self) -> dict:
            if self.t1 is None:
                raise RuntimeError("no chunk was timed: raise chunks/epochs or lower warmup")
            return {
                "events": self.events,
                "steps": self.steps,
                "seconds": self.t1 - self.t0,
                "cpu_seconds": self.c1 - self.c0,
            }

    return ChunkTimer()


def run_ours(job: Job, evaluate: bool, warmup: int | None = None) -> dict:
    """Fit (and test) the real LightningModule with a real Trainer."""
    s, model, dm, n_items, counts, args, chunks, epochs, engine = job
    import pytorch_lightning as pl
    import torch

    from hrnn_lit.callbacks import Throughput
    from hrnn_lit.models.module import RecurrentRecommender

    pl.seed_everything(0, verbose=False)
    module = RecurrentRecommender(
        n_items=n_items,
        item_counts=counts,
        name=model,
        loss=s.loss,
        n_sample=s.n_sample,
        sample_alpha=s.sample_alpha,
        optimizer="adagrad",
        lr=LR,
        cuda_graph=args.cuda_graph and engine == "manual",
        engine=engine,
        **model_kwargs(s, model),
    )
    device = torch.device(args.device)
    timer = _chunk_timer(args.warmup if warmup is None else warmup, device)
    throughput = Throughput()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=chunks if chunks else 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=s.precision,
        callbacks=[timer, throughput],
    )
    trainer.fit(module, datamodule=dm)
    out = timer.result()
    loss = trainer.callback_metrics.get(
        "train/loss_epoch", trainer.callback_metrics.get("train/loss")
    )
    out["final_loss"] = float(loss) if loss is not None else float("nan")
    if evaluate:
        t0 = time.perf_counter()
        trainer.test(module, datamodule=dm, verbose=False)
        out["eval_wall_seconds"] = time.perf_counter() - t0
        out["eval_seconds"] = throughput.test_seconds
        out["eval_scored"] = throughput.test_events
        out["eval_events_per_s"] = throughput.eval_events_per_s
        out["recall@20"] = float(module.eval_metrics["test"]["test/recall@20"])
    dm.trainer = None  # the datamodule would keep the trainer (and the model) alive
    del trainer, module
    gc.collect()
    return out


def _epoch_plan(dm, epoch: int):
    """The training plan of ``epoch`` exactly as SessionDataModule builds it."""
    import numpy as np

    from hrnn_lit.data.batching import build_plan

    steps = dm.fit_steps
    order = None
    if dm.shuffle_users:
        n_users = int(steps.user_start.sum())
        order = np.random.default_rng([dm.seed, epoch]).permutation(n_users)
    return build_plan(steps.user, dm.batch_size, order)


def _epoch_loader(dm, epoch: int):
    """The training DataLoader of ``epoch`` exactly as SessionDataModule builds it."""
    from torch.utils.data import DataLoader

    from hrnn_lit.data.batching import PlanDataset

    plan = _epoch_plan(dm, epoch)
    return DataLoader(PlanDataset(dm.fit_steps, plan, dm.steps_per_batch), batch_size=None)


def run_plain(job: Job, sync_phases: bool = False, graph: bool | None = None) -> dict:
    """The same training in a bare loop (what RecurrentRecommender.training_step does, with
    no Lightning), timed per phase. ``sync_phases`` synchronises CUDA between phases.
    ``graph`` (default ``--cuda-graph``): each update a replay of one CUDA graph, timed as
    forward."""
    s, model, dm, n_items, counts, args, chunks, epochs, _ = job
    import torch
    from hrnn_lit.models.graph_step import GraphStep, chunk_inputs

    from hrnn_lit.models import update
    from hrnn_lit.nets.recurrent import RecurrentCore
    from hrnn_lit.ops.losses import distinct_loss_and_grad, loss_and_grad
    from hrnn_lit.ops.optim import SparseRowOptimizer
    from hrnn_lit.ops.sampling import PopularitySampler

    torch.manual_seed(0)
    device = torch.device(args.device)
    core = RecurrentCore(n_items, **model_kwargs(s, model)).to(device)
    loss_grad = loss_and_grad(s.loss)
    distinct_loss = distinct_loss_and_grad(s.loss)
    mm_dtype = torch.bfloat16 if s.precision == "bf16-mixed" else None
    sampler = None
    if s.n_sample > 0:
        sampler = PopularitySampler(counts, s.sample_alpha).to(device)
    params = list(core.parameters())
    opt = SparseRowOptimizer(params, kind="adagrad", lr=LR)
    graph = args.cuda_graph if graph is None else graph
    gs = None
    if graph:
        B = dm.batch_size
        gs = GraphStep(core, loss_grad, opt, B, B + s.n_sample, device, mm_dtype)
    sync = (lambda: torch.cuda.synchronize()) if sync_phases else (lambda: None)
    pc = time.perf_counter
    ph = dict.fromkeys(PHASES, 0.0)
    n_chunk = events = steps = 0
    t0 = t1 = c0 = c1 = None
    last_loss = None
    unchecked = []  # chunks' losses not checked yet
    warmup = args.warmup
    if warmup == 0:
        _sync(device)
        t0, c0 = pc(), time.process_time()
    for epoch in range(epochs):
        a = pc()
        it = iter(_epoch_loader(dm, epoch))
        t_data = pc() - a  # plan building, charged to the epoch's first chunk
        state = None
        for _ in range(chunks or 1 << 62):
            a = pc()
            batch = next(it, None)
            if batch is None:
                break
            batch = batch.to(device, non_blocking=True)
            sync()
            t_data += pc() - a
            t_fwd = t_bwd = t_opt = 0.0
            a = pc()
            inp, tgt, valid = batch.input, batch.target, batch.valid
            T, Bn = inp.shape
            h, c = state or core.initial_state(Bn, inp.device)
            samples = sampler.draw((T, s.n_sample)) if sampler is not None else None
            cand = tgt if samples is None else torch.cat([tgt, samples], dim=1)
            losses = torch.zeros(T, device=device)
            if gs is not None:  # = RecurrentRecommender._graph_chunk
                ids, flags = chunk_inputs(batch, cand)
                gs.set_state(h, c)
                for t in range(T):
                    losses[t] = gs.step(ids[t], flags[t])
                h, c = gs.state()
            else:
                distinct = update.chunk_distinct(cand, inp, valid, n_items)
            sync()
            t_fwd += pc() - a
            for t in range(T if gs is None else 0):  # the eager updates
                p0 = pc()
                h, c, start = update.start_step(core, batch, t, h, c)
                h, loss, cache = update.forward(
                    core, loss_grad, inp[t], h, c, cand[t], valid[t], start, mm_dtype,
                    distinct[t], distinct_loss,
                )  # fmt: skip
                sync()
                p1 = pc()
                grads = update.gradients(core, cache)
                sync()
                p2 = pc()
                opt.update(grads)  # as ours: no torch.optim wrapper, no .grad tensors
                sync()
                p3 = pc()
                losses[t] = loss
                t_fwd += p1 - p0
                t_bwd += p2 - p1
                t_opt += p3 - p2
            # training_step's one sync per chunk, on CUDA for the chunk before this one
            unchecked.append(losses)
            while len(unchecked) > (1 if device.type == "cuda" else 0):
                if not bool(torch.isfinite(unchecked.pop(0)).all()):
                    raise FloatingPointError(f"plain loop: non-finite loss before chunk {n_chunk}")
            state = (h, c)
            last_loss = losses.mean()  # as training_step logs it
            n_chunk += 1
            if n_chunk == warmup:
                _sync(device)
                t0, c0 = pc(), time.process_time()
            elif n_chunk > warmup:
                if device.type != "cuda":  # (on CUDA: once, after the loop)
                    t1, c1 = pc(), time.process_time()
                events += batch.n_events
                steps += T
                for k, v in zip(PHASES, (t_data, t_fwd, t_bwd, t_opt)):
                    ph[k] += v
            t_data = 0.0
    if device.type == "cuda" and n_chunk > warmup:
        _sync(device)
        t1, c1 = pc(), time.process_time()
    if any(not bool(torch.isfinite(x).all()) for x in unchecked):
        raise FloatingPointError("plain loop: non-finite loss in the last chunk")
    if t1 is None:
        raise RuntimeError("no chunk was timed: raise chunks/epochs or lower warmup")
    seconds = t1 - t0
    ph["other"] = max(seconds - sum(ph[k] for k in PHASES[:-1]), 0.0)
    out = {
        "events": events,
        "steps": steps,
        "seconds": seconds,
        "cpu_seconds": c1 - c0,
        "phase_seconds": ph,
        "final_loss": float(last_loss),
    }
    del core, opt, sampler
    gc.collect()
    return out


def _eps(run: dict) -> float:
    return run["events"] / run["seconds"]


def _phase_summary(runs: list[dict]) -> tuple[dict, dict]:
    """Median microseconds per step of each phase, and each phase's share of the step."""
    us = {k: _median([r["phase_seconds"][k] / r["steps"] * 1e6 for r in runs]) for k in PHASES}
    total = sum(us.values())
    us["total"] = total
    share = {k: us[k] / total if total > 0 else float("nan") for k in PHASES}
    return us, share


def bench_train(name: str, cfg: Config, args) -> dict:
    import torch

    s = quick_setting(cfg.setting) if args.quick else cfg.setting
    ref_s = cfg.ref or cfg.setting
    ref_s = quick_setting(ref_s) if args.quick else ref_s
    t_setup = time.perf_counter()
    dm = make_datamodule(s.data, s.batch, args.quick)
    n_test_scored = int(dm.eval_steps["test"].score.sum())
    dm.eval_steps["test"] = first_users(dm.eval_steps["test"], s.eval_events)
    test = dm.eval_steps["test"]
    n_items, counts = catalogue(dm, s.catalogue)
    ref_items, ref_counts = catalogue(dm, ref_s.catalogue)
    setup_s = time.perf_counter() - t_setup
    chunks, epochs = args.chunks or s.chunks, args.epochs
    with_ref = cfg.model != "session_rnn" or cfg.ref is not None
    no_plain = cfg.model in ("attention_hrnn", "hrnn_history")  # no hand-written step
    _log(
        f"{name}: {len(dm.fit_steps):,} training events, {dm.n_items:,} items (catalogue "
        f"{n_items:,}), {int(test.score.sum()):,} scored of {n_test_scored:,} test events "
        f"evaluated; setup {setup_s:.1f}s"
    )
    runs: dict[str, list[dict]] = {"ours": [], "plain": [], "ref": []}
    main = Job(s, cfg.model, dm, n_items, counts, args, chunks, epochs, cfg.engine)
    ref = Job(ref_s, "session_rnn", dm, ref_items, ref_counts, args, chunks, epochs)
    jobs = {
        "ours": lambda: run_ours(main, True),
        "plain": lambda: run_plain(main),
        "ref": lambda: run_plain(ref),
    }
    order = ["ours"] + ([] if no_plain else ["plain"]) + (["ref"] if with_ref else [])
    rss = None
    for r in range(args.repeats):
        for job in order if r % 2 == 0 else order[::-1]:
            res = jobs[job]()
            runs[job].append(res)
            if rss is None and job == "ours":
                rss = peak_rss_mb()
            extra = f", eval {res['eval_events_per_s']:,.0f} ev/s" if job == "ours" else ""
            _log(f"{name} repeat {r} {job}: {_eps(res):,.0f} train ev/s{extra}")
    if not with_ref:
        runs["ref"] = runs["plain"]
    if no_plain:
        runs["plain"] = runs["ref"]
    if args.device == "cuda":  # the timed runs had no syncs: split phases in one more pass
        profile = [run_plain(main, True, graph=False)]  # (a graph has no phases)
    else:
        profile = runs["plain"]
    us, share = _phase_summary(profile)
    ours_eps = [_eps(r) for r in runs["ours"]]
    plain_eps = [_eps(r) for r in runs["plain"]]
    ref_eps = [_eps(r) for r in runs["ref"]]
    ours_cpu = [r["events"] / r["cpu_seconds"] for r in runs["ours"]]
    plain_cpu = [r["events"] / r["cpu_seconds"] for r in runs["plain"]]
    return {
        "kind": "train",
        "setting": dataclasses.asdict(s),
        "model": cfg.model,
        "engine": cfg.engine,
        "n_items": n_items,
        "n_items_data": dm.n_items,
        "train_events_per_epoch": len(dm.fit_steps),
        "timed_events_per_run": runs["ours"][0]["events"],
        "eval_scored_events": int(test.score.sum()),
        "eval_replayed_events": len(test),
        "train_events_per_s": _median(ours_eps),
        "plain_events_per_s": _median(plain_eps),
        "ref_events_per_s": _median(ref_eps),
        # time per event of ours over the plain loop, minus 1 (paired within a repeat)
        "lightning_overhead": _median([p / o - 1 for p, o in zip(plain_eps, ours_eps)]),
        # the same in process CPU time: insensitive to preemption on a shared machine
        "lightning_overhead_cpu": _median([p / o - 1 for p, o in zip(plain_cpu, ours_cpu)]),
        "train_events_per_cpu_s": _median(ours_cpu),
        "plain_events_per_cpu_s": _median(plain_cpu),
        "ours_vs_ref": _median([o / f for o, f in zip(ours_eps, ref_eps)]),
        "plain_vs_ref": _median([p / f for p, f in zip(plain_eps, ref_eps)]),
        "eval_events_per_s": _median([r["eval_events_per_s"] for r in runs["ours"]]),
        "step_us": us,
        "step_share": share,
        "ours_step_us": _median([r["seconds"] / r["steps"] * 1e6 for r in runs["ours"]]),
        # CPU seconds of this process per wall second in timed training (1.0 = one core)
        "cpu_util": _median(
            [r["cpu_seconds"] / r["seconds"] for r in runs["ours"] + runs["plain"]]
        ),
        "peak_rss_mb": rss,
        "process_peak_rss_mb": peak_rss_mb(),
        "final_loss": {k: runs[k][-1]["final_loss"] for k in ("ours", "plain")},
        "recall@20": runs["ours"][-1].get("recall@20"),
        "setup_s": setup_s,
        "runs": {
            "ours_events_per_s": ours_eps,
            "plain_events_per_s": plain_eps,
            "ref_events_per_s": ref_eps if with_ref else None,
            "eval_events_per_s": [r["eval_events_per_s"] for r in runs["ours"]],
        },
        "threads": torch.get_num_threads(),
    }


def bench_events(name: str, cfg: Config, args) -> dict:
    """Full epochs of ours on datasets of growing size (same generator, same catalogue)."""
    s = quick_setting(cfg.setting) if args.quick else cfg.setting
    base_users = (QUICK_GEN if args.quick else GEN)[s.data]["n_users"]
    sizes = {}
    for frac in EVENT_FRACTIONS:
        dm = make_datamodule(s.data, s.batch, args.quick, n_users=round(base_users * frac))
        n_items, counts = catalogue(dm, s.catalogue)
        n_chunks = -(-_epoch_plan(dm, 0).shape[0] // dm.steps_per_batch)
        warmup = 0 if args.quick or n_chunks <= args.warmup else args.warmup  # tiny data
        sizes[frac] = (dm, n_items, counts, warmup)
    runs: dict[float, list[dict]] = {f: [] for f in EVENT_FRACTIONS}
    rss = None
    for r in range(args.repeats):
        for frac in EVENT_FRACTIONS if r % 2 == 0 else EVENT_FRACTIONS[::-1]:
            dm, n_items, counts, warmup = sizes[frac]
            job = Job(s, cfg.model, dm, n_items, counts, args, None, 1)
            res = run_ours(job, False, warmup)
            runs[frac].append(res)
            rss = rss or peak_rss_mb()
            _log(
                f"{name} repeat {r} users x{frac}: {_eps(res):,.0f} train ev/s "
                f"({res['events']:,} events in {res['seconds']:.2f}s)"
            )
    out = []
    for frac in EVENT_FRACTIONS:
        dm, n_items, _, _ = sizes[frac]
        eps = _median([_eps(x) for x in runs[frac]])
        plan = _epoch_plan(dm, 0)
        out.append(
            {
                "user_fraction": frac,
                "train_events_per_epoch": len(dm.fit_steps),
                "n_items": n_items,
                "timed_events": runs[frac][0]["events"],
                "train_events_per_s": eps,
                "epoch_seconds": len(dm.fit_steps) / eps,
                "plan_fill": len(dm.fit_steps) / plan.size,  # share of [T, B] slots used
                "runs_events_per_s": [_eps(x) for x in runs[frac]],
            }
        )
    first, last = out[0], out[-1]
    return {
        "kind": "events",
        "setting": dataclasses.asdict(s),
        "model": cfg.model,
        "n_items": first["n_items"],
        "sizes": out,
        "train_events_per_s": last["train_events_per_s"],
        # 1.0 = cost exactly linear in events; > 1 = larger data is cheaper per event
        "linearity": last["train_events_per_s"] / first["train_events_per_s"],
        "time_ratio": last["epoch_seconds"] / first["epoch_seconds"],
        "events_ratio": last["train_events_per_epoch"] / first["train_events_per_epoch"],
        "peak_rss_mb": rss,
        "process_peak_rss_mb": peak_rss_mb(),
    }


def worker(names: list[str], args) -> dict:
    import torch

    from hrnn_lit.runtime import keep_freed_memory

    _quiet()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as hrnn_lit.run does for every training run
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    out = {}
    for name in names:
        cfg = CONFIGS[name]
        t0 = time.perf_counter()
        res = (
            bench_events(name, cfg, args) if cfg.kind == "events" else bench_train(name, cfg, args)
        )
        res["wall_s"] = time.perf_counter() - t0
        res["rss_isolated"] = len(names) == 1
        out[name] = res
    return out


# ================================================================ orchestrator side
def run_child(names: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.json"
        cmd = [
            sys.executable,
            __file__,
            "--one",
            ",".join(names),
            "--json",
            str(path),
            "--repeats",
            str(args.repeats),
            "--epochs",
            str(args.epochs),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        if args.cuda_graph:
            cmd.append("--cuda-graph")
        if args.chunks:
            cmd += ["--chunks", str(args.chunks)]
        if args.quick:
            cmd.append("--quick")
        done = subprocess.run(cmd)
        if done.returncode != 0:
            return {n: {"error": f"worker exit status {done.returncode}"} for n in names}
        return json.loads(path.read_text())


def _get(res: dict, name: str, key: str) -> float:
    v = res.get(name, {}).get(key)
    return float("nan") if v is None else v


def compute_ratios(res: dict) -> dict:
    r: dict = {}
    for s in "abc":
        ses, hr = f"{s}_session_rnn", f"{s}_hrnn_init"
        r[f"{s}/lightning_overhead"] = _get(res, ses, "lightning_overhead")
        r[f"{s}/lightning_overhead_cpu_time"] = _get(res, ses, "lightning_overhead_cpu")
        r[f"{s}/hrnn_lightning_overhead"] = _get(res, hr, "lightning_overhead")
        r[f"{s}/hrnn_lightning_overhead_cpu_time"] = _get(res, hr, "lightning_overhead_cpu")
        r[f"{s}/hrnn_vs_session"] = _get(res, hr, "train_events_per_s") / _get(
            res, ses, "train_events_per_s"
        )
        # normalised by each process's plain session-RNN reference (cancels drift)
        r[f"{s}/hrnn_vs_session_normalised"] = _get(res, hr, "ours_vs_ref") / _get(
            res, ses, "ours_vs_ref"
        )
        r[f"{s}/hrnn_vs_session_eval"] = _get(res, hr, "eval_events_per_s") / _get(
            res, ses, "eval_events_per_s"
        )
    # bf16-mixed over float32: plain loops interleaved in one process, and ours across runs
    r["a/bf16_vs_float32_plain_same_run"] = _get(res, "a_session_rnn_bf16", "plain_vs_ref")
    r["a/bf16_vs_float32"] = _get(res, "a_session_rnn_bf16", "train_events_per_s") / _get(
        res, "a_session_rnn", "train_events_per_s"
    )
    big, small = "a_session_rnn_200k", "a_session_rnn"
    r["catalogue/train_200k_vs_20k"] = _get(res, big, "train_events_per_s") / _get(
        res, small, "train_events_per_s"
    )
    # same process, interleaved: plain loop at 200k items over plain loop at 20k items
    r["catalogue/train_200k_vs_20k_plain_same_run"] = _get(res, big, "plain_vs_ref")
    r["catalogue/train_200k_vs_20k_normalised"] = _get(res, big, "ours_vs_ref") / _get(
        res, small, "ours_vs_ref"
    )
    r["catalogue/eval_200k_vs_20k"] = _get(res, big, "eval_events_per_s") / _get(
        res, small, "eval_events_per_s"
    )
    if big in res and small in res and "step_us" in res[big] and "step_us" in res[small]:
        r["catalogue/step_us_200k_over_20k"] = {
            k: res[big]["step_us"][k] / res[small]["step_us"][k]
            for k in res[small]["step_us"]
            if res[small]["step_us"][k] > 0
        }
    # the autograd engine over the manual step: across runs, and normalised by each
    # process's plain loop of the manual step (the same loop in both: cancels drift)
    for model in ("session_rnn", "hrnn_init"):
        auto, manual = f"a_{model}_autograd", f"a_{model}"
        r[f"a/{model}_autograd_vs_manual"] = _get(res, auto, "train_events_per_s") / _get(
            res, manual, "train_events_per_s"
        )
        # ours (autograd) over the plain loop of the manual step, paired in one process
        r[f"a/{model}_autograd_vs_plain_manual_same_run"] = 1 / (
            1 + _get(res, auto, "lightning_overhead")
        )
    r["a/hrnn_history_vs_hrnn_init"] = _get(res, "a_hrnn_history", "train_events_per_s") / _get(
        res, "a_hrnn_init", "train_events_per_s"
    )
    r["a/attention_hrnn_vs_hrnn_init_autograd"] = _get(
        res, "a_attention_hrnn", "train_events_per_s"
    ) / _get(res, "a_hrnn_init_autograd", "train_events_per_s")
    ev = res.get("a_events", {})
    r["events/linearity"] = ev.get("linearity", float("nan"))
    r["events/time_ratio"] = ev.get("time_ratio", float("nan"))
    r["events/events_ratio"] = ev.get("events_ratio", float("nan"))
    r["rss/xing_scale_max_mb"] = max(
        [_get(res, n, "peak_rss_mb") for n in res if n[0] in "bc" and "peak_rss_mb" in res[n]]
        or [float("nan")]
    )
    return r


def compute_targets(res: dict, ratios: dict) -> list[dict]:
    a = res.get("a_session_rnn", {})
    rows = [
        (
            "a session_rnn training events/s",
            _get(res, "a_session_rnn", "train_events_per_s"),
            ">=",
            60_000,
        ),
        (
            "a session_rnn bf16-mixed training events/s",
            _get(res, "a_session_rnn_bf16", "train_events_per_s"),
            ">=",
            60_000,
        ),
        (
            "a hrnn_init / session_rnn (normalised)",
            ratios["a/hrnn_vs_session_normalised"],
            ">=",
            0.8,
        ),
        ("a hrnn_init / session_rnn (raw)", ratios["a/hrnn_vs_session"], ">=", 0.8),
        (
            "a evaluation events/s (session_rnn)",
            _get(res, "a_session_rnn", "eval_events_per_s"),
            ">=",
            40_000,
        ),
        (
            "a evaluation events/s (hrnn_init)",
            _get(res, "a_hrnn_init", "eval_events_per_s"),
            ">=",
            40_000,
        ),
        ("a Lightning overhead vs plain loop", ratios["a/lightning_overhead"], "<=", 0.10),
        ("a Lightning overhead (CPU time)", ratios["a/lightning_overhead_cpu_time"], "<=", 0.10),
        (
            "a data loading share of step",
            a.get("step_share", {}).get("data", float("nan")),
            "<=",
            0.05,
        ),
        ("peak RSS at XING scale (MB)", ratios["rss/xing_scale_max_mb"], "<=", RSS_LIMIT_MB),
    ]
    out = []
    for label, value, op, target in rows:
        ok = (
            None
            if not math.isfinite(value)
            else (value >= target if op == ">=" else value <= target)
        )
        out.append({"target": label, "value": value, "op": op, "goal": target, "met": ok})
    return out


def _f(v, fmt: str = ",.0f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def format_report(result: dict) -> str:
    meta, res, ratios = result["meta"], result["configs"], result["ratios"]
    lines = [
        f"hrnn_lit bench: device {meta['device']}"
        f"{' (CUDA graph updates)' if meta.get('cuda_graph') else ''}, {meta['cpus']} CPUs, "
        f"torch threads "
        f"{meta['threads']}, medians of {meta['repeats']} repeats x {meta['epochs']} epochs "
        f"(warm-up {meta['warmup']} chunk), torch {meta['torch']}, lightning "
        f"{meta['lightning']}, native kernels "
        f"{'on' if meta.get('native_kernels') else 'off'}"
        f"{', QUICK sizes' if meta['quick'] else ''}",
        "",
        "train = ours (Lightning Trainer) events/s; plain = bare loop, same model; ovh = "
        "ours time / plain time - 1;",
        "eval = scored events/s of trainer.test (history replay included); R@20 = its "
        "recall@20 after the timed training; step = us per update of the plain loop by phase.",
        f"{'config':<19}{'items':>8}{'B':>4}{'H':>4}{'train':>8}{'plain':>8}{'ovh':>7}"
        f"{'eval':>8}{'R@20':>7}{'RSS MB':>8}{'ours':>8} | {'data':>6}{'fwd':>7}{'bwd':>7}"
        f"{'optim':>7}"
        f"{'other':>6}{'plain':>7}  us/step",
    ]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"{name:<19} ERROR: {r['error']}")
            continue
        st = r["setting"]
        if r["kind"] == "events":
            lines.append(
                f"{name:<19}{r['n_items']:>8,}{st['batch']:>4}{st['hidden']:>4}"
                f"{_f(r['train_events_per_s']):>8}{'':>8}{'':>7}{'':>8}"
                f"{_f(r['peak_rss_mb']):>8}   (full epochs, see below)"
            )
            continue
        us = r["step_us"]
        lines.append(
            f"{name:<19}{r['n_items']:>8,}{st['batch']:>4}{st['hidden']:>4}"
            f"{_f(r['train_events_per_s']):>8}{_f(r['plain_events_per_s']):>8}"
            f"{_f(100 * r['lightning_overhead'], '+.1f'):>6}%"
            f"{_f(r['eval_events_per_s']):>8}{_f(r.get('recall@20'), '.4f'):>7}"
            f"{_f(r['peak_rss_mb']):>8}{_f(r['ours_step_us']):>8} | "
            f"{_f(us['data']):>6}{_f(us['forward']):>7}"
            f"{_f(us['backward']):>7}{_f(us['optimiser']):>7}{_f(us['other']):>6}"
            f"{_f(us['total']):>7}"
        )
    lines.append("")
    lines.append(
        "step time shares (plain loop): "
        + "; ".join(
            f"{n} " + " ".join(f"{k} {100 * v:.0f}%" for k, v in r["step_share"].items())
            for n, r in res.items()
            if r.get("kind") == "train"
        )
    )
    lines.append(
        "CPU share of the process during timed training (1.0 = a whole core; less = "
        "preempted by other load): "
        + ", ".join(f"{n} {r['cpu_util']:.2f}" for n, r in res.items() if r.get("cpu_util"))
    )
    lines += [
        "",
        "ratios (same bench run; 'normalised' = each divided by its own process's "
        "plain session-RNN reference):",
    ]
    for k, v in ratios.items():
        if isinstance(v, dict):
            v = "  ".join(f"{p} x{x:.2f}" for p, x in v.items())
        elif "overhead" in k:
            v = f"{100 * v:+.1f}%" if math.isfinite(v) else "-"
        elif "mb" in k:
            v = _f(v, ",.0f") + " MB"
        else:
            v = _f(v, ".3f")
        lines.append(f"  {k:<44}{v}")
    ev = res.get("a_events")
    if ev and "sizes" in ev:
        lines.append("")
        lines.append("cost vs events (a_session_rnn, full epochs incl. the plan's tail):")
        for sz in ev["sizes"]:
            lines.append(
                f"  users x{sz['user_fraction']:<6} {sz['train_events_per_epoch']:>9,} events"
                f"  {sz['epoch_seconds']:>7.2f} s/epoch  {_f(sz['train_events_per_s']):>8} ev/s"
                f"  (plan fill {100 * sz['plan_fill']:.0f}%)"
            )
        lines.append(
            f"  events x{ev['events_ratio']:.2f} -> time x{ev['time_ratio']:.2f} "
            f"(linear: x{ev['events_ratio']:.2f})"
        )
    lines += ["", "targets (reported, not asserted):"]
    for t in result["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        val = t["value"]
        shown = _f(val, ".3f") if abs(val) < 10 else _f(val) if math.isfinite(val) else "-"
        lines.append(f"  {t['target']:<42}{shown:>10}  {t['op']} {t['goal']:<8} {mark}")
    return "\n".join(lines)


def _clean(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", help=f"subset of {', '.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs per config (medians)")
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs per run")
    ap.add_argument("--chunks", type=int, help="chunks per epoch (default: per config)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed chunks at the start")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="model.cuda_graph=true: each update one replay of a captured CUDA graph (ours "
        "and plain; needs --device cuda)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared 2-core machine intra-op threads "
        "of these small ops mostly wait on each other)",
    )
    ap.add_argument("--json", type=Path, default=Path("bench.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # worker: comma-separated configs
    args = ap.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        ap.error("--cuda-graph needs --device cuda")
    if args.quick:
        if "--repeats" not in (argv if argv is not None else sys.argv):
            args.repeats = 1
        if "--epochs" not in (argv if argv is not None else sys.argv):
            args.epochs = 1
    if args.one:
        names = args.one.split(",")
        out = worker(names, args)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0

    names = [n for c in args.configs or list(CONFIGS) for n in c.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    # one fresh process per config (isolated peak RSS); --quick packs them into one process
    groups = [names] if args.quick else [[n] for n in names]
    results: dict = {}
    for group in groups:
        results.update(run_child(group, args))
    results = {n: results[n] for n in names}
    import pytorch_lightning
    import torch

    from hrnn_lit.models import native

    ratios = compute_ratios(results)
    result = {
        "meta": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": args.device,
            "cuda_graph": args.cuda_graph,
            "cpus": len(os.sched_getaffinity(0)),
            "cpu_model": platform.processor() or platform.machine(),
            "threads": args.threads,
            "repeats": args.repeats,
            "epochs": args.epochs,
            "warmup": args.warmup,
            "quick": args.quick,
            "torch": torch.__version__,
            "lightning": pytorch_lightning.__version__,
            "native_kernels": native.load() is not None,
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
            "total_s": time.perf_counter() - t0,
        },
        "configs": results,
        "ratios": ratios,
    }
    result["targets"] = compute_targets(results, ratios)
    print(format_report(result))
    print(f"\nbench: {result['meta']['total_s']:.0f}s, results in {args.json}")
    args.json.write_text(json.dumps(_clean(result), indent=2) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
