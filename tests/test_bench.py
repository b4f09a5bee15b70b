"""Smoke tests of the benchmark (experiments/bench.py --quick): it runs end to end through
the public API, writes every default config with positive numbers, and measures another
revision side by side in its own git worktree. No timing is asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hrnn_lit.ops import native

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _bench():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def _check_config(name: str, r: dict) -> None:
    assert "error" not in r, (name, r)
    for key in ("train_events_per_s", "eval_events_per_s", "peak_rss_mb", "us_per_step"):
        assert _positive(r[key]), (name, key)
    assert r["eval_scored_events"] > 0 and r["n_items"] > 0, name
    assert math.isfinite(r["final_loss"]) and 0 <= r["recall@20"] <= 1, name


def test_bench_quick_writes_every_default_config(tmp_path):
    bench = _bench()
    done, result = _run(tmp_path)
    assert "targets" in done.stdout
    assert f"native kernels {'on' if native.load() else 'off'}" in done.stdout
    assert list(result["configs"]) == bench.DEFAULT_CONFIGS
    assert {n[:2] for n in bench.DEFAULT_CONFIGS} == {"a_", "d_"}  # Setting A, default data
    for name, r in result["configs"].items():
        _check_config(name, r)
        assert Path(r["hrnn_lit"]) == ROOT / "hrnn_lit", name  # this checkout's package
        engines = {"autograd"} if name.endswith("_autograd") else {"fused", "autograd"}
        assert r["engine"] in engines, name
    assert result["configs"]["a_session_rnn"]["engine"] == "fused"  # model.engine=auto
    for key in ("a/hrnn_init_vs_session_rnn/train", "d/hrnn_history_vs_hrnn_init/eval"):
        assert _positive(result["ratios"][key]), key
    assert result["targets"] and "vs_baseline" not in result


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_bench_measures_a_baseline_revision_side_by_side(tmp_path):
    """--baseline-rev: the same worker runs on a temporary worktree of the revision (its
    own hrnn_lit imported), and the worktree is removed afterwards."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    done, result = _run(tmp_path, "--baseline-rev", "HEAD", "--configs", "d_session_rnn")
    base = result["baseline_configs"]["d_session_rnn"]
    _check_config("baseline d_session_rnn", base)
    assert Path(base["hrnn_lit"]) != ROOT / "hrnn_lit"
    assert Path(base["hrnn_lit"]).parent.name.startswith("rev-")
    x = result["vs_baseline"]["d_session_rnn"]
    assert _positive(x["train"]) and _positive(x["eval"])
    assert result["meta"]["baseline"]["rev"] == "HEAD"
    assert "baseline: HEAD" in done.stdout and "train x" in done.stdout
    tree = Path(base["hrnn_lit"]).parent  # removed, and unknown to git, afterwards
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert not tree.exists() and str(tree) not in listed
