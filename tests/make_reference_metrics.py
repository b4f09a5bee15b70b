"""Reference one-epoch results of every built-in variant x loss and of the GRU4Rec options,
in float64. tests/data/reference_metrics.json was recorded at revision 9610a17 with the
hand-written engine that the one training path replaced (its ``engine``: ``manual``);
tests/test_reference_metrics.py checks that the one path reproduces them to rounding.
Regenerating now records the one path (``model.engine=auto``), and ``--check`` compares it
with the plain reference (``model.engine=autograd``).

Regenerate (only when a change of the results is intended, and say why in the commit)::

    python -m tests.make_reference_metrics            # writes tests/data/reference_metrics.json
    python -m tests.make_reference_metrics --check    # also trains each case with
                                                      # model.engine=autograd (the plain
                                                      # reference) and records the largest
                                                      # relative difference

Each case is one run of ``hrnn_lit.run.run`` on the default synthetic data at the sizes of
tests/conftest.py (TINY), ``trainer.precision=64-true``, one thread, seed 0, through the
CLI's config groups (so the presets conf/model/gru4rec_*.yaml are what is recorded). A run
records the validation and test metrics of results.json, the epoch's mean training loss and
the sum of squares of the trained weights (both continuous, unlike the rank metrics).
Dropout cases are marked: the one path reproduces them only if it draws the same masks in
the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from hrnn_lit.run import run
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "reference_metrics.json"

VARIANTS = ("session_rnn", "rnn_concat", "hrnn_init", "hrnn_all", "hrnn_init_output")
LOSSES = ("top1", "cross-entropy", "bpr", "top1-max", "bpr-max")
NO_DROPOUT = ["model.dropout_user=0.0", "model.dropout_init=0.0"]  # the HRNN defaults are 0.1

CASES: dict[str, list[str]] = {}
for _v in VARIANTS:  # in-batch negatives; the HRNN variants with their default dropouts
    for _loss in LOSSES:
        CASES[f"{_v}-{_loss}"] = [f"model={_v}", f"model.loss={_loss}"]
CASES.update({
    # extra negatives by popularity^sample_alpha
    "session_rnn-cross-entropy-sampled": ["model=session_rnn", "model.loss=cross-entropy",
                                          "model.n_sample=32"],
    "hrnn_init-bpr-max-sampled": ["model=hrnn_init", "model.loss=bpr-max", "model.n_sample=32",
                                  "model.sample_alpha=0.75", "model.bpreg=0.5", *NO_DROPOUT],
    "hrnn_all-top1-max-sampled": ["model=hrnn_all", "model.loss=top1-max", "model.n_sample=16"],
    "rnn_concat-bpr-sampled": ["model=rnn_concat", "model.loss=bpr", "model.n_sample=16"],
    # the official GRU4Rec recipes as shipped (tied embedding, logQ, dropouts, momentum, elu)
    "gru4rec_xe": ["model=gru4rec_xe", "model.n_sample=64"],
    "gru4rec_bprmax": ["model=gru4rec_bprmax", "model.n_sample=64"],
    # each GRU4Rec option once more, on other variants and losses
    "session_rnn-embedding-tanh": ["model=session_rnn", "model.embedding=12",
                                   "model.final_act=tanh", "model.dropout_embed=0.2"],
    "hrnn_init-logq-embedding": ["model=hrnn_init", "model.loss=cross-entropy",
                                 "model.n_sample=32", "model.logq=0.5", "model.embedding=12",
                                 *NO_DROPOUT],
    "hrnn_init_output-tied-elu": ["model=hrnn_init_output", "model.loss=bpr-max",
                                  "model.constrained_embedding=true", "model.final_act=elu-0.5",
                                  "model.dropout_hidden=0.2", "model.momentum=0.3",
                                  "model.bpreg=0.5"],
    "hrnn_all-output-leaky-logq": ["model=hrnn_all", "model.user_to_output=true",
                                   "model.loss=cross-entropy", "model.final_act=leaky-0.1",
                                   "model.logq=1.0", *NO_DROPOUT],
    "session_rnn-selu-dropouts": ["model=session_rnn", "model.loss=top1-max",
                                  "model.final_act=selu-1.05-1.67", "model.dropout_embed=0.1",
                                  "model.dropout_hidden=0.1", "model.dropout_session=0.1"],
    "rnn_concat-relu-momentum": ["model=rnn_concat", "model.loss=bpr", "model.final_act=relu",
                                 "model.momentum=0.5"],
    "hrnn_init-relu-init-act": ["model=hrnn_init", "model.user_to_session_act=relu",
                                "model.dropout_session=0.2"],
    # the other training options
    "hrnn_init-adam-decay-clip": ["model=hrnn_init", "model.loss=cross-entropy",
                                  "model.optimizer=adam", "model.lr=0.01",
                                  "model.weight_decay=0.001", "model.clip_grad_norm=1.0",
                                  *NO_DROPOUT],
    "session_rnn-adagrad-decay-clip": ["model=session_rnn", "model.weight_decay=0.001",
                                       "model.clip_grad_norm=0.5", "model.n_sample=16"],
})  # fmt: skip


class Record(pl.Callback):
    """Writes the epoch's mean training loss and the sum of squares of the trained weights
    (continuous quantities, next to the rank metrics) to ``path`` when fitting ends."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        weights = sum(float(p.detach().double().pow(2).sum()) for p in pl_module.parameters())
        Path(self.path).write_text(json.dumps({
            "train/loss_epoch": None if loss is None else float(loss),
            "weights/sum_sq": weights,
        }))  # fmt: skip


