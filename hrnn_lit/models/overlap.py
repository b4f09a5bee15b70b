"""Training on CPU with two threads per step: the output tables' update overlaps the rest.

Once a step's score gradient ds is known, the rest of the update splits into two parts
that read ``forward``'s results and write disjoint parameters:

- output side (``update.output_gradients``): the gradient rows of out_w / out_b (/ out_u),
  a [N, B] x [B, H] product, and their Adagrad/Adam update: random-row reads and writes of
  the output tables and their optimiser state;
- recurrent side (``update.recurrent_gradients``): ds's gradient to the states, back
  through the session and user GRUs, and their update; then the next step's session
  starts and input-side GRU step (``update.forward_input``), which read no output table.

A worker thread runs the output side while the calling thread runs the recurrent side; the
next step's scores wait for the worker. Each side does the operations of the sequential
step on the same values and the worker draws no random numbers, so the results equal
``update.forward`` / ``update.backward`` / ``opt.step()`` run at the same intra-op thread
count (tests/test_overlap.py). Each thread runs with half the torch threads. On a shared
machine this keeps a step from waiting at every small op for a second OpenMP thread whose
core is busy elsewhere; on an idle one, all threads on every op can be faster
(``Chooser``).
"""

from __future__ import annotations

import queue
import statistics
import threading
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from hrnn_lit.models import update
from hrnn_lit.models.core import RecurrentCore
from hrnn_lit.models.optim import SparseRowOptimizer


def overlap_blocker(device: torch.device, world_size: int, clip: float) -> str | None:
    """Why a run's updates cannot overlap (None: they can)."""
    if device.type != "cpu":
        return f"runs on CPU only, the model is on {device.type}"
    if world_size > 1:
        return "needs one process: data-parallel averages every gradient before the update"
    if clip > 0:
        return "needs no clipping: the joint norm needs every gradient before the update"
    if torch.get_num_threads() < 2:
        return "needs 2 or more torch threads (num_threads)"
    return None


class Worker:
    """One thread running one job at a time; ``wait`` returns when the job has finished
    and re-raises its exception. Live for one chunk only (``train_chunk``): while a thread
    that ran torch ops at more than one OpenMP thread exists, OpenMP counts more threads
    than cores and stops spinning between parallel regions, which made the sequential step
    on all threads 2x slower on a 2-core machine (measured)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = False
        self._thread = threading.Thread(target=self._run, name="hrnn-overlap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
                self._done.put(None)
            except BaseException as err:  # handed to the waiting thread
                self._done.put(err)

    def submit(self, job: Callable[[], None]) -> None:
        if self._pending:
            raise RuntimeError("Worker.submit: the previous job was not waited for")
        self._pending = True
        self._jobs.put(job)

    def wait(self) -> None:
        if not self._pending:
            return
        self._pending = False
        err = self._done.get()
        if err is not None:
            raise err

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self.wait()
            finally:
                self._jobs.put(None)
                self._thread.join()


class Chooser:
    """Chooses chunk by chunk between the sequential step (every op on all threads) and the
    overlapped one: whichever took less wall time per step over its last ``window`` timed
    chunks. Which is faster depends on the machine's load at the time (on a shared 2-core
    VM the sequential step was ~13% faster when both cores were free and ~1.8x slower when
    another tenant took turns on one), so the other one is timed again every
    ``probe_every`` chunks. The first chunk (warm-up) is not timed. Both give the same
    updates up to float rounding (bit for bit on the machine above)."""

    def __init__(self, window: int = 3, probe_every: int = 16) -> None:
        self.times: dict[bool, deque] = {False: deque(maxlen=window), True: deque(maxlen=window)}
        self.chunks = {False: 0, True: 0}  # chunks run each way
        self._probe_every = probe_every
        self._decided = self._recorded = 0

    def next(self) -> bool:
        """Whether the next chunk overlaps."""
        k, self._decided = self._decided, self._decided + 1
        seq, ovl = self.times[False], self.times[True]
        if not seq:
            return k == 0  # the warm-up chunk, then one sequential
        if not ovl:
            return True
        best = statistics.median(ovl) <= statistics.median(seq)
        return best != (k % self._probe_every == 0)

    def record(self, overlapped: bool, seconds_per_step: float) -> None:
        self.chunks[overlapped] += 1
        self._recorded += 1
        if self._recorded > 1:
            self.times[overlapped].append(seconds_per_step)

    def overlap_share(self) -> float:
        n = sum(self.chunks.values())
        return self.chunks[True] / n if n else 0.0


def output_params(core: RecurrentCore) -> list[torch.nn.Parameter]:
    """The parameters the output side updates."""
    out = [core.out_w.weight, core.out_b.weight]
    return out + ([core.out_u.weight] if core.user_to_output else [])


def _output_update(
    core: RecurrentCore, opt: SparseRowOptimizer, cache: dict, params: list[Tensor]
) -> None:
    update.set_grads(update.output_gradients(core, cache))
    opt.step_params(params)


def train_chunk(
    core: RecurrentCore,
    loss_grad: update.LossGrad,
    opt: SparseRowOptimizer,
    batch: dict,
    cand: Tensor,
    h: Tensor,
    c: Tensor,
    losses: Tensor,
    mm_dtype: torch.dtype | None = None,
    hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunk's updates (one per time step, as ``RecurrentRecommender``'s eager loop),
    each step's output side on a ``Worker``. Writes each step's loss to ``losses`` [T];
    returns the final (h, c). ``hooks``: (before, after) called around every update."""
    inp, valid = batch["input"], batch["valid"]
    T = inp.shape[0]
    distinct = update.chunk_distinct(cand, inp, core.out_w.num_embeddings)
    out = output_params(core)
    rest = [p for p in core.parameters() if all(p is not q for q in out)]
    params = out + rest
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # per thread; the worker's team follows
    worker = Worker()
    try:
        h, c, start = update.start_step(core, batch, 0, h, c)
        inputs = update.forward_input(core, inp[0], h, c)
        for t in range(T):
            worker.wait()  # step t - 1's output tables
            if hooks is not None:
                hooks[0]()
            for p in params:  # = opt.zero_grad(set_to_none=True)
                p.grad = None
            h, loss, cache = update.forward(
                core, loss_grad, inp[t], h, c, cand[t], valid[t], start, mm_dtype,
                distinct[t], inputs,
            )  # fmt: skip
            worker.submit(lambda cache=cache: _output_update(core, opt, cache, out))
            update.set_grads(update.recurrent_gradients(core, cache))
            opt.step_params(rest)
            losses[t] = loss
            if hooks is not None:
                hooks[1]()
            if t + 1 < T:
                h, c, start = update.start_step(core, batch, t + 1, h, c)
                inputs = update.forward_input(core, inp[t + 1], h, c)
        worker.wait()
    finally:
        try:
            worker.close()  # never leave the worker writing weights behind an error
        finally:
            torch.set_num_threads(threads)
    return h, c
