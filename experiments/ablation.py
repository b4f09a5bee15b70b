"""The README's ablation of hrnn_history: each mechanism switched off in turn, on the
generated datasets, several seeds, next to the baselines; and the control data where
history carries no signal (independent sessions) or there are no repeats (a rating log).

    python experiments/ablation.py [--data synthetic synthetic_xing] [--seeds 0 1 2]
        [--epochs 10] [--variants KEY ...] [--out reports/ablation] [--update-readme]
        [-- overrides ...]

Runs one Hydra multirun per variant (model=hrnn_history with the variant's overrides), one
of the baselines on the same data, and one of the control models on the control data, then
writes the tables with model_table.pivot into docs/ablation.md and, with --update-readme, a
compact recall@5 table of every dataset into the README block between the ablation markers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_table import (  # noqa: E402
    ROOT,
    _mean_std,
    command_line,
    load_results,
    pivot,
    prepare,
    publish,
)

RECIPE_OFF = ["model.net.constrained_embedding=false", "model.net.dropout_embed=0.0",
              "model.net.dropout_hidden=0.0", "model.logq=0.0"]  # fmt: skip
VARIANTS = {  # key: (row name, overrides of model=hrnn_history)
    "default": ("hrnn_history", []),
    "repeat": ("- repeat part (explore only)", ["model.net.repeat=false"]),
    "user_features": ("- user features in the gate", ["model.net.user_features=false"]),
    "recipe": ("- GRU4Rec recipe in explore", RECIPE_OFF),
    "event_decay": ("- event recency", ["model.net.event_decay=0.0"]),
    "item_bias": ("- item repeat bias", ["model.net.item_bias=false"]),
    "mode_bias": ("mode_bias null (init 0)", ["model.net.mode_bias=null"]),
    "user_gru": ("- user GRU", ["model.net.user_propagation=none"]),
    "decay": ("decay=1 (no session recency)", ["model.net.decay=1.0"]),
}
BASELINES = ["user_pop", "item_knn", "gru4rec_xe"]
CONTROL = ["session_rnn", "hrnn_init", "gru4rec_xe", "item_knn", "user_pop", "hrnn_history"]
CONTROL_DATA = ["synthetic_independent", "synthetic_ratings"]
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"
KEPT = "## How the defaults were chosen"  # docs/ablation.md from here on is kept as it is


def compact(runs: list[tuple[str, dict]], datasets: list[str], rows: list[str]) -> str:
    """Recall@5 (mean ± std over seeds) per row and dataset; - where a row has no runs."""
    cells: dict[tuple[str, str], list[float]] = {}
    for label, r in runs:
        cells.setdefault((label, r["data"]), []).append(r["test/recall@5"])
    lines = [f"| R@5 | {' | '.join(datasets)} |", "|---|" + "--:|" * len(datasets)]
    for name in rows:
        got = [cells.get((name, d)) for d in datasets]
        if any(got):
            vals = " | ".join(_mean_std(g, 3) if g else "-" for g in got)
            lines.append(f"| {name} | {vals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["synthetic", "synthetic_xing"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "ablation")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "ablation.md")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="reuse the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    seeds = f"seed={','.join(map(str, args.seeds))}"
    common = [f"trainer.max_epochs={args.epochs}", "logger=none", "callbacks=none", seeds]
    data = f"data={','.join(args.data)}"
    jobs = {f"v_{k}": [data, "model=hrnn_history", *VARIANTS[k][1]] for k in args.variants}
    jobs["baselines"] = [data, f"model={','.join(BASELINES)}"]
    jobs["control"] = [f"data={','.join(CONTROL_DATA)}", f"model={','.join(CONTROL)}"]
    if not args.no_run:
        prepare([*args.data, *CONTROL_DATA], args.out, args.overrides)
        for name, ov in jobs.items():
            cmd = [sys.executable, "-m", "hrnn_lit", "-m", *ov, *common,
                   f"hydra.sweep.dir={args.out / name}", *args.overrides]  # fmt: skip
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
    names = [VARIANTS[k][0] for k in args.variants]
    runs = [(VARIANTS[k][0], r) for k in args.variants for r in load_results([args.out / f"v_{k}"])]
    runs += [(r["model"], r) for r in load_results([args.out / "baselines"])]
    table = pivot(runs, args.data, names + BASELINES)
    ctrl = [(r["model"], r) for r in load_results([args.out / "control"])]
    control = pivot(ctrl, CONTROL_DATA, CONTROL)
    command = command_line("experiments/ablation.py", ap, args)
    if args.variants != list(VARIANTS):
        script = "experiments/ablation.py"
        command = command.replace(script, f"{script} --variants {' '.join(args.variants)}", 1)
    about = (
        f"One change per row ({args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}), "
        f"then the baselines; then the control data: `synthetic_independent` (every session "
        f"an independent draw) and `synthetic_ratings` (each user has an item once: no repeats)"
    )
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    old = args.doc.read_text() if args.doc.exists() else ""
    kept = old[old.index(KEPT) :] if KEPT in old else ""  # the hand-written selection
    args.doc.write_text(
        f"# hrnn_history ablation\n\n{about}. `{command}`\n\n{table}\n\n{control}\n"
        + (f"\n{kept}" if kept else "")
    )
    every = [*args.data, *CONTROL_DATA]
    short = (
        f"`{command}`: test recall@5, {args.epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}; baselines: the model table above; MRR, fit "
        "times: [docs/ablation.md](docs/ablation.md)."
    )
    publish(f"{short}\n\n{compact([*runs, *ctrl], every, names)}", START, END,
            args.update_readme)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
