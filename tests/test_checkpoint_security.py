"""A checkpoint is data: reading one never runs code it carries (docs/reliability.md,
"Security"). A real last.ckpt with one extra entry whose unpickling would call
``os.system`` is refused with one line by every entry point that takes ``ckpt_path``, before
anything is trained, evaluated or written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hrnn_lit.errors import ConfigError
from hrnn_lit.run import run
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
BASE = ["logger=none"]


class _Payload:
    """Unpickles as a call of ``os.system`` (what a crafted checkpoint would carry)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run(compose_cfg(BASE, out))
    return out / "checkpoints" / "last.ckpt"


def evil_copy(trained: Path, dest: Path, marker: Path) -> Path:
    """``trained`` with one extra entry that creates ``marker`` when unpickled unsafely."""
    ckpt = torch.load(trained, weights_only=True)
    ckpt["extra"] = _Payload(f"touch {marker}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


def files_under(d: Path) -> set[str]:
    """What a run wrote: every file but Hydra's own (.hydra/, its log)."""
    if not d.exists():
        return set()
    return {
        str(p.relative_to(d))
        for p in d.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_the_crafted_file_runs_code_when_loaded_unsafely(tmp_path, trained):
    """The payload is real: torch's unsafe load runs it (so the tests below can fail)."""
    marker = tmp_path / "MARKER"
    evil = evil_copy(trained, tmp_path / "evil.ckpt", marker)
    torch.load(evil, weights_only=False)  # what hrnn_lit must never do
    assert marker.exists()


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *TINY, *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["test", "train"])
def test_cli_refuses_a_checkpoint_that_would_run_code(tmp_path, trained, mode):
    marker = tmp_path / "MARKER"
    evil = evil_copy(trained, tmp_path / "evil.ckpt", marker)
    out = tmp_path / "run"
    proc = cli(["logger=none", f"mode={mode}", f"ckpt_path={evil}", f"hydra.run.dir={out}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0] == (
        f"error: ckpt_path: {evil} holds objects that a checkpoint does not need "
        "(posix.system); refusing to load it (hrnn_lit reads checkpoints as data only: a "
        "file written by hrnn_lit holds tensors and plain values, so this one was changed or "
        "written by other code)"
    )
    assert files_under(out) == set()


@pytest.mark.parametrize("ckpt_path", ["last", "auto"])
def test_resuming_a_run_directory_whose_last_ckpt_would_run_code_is_refused(
    tmp_path, trained, ckpt_path
):
    marker = tmp_path / "MARKER"
    out = tmp_path / "run"
    evil_copy(trained, out / "checkpoints" / "last.ckpt", marker)
    before = files_under(out)
    with pytest.raises(ConfigError) as e:
        run(compose_cfg([*BASE, f"ckpt_path={ckpt_path}", "trainer.max_epochs=2"], out))
    assert "\n" not in str(e.value) and "(posix.system); refusing to load it" in str(e.value)
    assert not marker.exists()
    assert files_under(out) == before


def test_a_normal_checkpoint_loads_as_data(tmp_path, trained):
    """hrnn_lit's own checkpoints need nothing beyond tensors and plain values: mode=test on
    a copy gives the run's own metrics."""
    copy = tmp_path / "copy.ckpt"
    shutil.copy(trained, copy)
    torch.load(copy, weights_only=True)
    a = run(compose_cfg([*BASE, "mode=test", f"ckpt_path={copy}"], tmp_path / "a"))
    b = run(compose_cfg([*BASE, "mode=test", f"ckpt_path={trained}"], tmp_path / "b"))
    keys = [k for k in a if k.startswith("test/")]
    assert keys and all(a[k] == b[k] for k in keys)


def test_no_unsafe_load_in_the_code():
    """No ``weights_only=False`` in hrnn_lit/ or experiments/ (and every torch.load there
    says weights_only=True)."""
    offenders = []
    for folder in ("hrnn_lit", "experiments"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            if re.search(r"weights_only\s*=\s*False", text):
                offenders.append(str(f.relative_to(ROOT)))
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                if "weights_only=True" not in call:
                    offenders.append(f"{f.relative_to(ROOT)}: {call}")
    assert offenders == []
