"""Test helpers: steps from hand-written sessions, the plain reference replay of an
evaluation, and callbacks that inject faults into real training runs (used through Hydra
overrides)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytorch_lightning as pl
import torch

from hrnn_lit.data.batching import Steps, build_steps
from hrnn_lit.evaluation.evaluator import RankCollector
from hrnn_lit.evaluation.loop import EvalLoop, starts_at


def events_of(users: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item, user, session) arrays of users given as lists of sessions of item ids."""
    item, user, ses = [], [], []
    for u, sessions in enumerate(users):
        for s in sessions:
            item += s
            user += [u] * len(s)
            ses += [len(set(ses))] * len(s)
    return np.array(item), np.array(user), np.array(ses)


def steps_for(users: list[list[list[int]]]) -> Steps:
    """Steps of users given as lists of sessions of item ids, in that order."""
    return build_steps(*events_of(users))


def tiny_datamodule(source, name: str):
    """A set-up SessionDataModule of an events source with light filters (no dedupe) and
    small batches: 8 slots, chunks of 16 steps, fit on the train split."""
    from hrnn_lit.data.datamodule import SessionDataModule

    dm = SessionDataModule(
        source=source, name=name,
        preprocess=dict(min_item_support=1, min_session_len=2, min_user_sessions=2,
                        max_user_sessions=None, dedupe=False),
        batch_size=8, eval_batch_size=16, steps_per_batch=16, fit_split="train", seed=0,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def at_least_float32(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def replay(net, batch, state=None):
    """The plain replay of a chunk: every slot at every time step (start rules, step, and
    the targets where the network observes them). Returns a copy of the state after each
    step and the final state."""
    T, B = batch.input.shape
    state = net.initial_state(B, batch.input.device) if state is None else state
    states = []
    for t in range(T):
        if batch.any_start[t]:
            state = net.start(state, starts_at(batch, t))
        state = net.step(batch.input[t], state)
        states.append(tuple(x.clone() for x in state))
        if hasattr(net, "observe"):
            state = net.observe(state, batch.target[t])
    return states, state


def reference_eval(net, chunks, ties="conservative", rank_cap=None) -> dict:
    """The plain reference evaluation: ``replay`` on every slot and event, the network's
    ``score`` over the whole catalogue for each scored event, ``target_ranks``. Returns the
    pass's per-event outputs (rank, position, history)."""
    collector = RankCollector(ties, rank_cap)
    state = None
    with torch.no_grad():
        for batch in chunks:
            states, state = replay(net, batch, state)
            for t, st in enumerate(states):
                rows = batch.score[t].nonzero().view(-1)
                if rows.numel():
                    scores = at_least_float32(net.score(tuple(x[rows] for x in st)))
                    keys = ("target", "position", "history", "repeat")
                    offsets, items = batch.seen.before(batch.event[t, rows.numpy()])
                    pairs = (
                        torch.from_numpy(np.repeat(np.arange(rows.numel()), np.diff(offsets))),
                        torch.from_numpy(items),
                    )
                    collector.add(scores, *(getattr(batch, k)[t, rows] for k in keys), pairs)
    return collector.finish("test", [5])[1]


def loop_eval(net, chunks, n_items, ties="conservative", rank_cap=None, shares=True, **kw):
    """The same pass through ``EvalLoop`` (``kw``: its eval_block, fast; ``shares``: the
    repeat shares, as on a test pass, or not, as on validation)."""
    collector = RankCollector(ties, rank_cap)
    loop = EvalLoop(n_items, **kw)
    loop.begin(net, collector, shares)
    with torch.inference_mode():
        for batch in chunks:
            loop.chunk(batch)
    return collector.finish("test", [5])[1]


class KillAtUpdate(pl.Callback):
    """SIGKILL this process once training has made ``update`` optimiser updates."""

    def __init__(self, update: int):
        self.update = update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.update:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtBatch(pl.Callback):
    """Set a weight to NaN before the given training batch of the first epoch."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            pl_module.net.w_h.weight.data[0, 0] = float("nan")


class KillWhileSaving(pl.Callback):
    """SIGKILL this process in the middle of writing its ``save``-th checkpoint file: half
    of the bytes are in the file being written when the process dies."""

    def __init__(self, save: int):
        self.save = save

    def setup(self, trainer, pl_module, stage: str) -> None:
        import io

        import torch

        real, calls = torch.save, [0]

        def half_then_kill(obj, f, *args, **kwargs):
            if hasattr(f, "write"):
                calls[0] += 1
                if calls[0] == self.save:
                    buf = io.BytesIO()
                    real(obj, buf, *args, **kwargs)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *args, **kwargs)

        torch.save = half_then_kill


def small_dm(batch_size: int = 8):
    """A small user-sorted datamodule on generated data (60 users, 300 items)."""
    import functools

    from hrnn_lit.data.datamodule import SessionDataModule
    from hrnn_lit.data.synthetic import generate_events

    dm = SessionDataModule(
        source=functools.partial(
            generate_events, seed=0, n_users=60, n_items=300, n_topics=10, n_groups=6
        ),
        name="small", preprocess=dict(min_item_support=1, min_session_len=2,
        min_user_sessions=2, max_user_sessions=None), batch_size=batch_size,
        eval_batch_size=8, steps_per_batch=16, fit_split="train", seed=0,
    )  # fmt: skip
    dm.setup("fit")
    return dm
