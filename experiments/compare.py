"""Paper-style comparison of finished runs: a markdown table of mean ± std over seeds, and
Recall@K by position in session and by user history length (plots, PDF and PNG).

    python experiments/compare.py logs/train/multiruns/<date>_<time> --out DIR \
        [--metrics test/recall@5 test/mrr@5 ...] [--k 5] [--by KEY ...] [--ignore KEY ...]

Inputs are directories (searched recursively for results.json) or results.json files. Runs
are grouped by (data, model) and by every other config key whose value differs between the
runs: the keys come from the command-line overrides in each run's `.hydra/overrides.yaml`,
their values from the run's composed config (`.hydra/config.yaml`, or the chosen option in
`.hydra/hydra.yaml` for a config group), so an override that repeats a default does not split
a group. `seed`, output, logging and `hydra.*` settings never split groups. Rows are mean ±
sample standard deviation (n - 1; 0 for a single run) over the runs of a group; `n` is the
number of runs (seeds) behind each row.

Writes DIR/comparison.md (the table, the repeat/explore table where the runs have its
metrics, then the two breakdown tables), DIR/by_position.pdf
and .png and DIR/by_history.pdf and .png (300 dpi), and prints the table. Built from
results.json files only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

DEFAULT_METRICS = ["test/recall@5", "test/mrr@5", "test/recall@20", "test/mrr@20"]
# Override keys that never split a group: these keys themselves (`model`, `data`: the name is
# in results.json) ...
NEVER_GROUP_KEYS = {
    "seed",
    "model",
    "data",
    "task_name",
    "optimized_metric",
    "hparams_search",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
}
# ... and these with everything under them (`hydra.sweep.dir`, `hydra/launcher`, `logger.csv...`).
NEVER_GROUP_PREFIXES = ["hydra", "paths", "logger", "callbacks"]
# Models in the paper's order; others follow alphabetically.
MODEL_ORDER = [
    "pop",
    "user_pop",
    "item_knn",
    "vsknn",
    "session_rnn",
    "rnn_concat",
    "hrnn_init",
    "hrnn_init_output",
    "hrnn_all",
]
POSITION_CAP = 10  # test_by_position/10 means position 10 and beyond


class CompareError(Exception):
    """A problem with the inputs, reported as one line."""


# ---------------------------------------------------------------- reading runs


def find_results(paths: list[str | Path]) -> list[Path]:
    """results.json files: the given files, and every one below the given directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise CompareError(f"{p}: no such file or directory")
    unique = list(dict.fromkeys(f.resolve() for f in found))
    if not unique:
        raise CompareError(f"no results.json under {', '.join(map(str, paths))}")
    return unique


def _split_override(text: str) -> tuple[str, str] | None:
    """'+model.lr=0.1' -> ('model.lr', '0.1'); '~key' -> ('key', '<deleted>')."""
    text = str(text).strip()
    if text.startswith("~"):
        return text.lstrip("~").split("=", 1)[0], "<deleted>"
    if "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+"), value


def _never_groups(key: str, ignore: list[str]) -> bool:
    if key in NEVER_GROUP_KEYS or key in ignore:
        return True
    return any(
        key == p or key.startswith(p + ".") or key.startswith(p + "/")
        for p in NEVER_GROUP_PREFIXES + list(ignore)
    )


def _load_yaml(path: Path):
    if not path.is_file():
        return None
    with path.open() as f:
        return yaml.safe_load(f)


def _select(tree, key: str):
    """A dotted key's value in a nested dict (None when absent)."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(value)
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)


def load_run(path: Path) -> dict:
    """One run: its results, and its overrides / config / group choices when present."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: not a readable results.json ({e})") from e
    if not isinstance(results, dict):
        raise CompareError(f"{path}: results.json is not a JSON object")
    hydra_dir = path.parent / ".hydra"
    overrides = {}
    for item in _load_yaml(hydra_dir / "overrides.yaml") or []:
        kv = _split_override(item)
        if kv:
            overrides[kv[0]] = kv[1]
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml") or {}
    choices = _select(hydra_cfg, "hydra.runtime.choices") or {}
    return {
        "path": path,
        "results": results,
        "overrides": overrides,
        "config": _load_yaml(hydra_dir / "config.yaml"),
        "choices": choices,
    }


def setting(run: dict, key: str) -> str:
    """The value of a config key (or config group) in a run, as text ('' when unset)."""
    if key in run["results"]:
        return _text(run["results"][key])
    if key in run["choices"]:
        return _text(run["choices"][key])
    if run["config"] is not None and "/" not in key:
        value = _select(run["config"], key)
        if value is not None:
            return _text(value)
    return run["overrides"].get(key, "")


