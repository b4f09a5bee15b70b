"""The model table: every model on the generated datasets, several seeds, mean ± std.

    python experiments/model_table.py [--data synthetic synthetic_xing] [--seeds 0 1 2]
        [--epochs 10] [--out reports/model_table] [--update-readme] [-- overrides ...]

Prepares each dataset once, runs one Hydra multirun (data x models x seeds, each model's
defaults with ``trainer.max_epochs=--epochs``, no logger) through the real CLI, then builds
the tables from the runs' results.json files with experiments/compare.py: the full one
(with training time) in ``--doc`` (docs/model_table.md), and with --update-readme a short
one in the README block between the model-table markers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import MODEL_ORDER, compare, find_results, load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# every model config, the paper's models first, then the others in this order
LATER = ["gru4rec_xe", "gru4rec_bprmax", "attention_hrnn", "hrnn_history"]
ORDER = MODEL_ORDER + LATER
MODELS = sorted(
    (p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")),
    key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m),
)
METRICS = ["test/recall@5", "test/mrr@5", "test/recall@20", "test/mrr@20", "perf/train_seconds"]
README_METRICS = ["test/recall@5", "test/mrr@5", "perf/train_seconds"]
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def _mean_std(xs: list[float], digits: int) -> str:
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def load_results(sweeps: list[Path]) -> list[dict]:
    return [load_run(p)["results"] for p in find_results(sweeps)]


def pivot(runs: list[tuple[str, dict]], datasets: list[str], rows: list[str]) -> str:
    """A compact table of labelled runs (label, results.json): one row per label in
    ``rows``, per dataset the mean ± std over seeds of recall@5 and MRR@5, then the mean
    fit time over the row's runs."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for label, r in runs:
        cells.setdefault((label, r["data"]), []).append(r)
    head = " | ".join(f"{d} R@5 | {d} MRR@5" for d in datasets)
    lines = [f"| model | {head} | fit s |", "|---|" + "--:|" * (2 * len(datasets) + 1)]
    for name in rows:
        got = [cells.get((name, d), []) for d in datasets]
        if not any(got):
            continue
        vals = []
        for rs in got:
            for m in ("test/recall@5", "test/mrr@5"):
                vals.append(_mean_std([r[m] for r in rs], 3) if rs else "-")
        secs = [r["perf/train_seconds"] for rs in got for r in rs if "perf/train_seconds" in r]
        fit = f"{sum(secs) / len(secs):.1f}" if secs else "-"
        lines.append(f"| {name} | {' | '.join(vals)} | {fit} |")
    return "\n".join(lines)


def prepare(datasets: list[str], out: Path, overrides: list[str]) -> None:
    """Generate / preprocess each dataset once, before parallel jobs read its cache."""
    for data in datasets:
        keep = [o for o in overrides if o.startswith(("data.", "paths."))]
        cmd = [sys.executable, "-m", "hrnn_lit", f"data={data}", "mode=prepare",
               f"hydra.run.dir={out / 'prepare' / data}", *keep]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def command_line(script: str, ap: argparse.ArgumentParser, args) -> str:
    """The command that reproduces a table: its non-default --data/--seeds/--epochs and
    its Hydra overrides."""
    defaults = ap.parse_args([])
    shown = [f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in (("data", args.data), ("seeds", args.seeds), ("epochs", args.epochs))
             if v != getattr(defaults, k)]  # fmt: skip
    tail = ["--", *args.overrides] if args.overrides else []
    return " ".join(["python", script, *shown, *tail])


def publish(text: str, start: str, end: str, update_readme: bool) -> None:
    """Print the README block between the markers start and end; with update_readme,
    replace the README's block by it."""
    block = f"{start}\n{text}\n{end}"
    print(block)
    if not update_readme:
        return
    readme = ROOT / "README.md"
    old = readme.read_text()
    if start not in old or end not in old:
        raise SystemExit(f"{readme} has no {start} ... {end} block")
    head, rest = old.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])
    print(f"updated {readme}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--data", nargs="+", default=["synthetic", "synthetic_xing"])
    ap.add_argument("--epochs", type=int, default=10, help="trainer.max_epochs of the RNNs")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "model_table.md")
    ap.add_argument("--sweep", default="runs", help="this multirun's folder under --out")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "model_table")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="reuse the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)

    # every multirun under --out counts (--sweep: add models to an earlier table's runs)
    sweep = args.out / args.sweep
    cmd = [
        sys.executable, "-m", "hrnn_lit", "-m", f"data={','.join(args.data)}",
        f"model={','.join(args.models)}", f"seed={','.join(map(str, args.seeds))}",
        f"trainer.max_epochs={args.epochs}", "logger=none", "callbacks=none",
        f"hydra.sweep.dir={sweep}", *args.overrides,
    ]  # fmt: skip
    if not args.no_run:
        prepare(args.data, args.out, args.overrides)
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    sweeps = sorted(args.out.glob("runs*"))
    table = compare(sweeps, args.out, metrics=METRICS, k=5)
    command = command_line("experiments/model_table.py", ap, args)
    where = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    data = ", ".join(f"`data={d}`" for d in args.data)
    about = (
        f"`{command}`: each model's defaults, RNNs {args.epochs} epochs, on {data}, mean ± "
        f"std over seeds {', '.join(map(str, args.seeds))}; fit s: training seconds on 2 "
        f"shared cores."
    )
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(f"# Model table\n\n{about} Runs: `{where}/`.\n\n{table}\n")
    short = pivot([(r["model"], r) for r in load_results(sweeps)], args.data, MODELS)
    more = "@20: [docs/model_table.md](docs/model_table.md)."
    print(f"wrote {args.doc}")
    publish(f"{about} {more}\n\n{short}", START, END, args.update_readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
