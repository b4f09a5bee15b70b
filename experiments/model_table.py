"""The model table: every model on the generated datasets, several seeds, mean ± std.

    python experiments/model_table.py [--data synthetic synthetic_xing synthetic_independent
        synthetic_ratings] [--models pop user_pop ...] [--seeds 0 1 2] [--epochs 10]
        [--out reports/model_table] [--update-readme] [-- overrides ...]

Prepares each dataset once, runs one Hydra multirun (data x models x seeds, each model's
defaults with ``trainer.max_epochs=--epochs``, no logger) through the real CLI, then builds
the tables from the runs' results.json files: in ``--doc`` (docs/model_table.md) one table
per dataset (recall and MRR at 5 and 20, recall@5 on repeat and explore targets, the ratio
to the best baseline, training time) under that dataset's share of repeat targets; with
--update-readme a compact one (recall@5 per dataset and its ratio) in the README block
between the model-table markers. experiments/compare.py writes the breakdowns and plots
into --out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (  # noqa: E402
    MODEL_ORDER,
    compare,
    find_results,
    group_runs,
    grouping_keys,
    load_run,
    mean_std,
)

ROOT = Path(__file__).resolve().parents[1]

# every model config, the paper's models first, then the others in this order
LATER = ["gru4rec_xe", "gru4rec_bprmax", "attention_hrnn", "hrnn_history"]
ORDER = MODEL_ORDER + LATER
MODELS = sorted(
    (p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")),
    key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m),
)
DATASETS = ["synthetic", "synthetic_xing", "synthetic_independent", "synthetic_ratings"]
BASELINES = ["pop", "user_pop", "item_knn", "vsknn"]  # the ratio's denominator: the best one
METRICS = ["test/recall@5", "test/mrr@5", "test/recall@20", "test/mrr@20", "perf/train_seconds"]
RECALL = "test/recall@5"
COLUMNS = [("R@5", RECALL), ("MRR@5", "test/mrr@5"), ("R@20", "test/recall@20"),
           ("MRR@20", "test/mrr@20")]  # fmt: skip
NA = "n/a"  # a split without test events: its recall would read 0
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"

Cells = dict[tuple[str, str], list[dict]]  # (data, model) -> the runs' results


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


# ---------------------------------------------------------------- the model table


def cells_of(results: list[dict]) -> Cells:
    cells: Cells = {}
    for r in results:
        cells.setdefault((r["data"], r["model"]), []).append(r)
    return cells


def _mean(rs: list[dict], metric: str) -> float | None:
    xs = [float(r[metric]) for r in rs if metric in r]
    return sum(xs) / len(xs) if xs else None


def cell(rs: list[dict], metric: str, digits: int = 4) -> str:
    """Mean ± sample std over the runs that have the metric ((n=...) when not all do)."""
    xs = [float(r[metric]) for r in rs if metric in r]
    if not xs:
        return "–"
    mean, std = mean_std(xs)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(xs) == len(rs) else f"{text} (n={len(xs)})"


def split_cell(rs: list[dict], part: str) -> str:
    """Recall@5 on the repeat or explore targets (``part``): n/a when the test has none of
    them, – when the results predate the split."""
    key = f"test_{part}/n_events"
    if not any(key in r for r in rs):
        return "–"
    hit = [r for r in rs if float(r.get(key, 0.0)) > 0]
    return cell(hit, f"test_{part}/recall@5") if hit else NA


def best_baseline(cells: Cells, data: str) -> tuple[str, float] | None:
    """The baseline with the highest mean recall@5 on ``data`` (None without one)."""
    means = {m: _mean(cells[(data, m)], RECALL) for m in BASELINES if (data, m) in cells}
    means = {m: v for m, v in means.items() if v is not None}
    if not means:
        return None
    name = max(means, key=lambda m: means[m])
    return name, means[name]


def ratio(rs: list[dict], best: tuple[str, float] | None) -> float | None:
    """The runs' mean recall@5 over the best baseline's (ratio of means)."""
    mean = _mean(rs, RECALL)
    return None if mean is None or best is None or best[1] <= 0 else mean / best[1]


def repeat_line(rs: list[dict]) -> str:
    """The dataset's share of repeat targets among its test events, from its runs."""
    pairs = {(float(r["test_repeat/n_events"]), float(r["test/n_events"])) for r in rs
             if "test_repeat/n_events" in r and r.get("test/n_events")}  # fmt: skip
    if not pairs:
        return "Repeat targets: not in these results (runs from before the repeat/explore split)."
    if len(pairs) > 1:
        shares = sorted(a / n for a, n in pairs)
        lo, hi = f"{shares[0]:.1%}", f"{shares[-1]:.1%}"
        return f"Repeat targets: {lo} to {hi} of the test events (the runs differ)."
    repeats, n = pairs.pop()
    if repeats == 0:
        return (f"Repeat targets: none of the {n:,.0f} test events (every target is new to its "
                f"user), so repeat R@5 is {NA}.")  # fmt: skip
    return f"Repeat targets: {repeats / n:.1%} of the test events ({repeats:,.0f} of {n:,.0f})."


