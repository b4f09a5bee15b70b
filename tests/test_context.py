"""What a network's step may know besides its input items (``api.Context``: the slot's
user, the event's time, the gap since the user's previous event, the position in the
session) and the user vocabulary's size, in training, evaluation and recommending."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from hrnn_lit.data.batching import build_steps
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.api import takes_context
from tests.helpers import small_dm
from tests.nets import ContextNet, TiedNet


def test_steps_carry_time_gap_and_user_by_hand():
    # user 0: session [10, 20, 30], session [100, 160]; user 1: session [5, 6]
    item = np.array([1, 2, 3, 4, 5, 6, 7])
    user = np.array([0, 0, 0, 0, 0, 1, 1])
    ses = np.array([0, 0, 0, 1, 1, 2, 2])
    time = np.array([10, 20, 30, 100, 160, 5, 6])
    s = build_steps(item, user, ses, time=time, user_index=np.array([3, 3, 3, 3, 3, -1, -1]))
    assert s.input.tolist() == [1, 2, 4, 6]
    assert s.time.tolist() == [10, 20, 100, 5]  # the input event's time
    assert s.gap.tolist() == [0, 10, 70, 0]  # from the user's previous event, any session
    assert s.position.tolist() == [1, 2, 1, 1]
    assert s.user_index.tolist() == [3, 3, 3, -1]


def test_only_networks_that_ask_get_a_context():
    assert takes_context(ContextNet(10, 3)) and not takes_context(TiedNet(10))


def _expected(steps, rows) -> list[tuple]:
    """(item, user, time, gap, position) of the steps ``rows``, sorted."""
    cols = (steps.input, steps.user_index, steps.time, steps.gap, steps.position)
    return sorted(zip(*(c[rows].tolist() for c in cols)))


def _received(record, keep) -> list[tuple]:
    out = []
    for items, c in record:
        cols = [items, c.user, c.time, c.gap, c.position]
        mask = keep(items, c)
        out += zip(*(x[mask].tolist() for x in cols))
    return sorted(out)


def test_training_and_evaluation_give_each_step_its_context():
    dm = small_dm()
    model = RecurrentRecommender(
        dm.n_items, dm.item_counts, n_users=dm.n_users, loss="cross-entropy", lr=0.05,
        net={"_target_": "tests.nets.ContextNet", "hidden_size": 8},
    )  # fmt: skip
    assert model.net.n_users == dm.n_users == int(dm.user_ids.len())
    model.net.record = []
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    steps = dm.fit_steps
    assert (steps.user_index >= 0).all()  # every fit user is in the vocabulary
    # every valid slot of every time step: its step's context (empty slots have user -1)
    got = _received(model.net.record, lambda items, c: c.user >= 0)
    assert got == _expected(steps, np.arange(len(steps)))
    model.net.record = []
    trainer.test(model, datamodule=dm, verbose=False)
    test = dm.eval_steps["test"]
    got = _received(model.net.record, lambda items, c: torch.ones_like(items, dtype=torch.bool))
    # the evaluation steps every valid step once (rows padded by repeating real ones)
    assert sorted(set(got)) == sorted(set(_expected(test, np.arange(len(test)))))
    assert np.isfinite(model.eval_metrics["test"]["test/recall@20"])