def has_dropout(cfg) -> bool:
    """Whether the case draws dropout masks (recorded: the draws' order must be kept)."""
    keys = ("dropout_embed", "dropout_hidden", "dropout_session", "dropout_user", "dropout_init")
    m = cfg.model
    hierarchical = m.get("user_propagation", "none") != "none"
    return any(
        float(m.get(k, 0.0)) > 0 and (hierarchical or k not in ("dropout_user", "dropout_init"))
        for k in keys
    )


def run_case(name: str, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One epoch of case ``name`` in float64 (``extra``: further overrides, e.g. the engine):
    its metrics, training loss and weight digest."""
    overrides = [*CASES[name], "logger=none", "callbacks=none", "trainer.precision=64-true",
                 "num_threads=1", "seed=0", *extra]  # fmt: skip
    cfg = compose_cfg(overrides, out)
    with open_dict(cfg):
        cfg.callbacks = {"reference": {"_target_": f"{__name__}.Record",
                                       "path": str(out / "reference.json")}}  # fmt: skip
    results = run(cfg)
    got = {
        k: float(v)
        for k, v in results.items()
        if k.split("/")[0] in ("val", "test") and isinstance(v, (int, float))
    }
    got.update(json.loads((out / "reference.json").read_text()))
    return {"overrides": CASES[name], "engine": results.get("engine"),
            "dropout": has_dropout(cfg), "metrics": got}  # fmt: skip


def rel_diff(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300) if a != b else 0.0


def _git_revision() -> dict:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    return {"revision": rev.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="also train every case with model.engine=autograd (the plain "
                   "reference) and record the largest relative difference")  # fmt: skip
    p.add_argument("--out", type=Path, default=REFERENCE)
    args = p.parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch"):  # one line per case, not ten
        logging.getLogger(name).setLevel(logging.ERROR)
    cases = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for i, name in enumerate(CASES):
            case = run_case(name, Path(tmp) / f"{i}", ("model.engine=auto",))
            if args.check:
                auto = run_case(name, Path(tmp) / f"{i}a", ("model.engine=autograd",))
                m, a = case["metrics"], auto["metrics"]
                keys = m.keys() | a.keys()
                case["autograd_max_rel_diff"] = max(rel_diff(m.get(k), a.get(k)) for k in keys)
            cases[name] = case
            print(f"{name}: {case['metrics'].get('test/recall@5'):.4f} recall@5"
                  + (f", autograd max rel diff {case['autograd_max_rel_diff']:.2e}"
                     if args.check else ""), file=sys.stderr)  # fmt: skip
    record = {
        "about": "one-epoch float64 results of model.engine=auto (the one training path); "
        "written by python -m tests.make_reference_metrics",
        "engine": "auto",
        "torch": torch.__version__,
        "git": _git_revision(),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(cases)} cases: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
