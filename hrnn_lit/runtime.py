"""Process-level settings that make the per-step training loop fast on CPU: malloc's
reuse of freed blocks, the torch thread count, and what to do when the cores are shared."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's malloc reuse freed blocks instead of returning them to the OS.

    A training step allocates and frees a few MB of tensors ([B, B+S] scores, gathered
    item rows); with glibc's defaults these are often fresh ``mmap`` pages, and the page
    faults of touching them cost ~25% of a CPU step. Blocks below ``mmap_threshold`` then
    come from the heap, which is trimmed only beyond ``trim_threshold`` of free memory.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    return mallopt(_M_TOP_PAD, 16 << 20) == 1 and ok


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota
    (a container or a SLURM job limited to fewer CPUs than the machine has)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, int(quota)) if quota is not None else n)


def _cgroup_quota(
    cgroups: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The tightest CPU quota (CPUs) over this process's cgroup and its parents, if any."""
    limits = []
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max = "QUOTA PERIOD" or "max PERIOD"
            d = root / path.lstrip("/")
            while True:
                limits.append(_read_quota(d / "cpu.max"))
                if d == root or root not in d.parents:
                    break
                d = d.parent
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (root / "cpu,cpuacct", root / "cpu"):
                d = base / path.lstrip("/")
                limits.append(_read_quota(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _read_quota(quota_file: Path, period_file: Path | None = None) -> float | None:
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def default_threads(local_ranks: int = 1) -> int:
    """torch threads of a run that does not set ``num_threads``.

    ``OMP_NUM_THREADS`` when set: the user's choice, and what joblib's workers get
    (usable CPUs // n_jobs, so a joblib multirun splits the cores among its jobs). Else
    ``SLURM_CPUS_PER_TASK`` where SLURM gives each rank its own CPUs, else the usable CPUs
    shared among the ranks on this machine.
    """
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), usable_cpus()) if var.startswith("SLURM") else int(value)
    return max(1, usable_cpus() // max(1, local_ranks))


def others_running(samples: int = 5, interval_s: float = 0.01) -> int:
    """Runnable threads of other processes right now: the median over a few samples of the
    kernel's count (/proc/stat procs_running) less this process's one running thread."""
    counts = []
    for i in range(samples):
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return 0
        counts += [int(line.split()[1]) for line in text.splitlines() if "procs_running" in line]
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2] - 1) if counts else 0


def _thread_times() -> tuple[int, int]:
    """(ns on a CPU, ns waiting in a run queue) summed over this process's threads."""
    on_cpu = waiting = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
        except OSError:  # the thread ended
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu, waiting


class ContentionGuard(pl.Callback):
    """Notice during training when this run's threads queue for CPUs that other processes
    hold, and then run on fewer threads.

    Why: each training step is a chain of short parallel regions, and a region ends when
    its slowest thread does; on shared cores one descheduled thread stalls every region, so
    N threads on N busy cores can be far slower than one thread. When fitting starts, an
    automatic count (``adapt``) is cut to the CPUs that no other process is running on
    (a few samples of the kernel's count of runnable threads). Then, every ``window_s`` seconds
    of fitting it reads the run-queue wait of this process's threads (Linux schedstat: a
    few small files). When they waited more than ``threshold`` of the time, an automatic
    thread count (``adapt``) drops to the CPUs the run actually got, and it prints one line
    (``verbose``: rank 0; it also warns, once, for a fixed count, which it leaves alone).
    After a drop it tries the higher count again for one window, ``probe_s`` seconds later
    and then at doubling intervals (at most ``32 * probe_s``), and keeps it when the wait
    stays low: the cores may be free again.
    Thread counts change only results' rounding where a reduction splits over threads (the
    native kernels give the same bits at any count); a fixed ``num_threads`` never changes.
    """

    def __init__(
        self,
        adapt: bool,
        window_s: float = 0.25,
        threshold: float = 0.25,
        probe_s: float = 10.0,
        verbose: bool = True,
    ) -> None:
        self.adapt = adapt
        self.window_s = window_s
        self.threshold = threshold
        self.probe_s = probe_s
        self.verbose = verbose
        self.warned = False
        self.enabled = Path("/proc/self/task").is_dir()
        self.threads_start = torch.get_num_threads()
        self._start: tuple[float, int, int] | None = None
        self._backoff = probe_s
        self._next_probe = float("inf")
        self._probe_from: int | None = None  # the count a probe of a higher one came from

    def summary(self) -> dict:
        """Threads at the start and at the end of the run, for results.json."""
        return {
            "perf/num_threads": self.threads_start,
            "perf/num_threads_end": torch.get_num_threads(),
        }

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        threads = torch.get_num_threads()
        if self.adapt and threads > 1:  # the cores already busy: start on the free ones
            usable, others = usable_cpus(), others_running()
            if usable - others < threads:
                fewer = max(1, usable - others)
                torch.set_num_threads(fewer)
                self._next_probe = time.perf_counter() + self._backoff
                self._say(
                    f"{others} runnable thread(s) of other processes on {usable} usable CPUs "
                    f"at the start; training on {fewer} thread(s) instead of {threads}"
                )
        self._start = (time.perf_counter(), *_thread_times())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        now = time.perf_counter()
        if now - self._start[0] >= self.window_s:
            self.check(now, *_thread_times())

    def check(self, now: float, on_cpu: int, waiting: int) -> None:
        """One window ends at ``now``: act on how long the threads waited in it."""
        t0, cpu0, wait0 = self._start
        self._start = (now, on_cpu, waiting)
        threads = torch.get_num_threads()
        wall_ns = (now - t0) * 1e9
        waited = (waiting - wait0) / (wall_ns * threads)
        if self._probe_from is not None:  # a window at a higher count again
            lower, self._probe_from = self._probe_from, None
            if waited > self.threshold:
                torch.set_num_threads(lower)
                self._backoff = min(2 * self._backoff, 32 * self.probe_s)
                self._next_probe = now + self._backoff
            else:
                self._backoff = self.probe_s
                self._next_probe = now + self._backoff
            return
        if waited <= self.threshold:
            if self.adapt and threads < self.threads_start and now >= self._next_probe:
                self._probe_from = threads
                torch.set_num_threads(min(2 * threads, self.threads_start))
            return
        got = (on_cpu - cpu0) / wall_ns  # CPUs this process actually had
        message = None
        if self.adapt and threads > 1:
            fewer = max(1, min(threads - 1, round(got)))
            torch.set_num_threads(fewer)
            self._next_probe = now + self._backoff
            message = f"training on {fewer} thread(s) instead of {threads}"
        else:
            message = f"throughput is throttled at {threads} thread(s)"
        if message:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            self._say(
                f"this run's threads waited for a CPU {waited:.0%} of the time (load "
                f"{load:.1f} on {usable_cpus()} usable CPUs); {message}"
            )

    def _say(self, what: str) -> None:
        """One line per run (rank 0)."""
        if self.verbose and not self.warned:
            print(f"hrnn_lit: shared CPUs: {what}", file=sys.stderr, flush=True)
        self.warned = True