def dataset_section(cells: Cells, data: str, models: list[str]) -> str:
    """One dataset's heading, repeat share, best baseline and table."""
    runs = [r for (d, _), rs in cells.items() if d == data for r in rs]
    if not runs:
        return f"## {data}\n\nNo runs."
    best = best_baseline(cells, data)
    top = f"best baseline: {best[0]} (R@5 {best[1]:.4f})." if best else "no baseline runs."
    head = ["model", "n", *(h for h, _ in COLUMNS), "repeat R@5", "explore R@5",
            "× best baseline", "fit s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|--:|" + "--:|" * (len(head) - 2)]
    for model in models:
        rs = cells.get((data, model))
        if not rs:
            continue
        x = ratio(rs, best)
        row = [model, str(len(rs)), *(cell(rs, key) for _, key in COLUMNS),
               split_cell(rs, "repeat"), split_cell(rs, "explore"),
               "–" if x is None else f"{x:.2f}×", cell(rs, "perf/train_seconds", 2)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return f"## {data}\n\n{repeat_line(runs)} The {top}\n\n" + "\n".join(lines)


def doc_text(results: list[dict], datasets: list[str], models: list[str], about: str) -> str:
    """docs/model_table.md: the command and legend, then one section per dataset."""
    cells = cells_of(results)
    ties = sorted({str(r.get("eval/ties", "?")) for r in results})
    legend = (
        f"{len(results)} runs. Mean ± sample std (n - 1) over the n runs (seeds) of each row. "
        "repeat / explore R@5: recall@5 on the targets the user had before / had not "
        "(docs/design.md §6), n/a where the test has no such target; × best baseline: the "
        f"row's mean R@5 over that of the best of {', '.join(BASELINES)} on the dataset. "
        f"Ties: {', '.join(ties)}."
    )
    sections = [dataset_section(cells, d, models) for d in datasets]
    return "\n\n".join(["# Model table", about, legend, *sections]) + "\n"


def readme_table(results: list[dict], datasets: list[str], models: list[str]) -> str:
    """The README's compact table: per dataset the mean recall@5 and, in brackets, its
    ratio to the best baseline (no std: the doc has it); then the mean fit seconds over the
    row's runs."""
    cells = cells_of(results)
    best = {d: best_baseline(cells, d) for d in datasets}
    lines = ["| model | " + " | ".join(datasets) + " | fit s |",
             "|---|" + "--:|" * (len(datasets) + 1)]  # fmt: skip
    for model in models:
        got = [cells.get((d, model), []) for d in datasets]
        if not any(got):
            continue
        vals = []
        for d, rs in zip(datasets, got):
            mean, x = _mean(rs, RECALL), ratio(rs, best[d])
            text = "–" if mean is None else f"{mean:.3f}"
            vals.append(text if x is None else f"{text} ({x:.2f})")
        fit = _mean([r for rs in got for r in rs], "perf/train_seconds")
        vals.append("–" if fit is None else f"{fit:.1f}")
        lines.append(f"| {model} | {' | '.join(vals)} |")
    return "\n".join(lines)


def row_models(results: list[dict]) -> list[str]:
    """The tables' rows: the configured models in ORDER, then any other run's model."""
    return MODELS + sorted({r["model"] for r in results} - set(MODELS))


def readme_text(
    command: str, epochs: int, seeds: list[int], results: list[dict], datasets: list[str]
) -> str:
    """The README block's text: what was run, then readme_table."""
    short = (
        f"`{command}`: recall@5 (in brackets: over the best of {', '.join(BASELINES)}), "
        f"mean over seeds {', '.join(map(str, seeds))}, RNNs {epochs} epochs; fit s: training "
        "seconds, 2 shared cores. Std, MRR, @20, repeat/explore: "
        "[docs/model_table.md](docs/model_table.md)."
    )
    return f"{short}\n\n{readme_table(results, datasets, row_models(results))}"


def check_rows(sweeps: list[Path]) -> None:
    """One configuration per (data, model): runs that differ in a setting cannot share a row."""
    runs = [load_run(p) for p in find_results(sweeps)]
    keys = grouping_keys(runs, [], [])
    pairs = [g[:2] for g in group_runs(runs, keys)]
    mixed = sorted({f"{d}/{m}" for d, m in pairs if pairs.count((d, m)) > 1})
    if mixed:
        raise SystemExit(f"--out: the runs of {', '.join(mixed)} differ in {', '.join(keys)}; "
                         "compare them with experiments/compare.py")  # fmt: skip


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


def publish(text: str, start: str, end: str, update_readme: bool,
            readme: Path = ROOT / "README.md") -> None:  # fmt: skip
    """Print the README block between the markers start and end; with update_readme,
    replace the block of ``readme`` by it (the rest of the file unchanged)."""
    block = f"{start}\n{text}\n{end}"
    print(block)
    if not update_readme:
        return
    old = readme.read_text()
    if old.count(start) != 1 or end not in old.split(start, 1)[1]:
        raise SystemExit(f"{readme} has no single {start} ... {end} block")
    head, rest = old.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])
    print(f"updated {readme}")


