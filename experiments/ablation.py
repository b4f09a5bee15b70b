"""The README's ablation of hrnn_history: each mechanism switched off in turn, on the
generated datasets, several seeds; and the control data where history carries no signal.

    python experiments/ablation.py [--data synthetic synthetic_xing] [--seeds 0 1 2]
        [--epochs 10] [--out reports/ablation] [--update-readme] [-- overrides ...]

Runs one Hydra multirun per variant (model=hrnn_history with the variant's overrides)
and, on ``data=synthetic_independent``, the control (session RNN, HRNN Init, hrnn_history,
user_pop), then writes the tables with model_table.pivot into docs/ablation.md and, with
--update-readme, the README block between the ablation markers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_table import (  # noqa: E402
    ROOT,
    command_line,
    load_results,
    pivot,
    prepare,
    publish,
)

VARIANTS = {  # name: overrides of model=hrnn_history
    "hrnn_history": [],
    "- repeat part (explore only)": ["model.net.repeat=false"],
    "- user GRU": ["model.net.user_propagation=none"],
    "decay=1 (no recency)": ["model.net.decay=1.0"],
    "lr 0.1 (HRNN's)": ["model.lr=0.1"],
}
CONTROL = ["session_rnn", "hrnn_init", "hrnn_history", "user_pop"]
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["synthetic", "synthetic_xing"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "ablation")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "ablation.md")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="reuse the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    seeds = f"seed={','.join(map(str, args.seeds))}"
    common = [f"trainer.max_epochs={args.epochs}", "logger=none", "callbacks=none", seeds]
    jobs = {
        f"v{i}": [f"data={','.join(args.data)}", "model=hrnn_history", *ov]
        for i, ov in enumerate(VARIANTS.values())
    }
    jobs["control"] = ["data=synthetic_independent", f"model={','.join(CONTROL)}"]
    if not args.no_run:
        prepare([*args.data, "synthetic_independent"], args.out, args.overrides)
        for name, ov in jobs.items():
            cmd = [sys.executable, "-m", "hrnn_lit", "-m", *ov, *common,
                   f"hydra.sweep.dir={args.out / name}", *args.overrides]  # fmt: skip
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
    names = list(VARIANTS)
    runs = [(n, r) for i, n in enumerate(names) for r in load_results([args.out / f"v{i}"])]
    table = pivot(runs, args.data, names)
    ctrl = [(r["model"], r) for r in load_results([args.out / "control"])]
    control = pivot(ctrl, ["synthetic_independent"], CONTROL)
    command = command_line("experiments/ablation.py", ap, args)
    about = (
        f"One change per row ({args.epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}, then the control `data=synthetic_independent` "
        f"(every session an independent draw)"
    )
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(
        f"# hrnn_history ablation\n\n{about}). `{command}`\n\n{table}\n\n{control}\n"
    )
    head = about.split(", then")[0].replace("One", "one", 1)
    short = f"`{command}`: {head}; control: [docs/ablation.md](docs/ablation.md))."
    publish(f"{short}\n\n{table}", START, END, args.update_readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
