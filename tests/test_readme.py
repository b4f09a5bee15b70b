"""The README says what conf/ and the CLI do: its config-group table lists every group and
option of conf/, its model table every model, and every command of its Run section runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hrnn_lit.run import run
from tests.conftest import CONF, TINY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def conf_groups() -> dict[str, set[str]]:
    """{group: options} of conf/ (nested groups as ``data/preprocess``; Hydra's own left out)."""
    out = {}
    for d in sorted(Path(CONF).rglob("*")):
        rel = d.relative_to(CONF).as_posix()
        if d.is_dir() and rel.split("/")[0] != "hydra":
            options = {f.stem for f in d.glob("*.yaml")}
            if options:
                out[rel] = options
    return out


def parse_options(text: str) -> set[str]:
    """Option names of a list like "`a` (default), `b`, c": parenthesised notes left out."""
    text = re.sub(r"\([^)]*\)", "", text).replace("`", "")
    return {name.strip() for name in text.split(",") if name.strip()}


def section(title: str) -> str:
    """The README's text under ``## title`` up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def table_rows(text: str) -> list[list[str]]:
    rows = [
        line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")
    ]
    return [[c.strip() for c in r] for r in rows[2:]]  # header and rule left out


def test_config_group_table_equals_conf():
    table = {
        row[0].strip("`"): parse_options(row[1]) for row in table_rows(section("Config groups"))
    }
    assert table == conf_groups()


def test_model_table_names_every_model():
    names = set()
    for row in table_rows(section("Models")):
        if row[0].startswith("`"):
            names |= parse_options(row[0])
    assert conf_groups()["model"] <= names


GENERATED = ("model-table", "ablation")  # blocks rewritten by experiments/*.py


def prose(text: str) -> str:
    """The README without the contents of its generated blocks (the markers stay)."""
    for name in GENERATED:
        pattern = rf"(<!-- {name}:start -->).*?(<!-- {name}:end -->)"
        text = re.sub(pattern, r"\1\2", text, flags=re.S)
    return text


def test_readme_stays_short_and_keeps_its_generated_blocks():
    """At most 10k characters for a user: the hand-written text at most 8,500, and the
    whole, with the compact generated result tables, at most 10,000 (the tables' full
    versions go to docs/model_table.md and docs/ablation.md)."""
    assert len(prose(README)) <= 8_500
    assert len(README) <= 10_000
    for name in GENERATED:
        assert README.count(f"<!-- {name}:start -->") == README.count(f"<!-- {name}:end -->")
    assert README.count("<!-- model-table:start -->") == 1
    assert "## Add your own model" in README and "## Multi-device training" in README


def run_commands() -> list[list[str]]:
    """The argument lists of the ``python -m hrnn_lit`` lines of the Run section."""
    out = []
    for line in section("Run").splitlines():
        if line.startswith("python -m hrnn_lit"):
            out.append(shlex.split(line.split("#")[0])[3:])
    return out


def test_run_section_has_the_default_command_and_help():
    commands = run_commands()
    assert [] in commands and ["--help"] in commands


def _tiny(args: list[str]) -> list[str]:
    """TINY's sizes, appended after the command's own overrides (a short run of it)."""
    other_data = any(a.startswith("data=") or "experiment=" in a for a in args)
    return [o for o in TINY if not (other_data and o.startswith("data.source."))]


@pytest.mark.parametrize("args", run_commands(), ids=lambda a: " ".join(a) or "default")
def test_run_section_command_runs(args, tmp_path):
    if any(a.startswith("-") for a in args):  # a CLI flag such as --help
        p = subprocess.run(
            [sys.executable, "-m", "hrnn_lit", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0 and p.stdout.strip(), p.stderr
        return
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", *args, *_tiny(args)])
    results = run(cfg)
    assert 0.0 <= results["test/recall@5"] <= results["test/recall@20"] <= 1.0
    assert (tmp_path / "results.json").exists()


def test_readme_links_point_to_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    missing = [p for p in links if not (ROOT / p).exists()]
    assert links and not missing


def test_benchmarks_doc_shows_every_recorded_run():
    sys.path.insert(0, str(ROOT / "experiments"))
    from benchmarks_doc import RESULTS, render

    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    assert doc == render(bench_json=ROOT / "no-bench.json") or "## This checkout's" in doc
    for path in RESULTS.iterdir():
        if path.suffix in (".log", ".json", ".txt") and not (
            path.suffix == ".json" and path.with_suffix(".log").exists()
        ):
            assert f"### {path.name}" in doc


def test_recommend_section_runs_as_written(tmp_path):
    """The Recommend section's commands (the training one with TINY's sizes appended) and
    its Python block, run as written in a directory holding an events.csv."""
    text = section("Recommend")
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line.split("#")[0]) for line in bash.splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["python", "-m", "hrnn_lit"]] * 2
    train, recommend = commands
    p = subprocess.run([sys.executable, *train[1:], *TINY, "logger=none"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,timestamp\n7,42,1700000000\n7,43,1700000060\n99999,42,1700000000\n"
    )
    p = subprocess.run([sys.executable, *recommend[1:]], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = (tmp_path / "recs.csv").read_text().splitlines()
    assert out[0] == "user_id,rank,item_id,score" and len(out) == 1 + 2 * 20
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    rec, recs = namespace["rec"], namespace["recs"]
    known = rec.items.index(42)
    assert known >= 0 and rec.users.history[rec.users.rows[7]][-1] == known
    assert recs.columns == ["user_id", "rank", "item_id", "score"] and recs.height == 10