def grouping_keys(runs: list[dict], by: list[str], ignore: list[str]) -> list[str]:
    """Config keys besides (data, model) that tell the groups apart."""
    keys = []
    candidates = sorted({k for r in runs for k in r["overrides"]})
    for key in candidates:
        if _never_groups(key, ignore):
            continue
        if len({setting(r, key) for r in runs}) > 1:
            keys.append(key)
    if len({_text(r["results"].get("eval/ties")) for r in runs}) > 1 and "eval.ties" not in keys:
        keys.append("eval/ties")
    for key in by:
        if key not in keys:
            keys.append(key)
    return keys


def _short(text: str) -> str:
    """A long float as 4 significant digits, for display (groups keep the full value)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.4g}" if len(text) > 8 and "." in text else text


def _sort_value(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def group_runs(runs: list[dict], keys: list[str]) -> dict[tuple, list[dict]]:
    """(data, model, value of each key) -> runs, in the paper's model order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        res = r["results"]
        groups[
            (_text(res.get("data", "?")), _text(res.get("model", "?")))
            + tuple(setting(r, k) for k in keys)
        ].append(r)

    def order(g: tuple):
        model = g[1]
        rank = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
        return (g[0], rank, model, *(_sort_value(v) for v in g[2:]))

    return {
        g: sorted(groups[g], key=lambda r: _sort_value(setting(r, "seed")))
        for g in sorted(groups, key=order)
    }


# ---------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _metric_cell(group: list[dict], metric: str, digits: int) -> str:
    values = [float(r["results"][metric]) for r in group if metric in r["results"]]
    if not values:
        return "–"
    mean, std = mean_std(values)
    cell = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return cell if len(values) == len(group) else f"{cell} (n={len(values)})"


def _seeds(group: list[dict]) -> str:
    return ", ".join(setting(r, "seed") or "?" for r in group)


