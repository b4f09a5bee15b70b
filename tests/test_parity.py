"""experiments/parity.py's one-at-a-time rows (docs/parity.md): each row's official
parameters and the hrnn_lit overrides they map to. No training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import parity  # noqa: E402

ONE_HOT = ["model.gru_variant=official", "model.gru_init=official",
           "model.adagrad_eps=inside", "data.shuffle_users=false"]  # fmt: skip
EMBEDDED = ["model.gru_variant=torch", *ONE_HOT[1:]]


def ours(name: str) -> dict[str, str]:
    params = parity.option_params(name, 3)
    overrides = parity.ours_overrides(params) + parity.official_model(params)
    return dict(o.split("=", 1) for o in overrides)


def test_base_is_the_equal_setting_at_batch_50() -> None:
    params = parity.option_params("base", 3)
    assert params == {**parity.official_params("equal", 3)}
    assert params["batch_size"] == 50 and params["n_sample"] == 2048
    assert params["sample_alpha"] == 0.5 and params["learning_rate"] == 0.05
    base = ours("base")
    assert base["model.loss"] == "cross-entropy" and base["model.embedding"] == "0"
    assert base["model.constrained_embedding"] == "false" and base["model.logq"] == "0.0"
    assert base["model.hidden_size"] == "100" and base["trainer.max_epochs"] == "3"
    keys = ("model.gru_variant", "model.gru_init", "model.adagrad_eps", "data.shuffle_users")
    assert [f"{k}={base[k]}" for k in keys] == ONE_HOT


@pytest.mark.parametrize("name", [n for n in parity.OPTIONS if n != "base" and "preset" not in n])
def test_each_row_changes_only_its_named_official_parameters(name: str) -> None:
    base, params = parity.option_params("base", 3), parity.option_params(name, 3)
    default = {"bpreg": 1.0, "dropout_p_embed": 0.0, "dropout_p_hidden": 0.0}  # official's
    changed = {k for k in params.keys() | base.keys()
               if params.get(k, default.get(k)) != base.get(k, default.get(k))}  # fmt: skip
    named = {part.split("=")[0] for part in name.split(",")}
    if "bpr-max" in named:  # the bpr-max rows: the loss plus the named one
        named = (named - {"bpr-max"}) | {"loss"}
    assert changed == named


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("loss=bpr-max", {"model.loss": "bpr-max", "model.final_act": "linear",
                          "model.bpreg": "1.0"}),
        ("bpr-max,elu_param=0.5", {"model.final_act": "elu-0.5"}),
        ("bpr-max,elu_param=1", {"model.final_act": "elu-1.0"}),
        ("bpr-max,bpreg=2", {"model.bpreg": "2.0", "model.final_act": "linear"}),
        # one-hot: the official input dropout is on the GRU's new state
        ("dropout_p_embed=0.3", {"model.dropout_embed": "0.0", "model.dropout_hidden": "0.3"}),
        ("embedding=100", {"model.embedding": "100", "model.dropout_embed": "0.0"}),
        ("embedding=100,dropout_p_hidden=0.3", {"model.embedding": "100",
                                               "model.dropout_embed": "0.0",
                                               "model.dropout_hidden": "0.3"}),
        ("embedding=100,dropout_p_embed=0.3", {"model.dropout_embed": "0.3",
                                              "model.dropout_hidden": "0.0"}),
        ("constrained_embedding=True", {"model.constrained_embedding": "true",
                                        "model.embedding": "0"}),
        ("logq=1", {"model.logq": "1.0"}),
        ("n_sample=0", {"model.n_sample": "0"}),
        ("n_sample=512", {"model.n_sample": "512"}),
        ("sample_alpha=0", {"model.sample_alpha": "0.0"}),
        ("sample_alpha=1", {"model.sample_alpha": "1.0"}),
        ("learning_rate=0.1", {"model.lr": "0.1"}),
        ("momentum=0.3", {"model.momentum": "0.3"}),
        ("batch_size=128", {"data.batch_size": "128"}),
        ("preset gru4rec_xe", {"model.constrained_embedding": "true", "model.logq": "1.0",
                               "model.dropout_embed": "0.2", "model.dropout_hidden": "0.2"}),
        ("preset gru4rec_bprmax", {"model.loss": "bpr-max", "model.final_act": "elu-1.0",
                                   "model.bpreg": "1.85", "model.momentum": "0.4",
                                   "model.sample_alpha": "0.2", "model.dropout_embed": "0.35",
                                   "model.logq": "0.0"}),
    ],
)  # fmt: skip
def test_row_maps_to_hrnn_lit(name: str, expected: dict[str, str]) -> None:
    got = ours(name)
    assert {k: got[k] for k in expected} == expected
    embedded = "embedding" in name or "preset" in name
    cell = [f"{k}={got[k]}" for k in ("model.gru_variant", "model.gru_init",
                                       "model.adagrad_eps", "data.shuffle_users")]  # fmt: skip
    assert cell == (EMBEDDED if embedded else ONE_HOT)


def test_presets_match_hrnn_lit_preset_files() -> None:
    """The preset rows carry the recipe of conf/model/gru4rec_*.yaml."""
    import yaml

    for row, preset in (("preset gru4rec_xe", "gru4rec_xe"),
                        ("preset gru4rec_bprmax", "gru4rec_bprmax")):  # fmt: skip
        conf = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())
        got = ours(row)
        for key in ("loss", "constrained_embedding", "embedding", "hidden_size", "lr",
                    "momentum", "n_sample", "sample_alpha", "logq", "dropout_embed",
                    "dropout_hidden"):  # fmt: skip
            want = conf[key]
            assert got[f"model.{key}"] == (str(want).lower() if isinstance(want, bool)
                                           else str(want)), (row, key)  # fmt: skip


def test_logq_is_off_with_bpr_max() -> None:
    """The official code applies logQ with cross-entropy only."""
    params = {**parity.option_params("loss=bpr-max", 3), "logq": 1.0}
    assert "model.logq=0.0" in parity.ours_overrides(params)


def test_every_official_parameter_has_a_row_or_a_reason() -> None:
    """GRU4Rec.__init__'s parameters: a row changes it, or NO_ROW says why none does."""
    official = {"layers", "loss", "batch_size", "dropout_p_embed", "dropout_p_hidden",
                "learning_rate", "momentum", "sample_alpha", "n_sample", "embedding",
                "constrained_embedding", "n_epochs", "bpreg", "elu_param", "logq"}  # fmt: skip
    rowed = {k for p in parity.OPTIONS.values() for k in p}
    missing = {k for k in official - rowed
               if not any(r.split(",")[0].split("=")[0].split()[0] == k
                          for r in parity.NO_ROW)}  # fmt: skip
    assert not missing
    assert "layers=100/100" in parity.NO_ROW