def _known(values: list[str], group: str, flag: str) -> None:
    """A one-line error naming the flag for a name that conf/<group> lacks."""
    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    unknown = [v for v in values if v not in options]
    if unknown:
        raise SystemExit(
            f"{flag}: unknown {', '.join(unknown)} (conf/{group}: {', '.join(options)})"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--data", nargs="+", default=DATASETS)
    ap.add_argument("--epochs", type=int, default=10, help="trainer.max_epochs of the RNNs")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "model_table.md")
    ap.add_argument("--sweep", default="runs", help="this multirun's folder under --out")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "model_table")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    ap.add_argument("--no-run", action="store_true", help="reuse the runs already in --out")
    ap.add_argument("--no-plots", action="store_true", help="no breakdown plots in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    _known(args.models, "model", "--models")
    _known(args.data, "data", "--data")

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
    check_rows(sweeps)
    compare(sweeps, args.out, metrics=METRICS, k=5, plots=not args.no_plots)
    results = load_results(sweeps)
    command = command_line("experiments/model_table.py", ap, args)
    where = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    seeds = ", ".join(map(str, args.seeds))
    about = (
        f"`{command}`: each model's defaults, RNNs {args.epochs} epochs, seeds {seeds}; fit "
        f"s: training seconds on 2 shared cores. Runs: `{where}/`."
    )
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(doc_text(results, args.data, row_models(results), about))
    print(f"wrote {args.doc}")
    text = readme_text(command, args.epochs, args.seeds, results, args.data)
    publish(text, START, END, args.update_readme, args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
