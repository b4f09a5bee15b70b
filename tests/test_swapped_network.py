"""A built-in model's config with its network swapped (``model=session_rnn
'model.net={_target_:...}'``) runs as the network's own: its name in results.json and on
the console, no built-in network keys in config.yaml or the checkpoint's model config, and
one line where the command line sets such a key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hrnn_lit.checkpoints import RECORD_KEY
from hrnn_lit.config import BUILTIN_NET_KEYS, own_network
from hrnn_lit.run import run
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
TIED = "model.net={_target_:tests.nets.TiedNet,hidden_size:8}"


def cli(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *args, f"hydra.run.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_swapped_network_records_its_own_name_and_config(tmp_path):
    """``model=session_rnn 'model.net={...}'``: results.json, config.yaml and the
    checkpoint's model config name the network and carry none of the built-in network's
    keys (the composed TINY sizes set model.hidden_size, which the network ignores)."""
    res = run(compose_cfg(["logger=none", "model=session_rnn", TIED], tmp_path))
    assert res["model"] == "TiedNet" and res["engine"] == "autograd"
    model = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    saved = ckpt[RECORD_KEY]["model_config"]
    for recorded in (model, saved):
        assert recorded["name"] == "TiedNet"
        assert recorded["net"] == {"_target_": "tests.nets.TiedNet", "hidden_size": 8}
        assert not set(BUILTIN_NET_KEYS) & set(recorded), sorted(recorded)
        assert recorded["loss"] == "top1" and recorded["lr"] == 0.1  # the training keys stay
    again = run(compose_cfg(["logger=none", "callbacks=none", "mode=test",
                             f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"],
                            tmp_path / "test"))  # fmt: skip
    assert again["model"] == "TiedNet"
    assert again["test/recall@20"] == pytest.approx(res["test/recall@20"], abs=1e-12)


def test_a_swapped_networks_checkpoint_hyperparameters_are_its_own(tmp_path):
    run(compose_cfg(["logger=none", "model=session_rnn", TIED], tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not set(BUILTIN_NET_KEYS) & set(ckpt["hyper_parameters"])


def test_a_built_in_key_set_with_a_swapped_network_is_one_line(tmp_path):
    p = cli(["model=session_rnn", TIED, "model.hidden_size=64"], tmp_path / "a")
    assert p.returncode == 2
    assert p.stderr == (
        "error: model.hidden_size: a key of the built-in network, which model.net "
        "(tests.nets.TiedNet) replaces; the network takes its own arguments (e.g. "
        "model.net.hidden_size=...)\n"
    )
    assert not (tmp_path / "a" / "results.json").exists()


def test_an_explicit_name_stays(tmp_path):
    cfg = compose_cfg(["model=session_rnn", TIED, "model.name=mine"], tmp_path)
    own_network(cfg, ["model=session_rnn", TIED, "model.name=mine"])
    assert cfg.model.name == "mine" and "hidden_size" not in cfg.model
    built_in = compose_cfg(["model=session_rnn"], tmp_path)
    own_network(built_in, [])
    assert built_in.model.name == "session_rnn" and built_in.model.hidden_size == 16