def test_within_spread() -> None:
    assert parity.within([0.10, 0.12, 0.11], [0.11, 0.13, 0.12])
    assert not parity.within([0.10, 0.10, 0.10], [0.12, 0.12, 0.12])


def test_official_init_shifts_only_the_compatibility_seed() -> None:
    """--vary-official-init: numpy seed 42 becomes 42 + seed; other seeds are left alone."""
    import numpy

    original = numpy.random.seed
    try:
        exec(parity.official_init(3), {})
        numpy.random.seed(42)
        shifted = numpy.random.rand(4)
        numpy.random.seed(7)
        other = numpy.random.rand(4)
    finally:
        numpy.random.seed = original
    numpy.random.seed(45)
    assert numpy.allclose(shifted, numpy.random.rand(4))
    numpy.random.seed(7)
    assert numpy.allclose(other, numpy.random.rand(4))


def test_table_without_hrnn_lit_runs() -> None:
    """--official-only: the official cells, dashes for hrnn_lit and the verdict."""
    res = {"base": {"official": [{"recall@20": 0.3, "mrr@20": 0.1}] * 3, "ours": []}}
    row = parity.table(res, [0, 1, 2], 3).splitlines()[-1]
    assert row == "| base | 0.3000 ± 0.0000 | – | 0.1000 ± 0.0000 | – | – |"
    res["base"]["ours"] = [{"recall@20": 0.33, "mrr@20": 0.1}] * 3
    assert parity.table(res, [0, 1, 2], 3).splitlines()[-1].endswith("| no: recall +10.0% |")