def comparison_table(groups: dict, keys: list[str], metrics: list[str], digits: int = 4) -> str:
    header = ["data", "model", *keys, "n", "seeds", *metrics]
    align = ["---"] * (2 + len(keys)) + ["--:", "---"] + ["--:"] * len(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for g, group in groups.items():
        cells = [*g[:2], *map(_short, g[2:]), str(len(group)), _seeds(group)]
        cells += [_metric_cell(group, m, digits) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown(groups: dict, kind: str, k: int) -> tuple[list[int], dict[tuple, dict]]:
    """Buckets of `test_by_<kind>` and, per group, bucket -> (mean, std, n runs, mean
    events) of recall@k over the group's runs."""
    prefix = f"test_by_{kind}/"
    buckets = sorted(
        {
            int(key[len(prefix) :].split("/")[0])
            for g in groups.values()
            for r in g
            for key in r["results"]
            if key.startswith(prefix) and key.endswith(f"/recall@{k}")
        }
    )
    table = {}
    for g, group in groups.items():
        row = {}
        for b in buckets:
            values = [
                r["results"][f"{prefix}{b}/recall@{k}"]
                for r in group
                if f"{prefix}{b}/recall@{k}" in r["results"]
            ]
            events = [
                r["results"].get(f"{prefix}{b}/n_events", 0.0)
                for r in group
                if f"{prefix}{b}/recall@{k}" in r["results"]
            ]
            if values:
                mean, std = mean_std([float(v) for v in values])
                row[b] = (mean, std, len(values), sum(events) / len(events))
        table[g] = row
    return buckets, table


def bucket_label(kind: str, b: int) -> str:
    if kind == "position":
        return f"{b}+" if b >= POSITION_CAP else str(b)
    return str(b) if b < 2 else f"{b}-{2 * b - 1}"


def group_label(g: tuple, keys: list[str], several_data: bool) -> str:
    parts = [g[1]] + [f"{k}={_short(v)}" for k, v in zip(keys, g[2:])]
    if several_data:
        parts.insert(1, g[0])
    return " ".join(parts)


def breakdown_table(groups, keys, kind: str, k: int, digits: int = 4) -> str:
    buckets, table = breakdown(groups, kind, k)
    several_data = len({g[0] for g in groups}) > 1
    header = ["run group", *(bucket_label(kind, b) for b in buckets)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * len(buckets)]
    for g, row in table.items():
        cells = [f"{row[b][0]:.{digits}f}" if b in row else "–" for b in buckets]
        lines.append("| " + " | ".join([group_label(g, keys, several_data), *cells]) + " |")
    for data in dict.fromkeys(g[0] for g in groups):
        events = []
        for b in buckets:
            ev = [row[b][3] for g, row in table.items() if g[0] == data and b in row]
            events.append(f"{sum(ev) / len(ev):.0f}" if ev else "–")
        label = f"test events ({data})" if several_data else "test events"
        lines.append("| " + " | ".join([label, *events]) + " |")
    return "\n".join(lines)


def _split_cell(group: list[dict], metric: str, digits: int) -> str:
    """A repeat or explore metric's cell: n/a when the group's test has no target of that
    part (the evaluation reports 0 there), e.g. on data without repeats."""
    count = metric.split("/")[0] + "/n_events"
    counts = [float(r["results"][count]) for r in group if count in r["results"]]
    if counts and not any(counts):
        return "n/a"
    return _metric_cell(group, metric, digits)


def repeat_table(groups, keys, k: int, digits: int = 4) -> str | None:
    """Recall@k on repeat and explore targets (docs/design.md §6), the share of repeat
    targets among the test events and repeat_share@k, mean ± std over each group's runs;
    None when no run has these metrics (results from before they existed)."""
    columns = [
        ("repeat targets", None),
        (f"repeat recall@{k}", f"test_repeat/recall@{k}"),
        (f"explore recall@{k}", f"test_explore/recall@{k}"),
        (f"repeat_share@{k}", f"test/repeat_share@{k}"),
    ]
    if not any(columns[1][1] in r["results"] for g in groups.values() for r in g):
        return None
    several_data = len({g[0] for g in groups}) > 1
    header = ["run group", *(c for c, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * len(columns)]
    for g, group in groups.items():
        cells = []
        for _, metric in columns:
            if metric is not None:
                cells.append(_split_cell(group, metric, digits))
                continue
            shares = [
                float(r["results"]["test_repeat/n_events"]) / float(r["results"]["test/n_events"])
                for r in group
                if "test_repeat/n_events" in r["results"] and r["results"].get("test/n_events")
            ]
            cells.append(f"{sum(shares) / len(shares):.{digits}f}" if shares else "–")
        lines.append("| " + " | ".join([group_label(g, keys, several_data), *cells]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


SPARSE_EVENTS = 50  # buckets with fewer test events are drawn hollow: their recall is noisy
PLOT_FORMATS = ("pdf", "png")  # vector for papers, 300-dpi PNG for screens
AXIS_LABELS = {
    "position": ("position in session", "Recall@{k} by position in session"),
    "history": ("earlier sessions of the user", "Recall@{k} by user history"),
}


def _count(n: float) -> str:
    """A tick's event count, short: 17, 950, 4.8k, 12k."""
    if n < 1000:
        return f"{n:.0f}"
    return f"{n / 1000:.1f}k" if n < 10_000 else f"{n / 1000:.0f}k"


def _marker_sizes(events: list[float], most: float) -> list[float]:
    """Marker areas (points^2) growing with the square root of a bucket's test events."""
    return [20 + 140 * (e / most) ** 0.5 if most > 0 else 40 for e in events]


def plot_breakdown(groups, keys, kind: str, k: int, path: Path) -> list[Path]:
    """Recall@k per bucket, one marker series per run group (buckets are categories: no
    lines join them), ± std over seeds as error bars. A marker's area grows with the
    bucket's test events, which also stand under each tick; sparse buckets are hollow.
    Writes ``path`` with each suffix of ``PLOT_FORMATS``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets, table = breakdown(groups, kind, k)
    several_data = len({g[0] for g in groups}) > 1
    x = {b: i for i, b in enumerate(buckets)}
    rows = [(g, row) for g, row in table.items() if row]
    most = max((row[b][3] for _, row in rows for b in row), default=0.0)
    width = 0.6 / max(len(rows), 1)  # dodge the groups inside a bucket
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (g, row) in enumerate(rows):
        bs = [b for b in buckets if b in row]
        xs = [x[b] + (i - (len(rows) - 1) / 2) * width for b in bs]
        mean = [row[b][0] for b in bs]
        std = [row[b][1] for b in bs]
        events = [row[b][3] for b in bs]
        color = f"C{i % 10}"
        if any(v > 0 for v in std):
            ax.errorbar(xs, mean, yerr=std, fmt="none", ecolor=color, elinewidth=1, capsize=2)
        sparse = [e < SPARSE_EVENTS for e in events]
        ax.scatter(
            xs,
            mean,
            s=_marker_sizes(events, most),
            facecolors=["none" if sp else color for sp in sparse],
            edgecolors=color,
            linewidths=1.2,
            label=group_label(g, keys, several_data),
            zorder=3,
        )
    ticks = []
    for b in buckets:
        ev = [row[b][3] for _, row in rows if b in row]
        n = f"\nn={_count(sum(ev) / len(ev))}" if ev and not several_data else ""
        ticks.append(bucket_label(kind, b) + n)
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels(ticks, fontsize="small")
    xlabel, title = AXIS_LABELS[kind]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Recall@{k}")
    n_runs = "/".join(map(str, sorted({len(group) for group in groups.values()})))
    bars = ", bars ± std" if any(len(group) > 1 for group in groups.values()) else ""
    note = f"mean of {n_runs} seeds{bars}; area ~ test events (n), hollow: n < {SPARSE_EVENTS}"
    ax.set_title(f"{title.format(k=k)}\n{note}", fontsize="medium")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", markerscale=0.6)
    fig.tight_layout()
    written = []
    for fmt in PLOT_FORMATS:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=300)
        written.append(target)
    plt.close(fig)
    return written


# ---------------------------------------------------------------- CLI


def compare(
    paths,
    out: Path,
    metrics=None,
    k: int = 5,
    by=(),
    ignore=(),
    digits: int = 4,
    plots: bool = True,
) -> str:
    """Write comparison.md (and the plots) into `out`; return the main table's text."""
    metrics = list(metrics or DEFAULT_METRICS)
    runs = [load_run(p) for p in find_results(paths)]
    available = sorted({key for r in runs for key in r["results"]})
    missing = [m for m in metrics if not any(m in r["results"] for r in runs)]
    if missing:
        keys = [a for a in available if "/" in a and not a.startswith(("test_by", "val_by"))]
        raise CompareError(f"no run has {', '.join(missing)}; available: {', '.join(keys)}")
    if not any(key.endswith(f"/recall@{k}") and key.startswith("test_by_") for key in available):
        ks = sorted({key.rsplit("@", 1)[1] for key in available if key.startswith("test/recall@")})
        raise CompareError(f"no test_by_position/.../recall@{k} in the results (K = {ks})")
    keys = grouping_keys(runs, list(by), list(ignore))
    groups = group_runs(runs, keys)
    ties = sorted({_text(r["results"].get("eval/ties", "?")) for r in runs})
    table = comparison_table(groups, keys, metrics, digits)
    seeds = sorted({len(g) for g in groups.values()})
    intro = (
        f"{len(runs)} runs, {len(groups)} groups. Mean ± sample std (n - 1) over the runs of "
        f"each row; n = number of runs (seeds): {'/'.join(map(str, seeds))}. "
        + (f"Ties: {ties[0]}." if len(ties) == 1 else "Ties differ between runs (see eval/ties).")
    )
    repeated = [g for g in groups.values() if len({setting(r, "seed") for r in g}) < len(g)]
    if repeated:
        intro += (
            f" {len(repeated)} row(s) repeat a seed: the same configuration was run more than "
            "once (e.g. two sweep directories given); each run counts in n."
        )
    repeats = repeat_table(groups, keys, k, digits)
    repeat_md = [] if repeats is None else [
        f"## Repeat and explore targets (Recall@{k}; repeat targets: their share of the test "
        f"events; repeat_share@{k}: the share of the top {k} the user had before)",
        "",
        repeats,
        "",
    ]  # fmt: skip
    md = [
        "# Comparison",
        "",
        intro,
        "",
        table,
        "",
        *repeat_md,
        f"## Recall@{k} by position in session (mean over seeds; {POSITION_CAP}+ = "
        f"{POSITION_CAP} and beyond)",
        "",
        breakdown_table(groups, keys, "position", k, digits),
        "",
        f"## Recall@{k} by user history length (earlier sessions; mean over seeds)",
        "",
        breakdown_table(groups, keys, "history", k, digits),
        "",
        "Runs:",
        "",
        *[f"- {r['path']}" for g in groups.values() for r in g],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text("\n".join(md))
    if plots:
        plot_breakdown(groups, keys, "position", k, out / "by_position")
        plot_breakdown(groups, keys, "history", k, out / "by_history")
    return f"{intro}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", help="multirun directories, run directories or results.json files"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the first directory given)",
    )
    ap.add_argument(
        "--metrics",
        nargs="+",
        default=DEFAULT_METRICS,
        help=f"results.json keys for the table (default: {' '.join(DEFAULT_METRICS)})",
    )
    ap.add_argument("--k", type=int, default=5, help="K of recall@K in the breakdowns")
    ap.add_argument(
        "--by", nargs="*", default=[], help="extra config keys (or results.json keys) to group by"
    )
    ap.add_argument(
        "--ignore", nargs="*", default=[], help="override keys that must not split groups"
    )
    ap.add_argument("--digits", type=int, default=4)
    ap.add_argument("--no-plots", action="store_true", help="only write comparison.md")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        first = Path(args.paths[0])
        out = first if first.is_dir() else first.parent
    try:
        text = compare(
            args.paths,
            out,
            args.metrics,
            args.k,
            args.by,
            args.ignore,
            args.digits,
            plots=not args.no_plots,
        )
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: {e}: the plots need matplotlib (pip install -e '.[sweeps]'), or pass "
            "--no-plots",
            file=sys.stderr,
        )
        return 2
    print(text)
    plots = [f"by_{kind}.{fmt}" for kind in ("position", "history") for fmt in PLOT_FORMATS]
    written = ["comparison.md"] + ([] if args.no_plots else plots)
    print(f"\nwritten: {', '.join(str(out / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
