"""Shared test helpers: a tiny synthetic dataset and config composition."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")

TINY = [
    "data.source.n_users=120",
    "data.source.n_items=400",
    "data.source.n_topics=10",
    "data.source.n_groups=6",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.steps_per_batch=16",
    "model.hidden_size=16",
    "model.user_hidden_size=16",
    "trainer.max_epochs=1",
    "+trainer.enable_progress_bar=false",
]


BASELINES = ("pop", "user_pop", "item_knn", "vsknn")
NETS = ("attention_hrnn", "hrnn_history")  # conf/model with a `net`: its sizes go there


def compose_cfg(overrides: list[str], output_dir: Path | str):
    """Compose conf/ with TINY's sizes; TINY's generator settings only for data=synthetic,
    its network sizes only for the recurrent models (under ``model.net`` for NETS)."""
    other_data = any(o.startswith("data=") or "experiment=" in o for o in overrides)
    baseline = any(o in {f"model={b}" for b in BASELINES} for o in overrides)
    net = any(o in {f"model={n}" for n in NETS} for o in overrides)
    tiny = [
        o.replace("model.", "model.net.", 1) if net else o
        for o in TINY
        if not (other_data and o.startswith("data.source."))
        and not (baseline and o.startswith("model."))
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={output_dir}", *tiny, *overrides])


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
