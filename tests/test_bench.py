"""Smoke test of the benchmark (experiments/bench.py --quick): it runs end to end and
writes every config with positive numbers. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from hrnn_lit.models import native

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_writes_every_config(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "targets" in done.stdout
    assert f"native kernels {'on' if native.load() else 'off'}" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["configs"]) == set(bench.CONFIGS)
    for name, r in result["configs"].items():
        assert "error" not in r, (name, r)
        assert _positive(r["train_events_per_s"]), name
        assert _positive(r["peak_rss_mb"]), name
        if r["kind"] == "train":
            for key in ("plain_events_per_s", "ref_events_per_s", "eval_events_per_s"):
                assert _positive(r[key]), (name, key)
            assert r["eval_scored_events"] > 0 and r["n_items"] > 0
            for phase in ("data", "forward", "backward", "optimiser", "total"):
                assert r["step_us"][phase] >= 0, (name, phase)
            assert _positive(r["step_us"]["total"]), name
            assert all(map(math.isfinite, r["final_loss"].values())), name
        else:
            assert len(r["sizes"]) == len(bench.EVENT_FRACTIONS)
            sizes = [s["train_events_per_epoch"] for s in r["sizes"]]
            assert sizes == sorted(sizes) and all(
                _positive(s["train_events_per_s"]) for s in r["sizes"]
            )
    for key in ("a/lightning_overhead", "a/hrnn_vs_session", "catalogue/eval_200k_vs_20k"):
        assert result["ratios"][key] is not None, key
    assert {t["target"] for t in result["targets"]}
