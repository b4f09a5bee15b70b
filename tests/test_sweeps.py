"""Hydra multirun end to end (basic and joblib launchers, the Optuna search), the launcher and
search configs, and experiments/compare.py on a real sweep directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONF, TINY

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "experiments" / "compare.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = ["logger=none", "callbacks=none"]


def multirun(args: list[str], sweep_dir: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hrnn_lit",
            "-m",
            *args,
            f"paths.root_dir={sweep_dir.parent}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def job_results(sweep_dir: Path) -> dict[str, dict]:
    """Job subdirectory name -> its results.json."""
    return {
        f.parent.name: json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/results.json"))
    }


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The first markdown table: model -> {column: cell}."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        row = dict(zip(header, cells))
        rows[row["model"]] = row
    return rows


def test_multirun_jobs_and_comparison(tmp_path):
    sweep = tmp_path / "multirun"
    multirun(["model=session_rnn,hrnn_init", *QUIET, *TINY], sweep)
    runs = job_results(sweep)
    assert set(runs) == {"0", "1"}  # one directory per job, each with its own results.json
    assert {r["model"] for r in runs.values()} == {"session_rnn", "hrnn_init"}
    for name in runs:
        overrides = yaml.safe_load((sweep / name / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model=") for o in overrides)

    out = tmp_path / "cmp"
    p = subprocess.run(
        [sys.executable, str(COMPARE), str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    md = (out / "comparison.md").read_text()
    assert "Ties: conservative" in md and "| data | model |" in p.stdout
    rows = table_rows(md)
    assert set(rows) == {"session_rnn", "hrnn_init"}
    for r in runs.values():
        row = rows[r["model"]]
        assert row["n"] == "1" and row["data"] == "synthetic" and row["seeds"] == "0"
        for metric in ("test/recall@5", "test/mrr@5", "test/recall@20", "test/mrr@20"):
            mean, std = re.fullmatch(r"(\S+) ± (\S+)", row[metric]).groups()
            assert float(mean) == pytest.approx(r[metric], abs=5e-5)
            assert float(std) == 0.0
    # the breakdown tables: one row per model, one column per position / history bucket
    for r in runs.values():
        by_pos = [ln for ln in md.split("by position")[1].splitlines() if f"| {r['model']} |" in ln]
        assert by_pos and f"{r['test_by_position/1/recall@5']:.4f}" in by_pos[0]
    for png in ("by_position.png", "by_history.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_compare_groups_by_differing_overrides_and_averages_seeds(tmp_path):
    """Runs written by hand: two seeds of one config and one run with another lr."""
    base = {"data": "synthetic", "eval/ties": "conservative", "test_by_position/1/recall@5": 0.5}
    base["test_by_history/0/recall@5"] = 0.5
    specs = [("a", 0, "0.1", 0.2), ("b", 1, "0.1", 0.4), ("c", 0, "0.05", 0.3)]
    for name, seed, lr, recall in specs:
        d = tmp_path / "sweep" / name
        (d / ".hydra").mkdir(parents=True)
        res = {**base, "model": "hrnn_all", "seed": seed, "test/recall@5": recall}
        (d / "results.json").write_text(json.dumps(res))
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"seed={seed}", f"model.lr={lr}", "hydra.sweep.dir=x"])
        )
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(COMPARE), str(tmp_path / "sweep"), "--out", str(out), "--no-plots"]
        + ["--metrics", "test/recall@5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("| synthetic")]
    assert len(lines) == 2
    header = next(ln for ln in p.stdout.splitlines() if ln.startswith("| data |"))
    assert header == "| data | model | model.lr | n | seeds | test/recall@5 |"  # not seed
    row_01 = next(ln for ln in lines if "| 0.1 |" in ln)
    assert "| 2 | 0, 1 | 0.3000 ± 0.1414 |" in row_01  # mean, sample std of 0.2 and 0.4
    assert "| 1 | 0 | 0.3000 ± 0.0000 |" in next(ln for ln in lines if "| 0.05 |" in ln)
    bad = subprocess.run(
        [sys.executable, str(COMPARE), str(tmp_path / "sweep"), "--metrics", "test/nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "test/nope" in bad.stderr and "Traceback" not in bad.stderr


def test_optuna_search_on_joblib_launcher(tmp_path):
    """Two TPE trials run at once by the joblib launcher (n_jobs=2), each in its own job
    directory; the sweeper gets val/mrr@5 back from every trial."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    tiny = [o for o in TINY if not o.startswith(("model.hidden_size", "data.batch_size"))]
    multirun(
        [
            "+hparams_search=optuna",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "model.hidden_size=choice(8,16)",  # a smaller search space for the test
            "data.batch_size=choice(16,32)",
            *QUIET,
            *tiny,
        ],
        sweep,
    )
    runs = job_results(sweep)
    assert set(runs) == {"0", "1"}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(r["val/mrr@5"] for r in runs.values()))
    assert set(best["best_params"]) == {
        "model.lr",
        "model.hidden_size",
        "model.dropout_session",
        "data.batch_size",
    }
    assert best["best_params"]["model.hidden_size"] in (8, 16)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_optuna_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(["+hparams_search=optuna"])
    assert cfg.optimized_metric == "val/mrr@5"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None and sweeper.n_trials > 0
    assert set(sweeper.params) == {
        "model.lr",
        "model.hidden_size",
        "model.dropout_session",
        "data.batch_size",
    }
    assert _compose([]).optimized_metric is None  # the search only when asked for


# the file conf/hydra/launcher/joblib.yaml shadows the plugin's config of the same name (see
# hrnn_lit/__init__.py); pytest resets the package's filter for each test
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated:UserWarning")
def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = _compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["hydra/launcher=slurm", "trainer.devices=4", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # SLURM starts one rank per device (docs/design.md §12): tasks_per_node follows trainer.devices
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4
    assert launcher.nodes == 1 and launcher.partition == "gpu"
