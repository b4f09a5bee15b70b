"""Thread counts on shared cores: usable CPUs, the default count, OpenMP's wait policy, the
contention guard, and joblib multiruns splitting the cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hrnn_lit import runtime
from tests.conftest import TINY


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_usable_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    assert runtime.usable_cpus() == 6
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 2.5)
    assert runtime.usable_cpus() == 2
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 0.5)
    assert runtime.usable_cpus() == 1


def test_cgroup_quota_v2_takes_the_tightest_ancestor_and_v1(tmp_path):
    root = tmp_path / "cgroup"
    (root / "job" / "step").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("300000 100000\n")
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    v2 = tmp_path / "v2"
    v2.write_text("0::/job/step\n")
    assert runtime._cgroup_quota(v2, root) == 3.0
    (root / "job" / "cpu.max").write_text("max 100000\n")
    assert runtime._cgroup_quota(v2, root) is None
    v1_dir = root / "cpu,cpuacct" / "box"
    v1_dir.mkdir(parents=True)
    (v1_dir / "cpu.cfs_quota_us").write_text("150000\n")
    (v1_dir / "cpu.cfs_period_us").write_text("100000\n")
    v1 = tmp_path / "v1"
    v1.write_text("4:cpu,cpuacct:/box\n3:memory:/box\n")
    assert runtime._cgroup_quota(v1, root) == 1.5
    (v1_dir / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime._cgroup_quota(v1, root) is None
    assert runtime._cgroup_quota(tmp_path / "absent", root) is None


def test_default_threads(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 8)
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    assert runtime.default_threads() == 8
    assert runtime.default_threads(local_ranks=2) == 4  # ranks on this machine share it
    assert runtime.default_threads(local_ranks=16) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # SLURM gave this rank its CPUs
    assert runtime.default_threads(local_ranks=2) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    assert runtime.default_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's (or joblib's) count wins
    assert runtime.default_threads(local_ranks=2) == 5


def test_importing_hrnn_lit_bounds_the_openmp_spin_before_torch_loads():
    code = (
        "import sys, os, hrnn_lit; "
        "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), "
        "os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "10000", "None"], out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's policy wins: no spin count is set
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "None", "ACTIVE"], out.stderr
    env = {**env, "GOMP_SPINCOUNT": "7"}
    del env["OMP_WAIT_POLICY"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "7", "None"], out.stderr


def _window(guard, waited_s, on_cpu_s, end_s, wall_s=0.25):
    """The window (end_s - wall_s, end_s]: the threads ran on_cpu_s CPU seconds in it and
    waited waited_s seconds in run queues (all threads together)."""
    guard._start = (end_s - wall_s, 0, 0)
    guard.check(end_s, int(on_cpu_s * 1e9), int(waited_s * 1e9))


def test_guard_drops_to_the_cpus_the_run_got_and_says_so_once(threads, capsys):
    torch.set_num_threads(4)
    guard = runtime.ContentionGuard(adapt=True, probe_s=10.0)
    _window(guard, waited_s=0.05, on_cpu_s=0.9, end_s=0.25)  # 5% waiting: the cores are ours
    assert torch.get_num_threads() == 4 and capsys.readouterr().err == ""
    _window(guard, waited_s=0.5, on_cpu_s=0.52, end_s=0.5)  # half the time, ~2 CPUs got
    assert torch.get_num_threads() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "waited for a CPU 50% of the time" in err
    assert "training on 2 thread(s) instead of 4" in err
    _window(guard, waited_s=0.25, on_cpu_s=0.27, end_s=0.75)
    assert torch.get_num_threads() == 1
    _window(guard, waited_s=0.2, on_cpu_s=0.25, end_s=1.0)  # one thread: nothing fewer
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""  # said once
    assert guard.summary() == {"perf/num_threads": 4, "perf/num_threads_end": 1}


def test_guard_probes_a_higher_count_again_later(threads, capsys):
    torch.set_num_threads(2)
    guard = runtime.ContentionGuard(adapt=True, probe_s=10.0)
    _window(guard, waited_s=0.25, on_cpu_s=0.25, end_s=1.0)
    assert torch.get_num_threads() == 1  # next probe at 11 s
    _window(guard, waited_s=0.0, on_cpu_s=0.25, end_s=5.0)
    assert torch.get_num_threads() == 1  # too early
    _window(guard, waited_s=0.0, on_cpu_s=0.25, end_s=11.0)
    assert torch.get_num_threads() == 2  # probing
    _window(guard, waited_s=0.2, on_cpu_s=0.3, end_s=11.25)  # still shared: back, wait 20 s
    assert torch.get_num_threads() == 1
    _window(guard, waited_s=0.0, on_cpu_s=0.25, end_s=21.0)
    assert torch.get_num_threads() == 1
    _window(guard, waited_s=0.0, on_cpu_s=0.25, end_s=31.25)
    assert torch.get_num_threads() == 2  # probing again
    _window(guard, waited_s=0.01, on_cpu_s=0.5, end_s=31.5)  # free again: kept
    _window(guard, waited_s=0.01, on_cpu_s=0.5, end_s=100.0)
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_guard_leaves_a_fixed_count_alone_and_warns_once(threads, capsys):
    torch.set_num_threads(2)
    guard = runtime.ContentionGuard(adapt=False)
    for k in range(3):
        _window(guard, waited_s=0.25, on_cpu_s=0.25, end_s=0.25 * (k + 1))
    assert torch.get_num_threads() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "throughput is throttled at 2 thread(s)" in err
    other_rank = runtime.ContentionGuard(adapt=True, verbose=False)
    _window(other_rank, waited_s=0.25, on_cpu_s=0.25, end_s=0.25)
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""  # rank 0 speaks


def test_guard_starts_on_the_cpus_nobody_else_runs_on(threads, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    monkeypatch.setattr(runtime, "others_running", lambda: 3)
    torch.set_num_threads(4)
    guard = runtime.ContentionGuard(adapt=True)
    guard.on_train_start(None, None)
    assert torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert err == (
        "hrnn_lit: shared CPUs: 3 runnable thread(s) of other processes on 4 usable CPUs at "
        "the start; training on 1 thread(s) instead of 4\n"
    )
    _window(guard, waited_s=0.25, on_cpu_s=0.25, end_s=guard._start[0] + 1)
    assert capsys.readouterr().err == ""  # one line per run
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.setattr(runtime, "others_running", lambda: 1)
    torch.set_num_threads(2)
    runtime.ContentionGuard(adapt=True).on_train_start(None, None)  # one CPU free of two
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(runtime, "others_running", lambda: 0)
    torch.set_num_threads(2)
    runtime.ContentionGuard(adapt=True).on_train_start(None, None)  # idle: as it was
    runtime.ContentionGuard(adapt=False).on_train_start(None, None)
    assert torch.get_num_threads() == 2


def test_others_running_counts_the_kernels_runnable_threads():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc")
    assert runtime.others_running(samples=3, interval_s=0.0) >= 0


def test_schedstat_is_read_where_linux_has_it():
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc")
    on_cpu, waiting = runtime._thread_times()
    assert on_cpu > 0 and waiting >= 0


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated:UserWarning")
def test_joblib_multirun_splits_the_cores_among_its_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from joblib import cpu_count

    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [
        sys.executable, "-m", "hrnn_lit", "-m", *TINY, "logger=none", "model=hrnn_init",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(r.read_text()) for r in sorted(sweep.rglob("results.json"))]
    assert len(results) == 2
    assert [r["perf/num_threads"] for r in results] == [max(1, cpu_count() // 2)] * 2
