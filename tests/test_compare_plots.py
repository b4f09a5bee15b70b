"""compare.py's breakdown plots: PDF and 300-dpi PNG, markers sized by the bucket's events."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def _runs(root: Path) -> None:
    events = {0: 900.0, 1: 300.0, 2: 5.0}  # the last bucket is sparse
    for i, (model, seed) in enumerate([("session_rnn", 0), ("session_rnn", 1), ("hrnn_init", 0)]):
        d = root / str(i)
        (d / ".hydra").mkdir(parents=True)
        res = {"data": "synthetic", "model": model, "seed": seed, "eval/ties": "conservative"}
        res["test/recall@5"] = 0.1 + 0.01 * i
        for kind in ("position", "history"):
            for b, n in events.items():
                res[f"test_by_{kind}/{b + 1 if kind == 'position' else b}/recall@5"] = 0.1 * b
                res[f"test_by_{kind}/{b + 1 if kind == 'position' else b}/n_events"] = n
        (d / "results.json").write_text(json.dumps(res))
        (d / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- seed={seed}\n")


def test_plots_are_pdf_and_300_dpi_png_with_markers_sized_by_events(tmp_path):
    pytest.importorskip("matplotlib")
    import compare
    from PIL import Image

    _runs(tmp_path / "sweep")
    compare.compare([tmp_path / "sweep"], tmp_path / "out", ["test/recall@5"], 5, [], [])
    for kind in ("position", "history"):
        assert (tmp_path / "out" / f"by_{kind}.pdf").read_bytes()[:5] == b"%PDF-"
        with Image.open(tmp_path / "out" / f"by_{kind}.png") as im:
            assert round(im.info["dpi"][0]) == 300 and im.size[0] >= 1800
    sizes = compare._marker_sizes([900.0, 300.0, 5.0], 900.0)
    assert sizes[0] > sizes[1] > sizes[2] > 0
    assert compare._count(4772) == "4.8k" and compare._count(17) == "17"
