"""The command line as a user meets it: the help page, unknown keys, a quiet default run."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hrnn_lit.__main__ import add_hint, compose_error_line, config_keys, unknown_key_line
from tests.conftest import TINY, compose_cfg
from tests.test_readme import conf_groups, parse_options

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def help_page() -> str:
    p = cli(["--help"])
    assert p.returncode == 0, p.stderr
    return p.stdout


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("==") or not line.strip():
            break
        out.append(line)
    return out


def test_help_lists_every_group_and_option_of_conf(help_page):
    groups: dict[str, set[str]] = {}
    group = None
    for line in _section(help_page, "Config groups"):
        m = re.match(r"^(\S+)\s{2,}(.*)$", line)
        if m:
            group = m.group(1)
            groups[group] = parse_options(m.group(2))
        elif group and groups[group] and line.strip() and _continues(line):
            groups[group] |= parse_options(line)
    assert groups == conf_groups()


def _continues(line: str) -> bool:
    """An indented line of option names (a continuation), not a one-line meaning."""
    return bool(re.fullmatch(r"\s+[a-z0-9_]+(, [a-z0-9_]+)*,?", line))


def _constants() -> dict[str, set[str]]:
    def names(module: str, attr: str) -> set[str]:
        return set(getattr(importlib.import_module(module), attr))

    out = {
        "mode": names("hrnn_lit.config", "MODES"),
        "model.loss": names("hrnn_lit.ops.losses", "LOSSES"),
        "model.optimizer": names("hrnn_lit.ops.optim", "KINDS"),
        "model.user_propagation": names("hrnn_lit.nets.recurrent", "PROPAGATIONS"),
        "model.final_act": names("hrnn_lit.ops.activations", "ACTIVATIONS"),
        "eval.ties": names("hrnn_lit.evaluation.metrics", "TIES"),
        "data.fit_split": names("hrnn_lit.data.datamodule", "FIT_SPLITS"),
        "trainer.precision": names("hrnn_lit.config", "PRECISIONS") - {"32"},  # "32": alias
        "model.engine": names("hrnn_lit.models.engine", "ENGINES"),
    }
    return out


def test_help_gives_the_allowed_values_the_code_accepts(help_page):
    shown = {}
    for line in _section(help_page, "Main keys"):
        m = re.match(r"^(\S+)\s{2,}(\S+( \| \S+)+)\s*$", line)
        if m:
            shown[m.group(1)] = set(m.group(2).split(" | "))
    # parametrised activations are shown as patterns (elu-<a>): their kinds must match
    acts = shown.get("model.final_act", set())
    shown["model.final_act"] = {a for a in acts if "<" not in a}
    acts_mod = importlib.import_module("hrnn_lit.ops.activations")
    assert {a.split("-")[0] for a in acts if "<" in a} == set(acts_mod.PARAMETRIC)
    assert shown == _constants()


@pytest.mark.parametrize(
    "override", ["model.hiden_size=50", "+model.hiden_size=50", "modle.hidden_size=50"]
)
def test_unknown_key_is_one_line_with_a_suggestion(override, tmp_path):
    out = tmp_path / "run"
    p = cli([*TINY, override, "logger=none", f"hydra.run.dir={out}"])
    assert p.returncode == 2, p.stderr
    key = override.lstrip("+").split("=")[0]
    assert p.stderr == f"error: unknown key {key}; did you mean model.hidden_size?\n"
    assert not (out / "results.json").exists()


def test_unknown_key_in_a_multirun_stops_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    p = cli(
        ["-m", "seed=0,1", "model=session_rnn,hrnn_init", "model.hiden_size=8,16"]
        + [f"hydra.sweep.dir={sweep}"]
    )
    assert p.returncode == 2
    assert p.stderr == "error: unknown key model.hiden_size; did you mean model.hidden_size?\n"
    assert not sweep.exists()


def test_unknown_option_is_one_line_with_a_suggestion(tmp_path):
    p = cli(["model=sesion_rnn", f"hydra.run.dir={tmp_path / 'run'}"])
    assert p.returncode == 2
    assert p.stderr.startswith(
        "error: unknown option model=sesion_rnn; did you mean model=session_rnn? options: "
    )
    assert p.stderr.count("\n") == 1 and "hrnn_init, hrnn_all" not in p.stderr  # sorted
    assert set(p.stderr.split("options: ")[1].strip().split(", ")) == conf_groups()["model"]


def test_unknown_key_line():
    keys = ["model", "model.hidden_size", "model.lr", "trainer", "trainer.max_epochs"]
    assert unknown_key_line("trainer.max_epoch", keys) == (
        "error: unknown key trainer.max_epoch; did you mean trainer.max_epochs?"
    )
    assert unknown_key_line("model.zzz", keys) == "error: unknown key model.zzz"


def test_config_keys_are_dotted_and_leave_out_hydra(tmp_path):
    keys = config_keys(compose_cfg([], tmp_path))
    assert {"seed", "model.hidden_size", "data.source.n_users", "eval.ties"} <= set(keys)
    assert not any(k.startswith("hydra") for k in keys)


def test_default_run_prints_no_warning(tmp_path):
    """The default command, as a user runs it (fewer users and one epoch, for speed): no
    Python warning, no Lightning advertisement, the test table on stdout."""
    out = tmp_path / "run"
    p = cli(
        ["data.source.n_users=300", "trainer.max_epochs=1", f"hydra.run.dir={out}"],
        cwd=tmp_path,  # the data cache goes to ./.cache: keep it out of the repository
    )
    assert p.returncode == 0, p.stderr
    # nothing but hrnn_lit's own notices (e.g. that the CPUs are shared with other jobs)
    assert [line for line in p.stderr.splitlines() if not line.startswith("hrnn_lit: ")] == []
    assert "Tip:" not in p.stdout and "Warning" not in p.stdout
    assert "test metrics: hrnn_init on synthetic" in p.stdout
    assert (out / "results.json").exists()


def test_wandb_logger_passes_no_anonymous_setting_and_no_empty_keys():
    from hrnn_lit.quiet import WandbLogger, drop_empty_keys

    logger = WandbLogger(project="p", offline=True)
    assert "anonymous" not in logger._wandb_init
    assert WandbLogger(project="p", anonymous=True)._wandb_init["anonymous"] == "allow"
    assert drop_empty_keys({"": 1, "a": {"": 2, "b": 3}, "c": 4}) == {"a": {"b": 3}, "c": 4}


def test_an_argument_the_network_takes_gets_the_plus_hint(tmp_path):
    """model.net holds the network's own arguments: one the config leaves out is added
    with +, and the line says so (the network takes it)."""
    swap = "model.net={_target_:hrnn_lit.nets.attention_hrnn.AttentionHRNN}"
    p = cli(["model=session_rnn", swap, "model.net.memory=3", f"hydra.run.dir={tmp_path}"])
    assert p.returncode == 2
    assert p.stderr == (
        "error: unknown key model.net.memory; hrnn_lit.nets.attention_hrnn.AttentionHRNN "
        "takes memory: add it with +model.net.memory=3\n"
    )


def test_unknown_key_hints():
    msg = "Could not override '{}'. Key is not in struct"
    swap = "model.net={_target_:hrnn_lit.nets.attention_hrnn.AttentionHRNN}"
    line = compose_error_line(msg.format("model.net.memroy"),
                              [*TINY, "model=session_rnn", swap, "model.net.memroy=3"])  # fmt: skip
    assert line == "error: unknown key model.net.memroy; did you mean +model.net.memory=3?"
    line = compose_error_line(msg.format("model.net.history"),
                              ["model=session_rnn", "model.net={_target_:nowhere.Net}",
                               "model.net.history=ids"])  # fmt: skip
    assert line == (
        "error: unknown key model.net.history; a key model.net leaves out is added with "
        "+model.net.history=ids"
    )
    # a typo of a key the config has keeps its suggestion; no hint where none fits
    line = compose_error_line(msg.format("model.hiden_size"), ["model.hiden_size=3"])
    assert line == "error: unknown key model.hiden_size; did you mean model.hidden_size?"
    assert add_hint("seed.x", "1", None) is None
    assert unknown_key_line("model.zzz", ["model", "model.lr"], "hint") == (
        "error: unknown key model.zzz; hint"
    )
