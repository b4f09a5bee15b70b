"""The default engine reproduces the one-epoch float64 results recorded with the
hand-written engine (tests/data/reference_metrics.json, written by
tests/make_reference_metrics.py): every built-in variant x loss, sampled negatives, the
GRU4Rec options and the other training options.

Tolerance: relative 1e-9 (absolute 1e-12 near 0). The recording's own check
(``--check``: the same cases trained with ``model.engine=autograd``) agrees to 1e-13 or
better (``autograd_max_rel_diff`` per case), so 1e-9 leaves room for another order of the
same float64 operations and none for a different rule. A case marked ``dropout`` also needs
the same masks drawn in the same order."""

from __future__ import annotations

import json

import pytest

from tests.make_reference_metrics import CASES, REFERENCE, run_case

RECORDED = json.loads(REFERENCE.read_text())["cases"]


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(CASES), "rerun python -m tests.make_reference_metrics"
    for name, case in RECORDED.items():
        assert case["overrides"] == CASES[name], name


@pytest.mark.parametrize("name", list(CASES))
def test_default_engine_reproduces_the_recorded_metrics(name, tmp_path):
    want = RECORDED[name]["metrics"]
    got = run_case(name, tmp_path)["metrics"]
    # every recorded metric (the repeat/explore split came later: more keys now)
    assert set(want) <= set(got) and any("repeat" in k for k in got)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
