"""The evaluation hooks every LightningModule of hrnn_lit shares: one pass per stage through
the evaluation loop (``evaluation.loop``), whatever the network, then its metrics logged.
The module holds ``net``, ``evaluation`` (``evaluator.Evaluation``) and ``eval_loop``."""

from __future__ import annotations

import torch
from torch import Tensor

from hrnn_lit import distributed
from hrnn_lit.data.batching import Chunk


class EvaluationHooks:
    """Lightning's validation and test hooks, delegated to the module's evaluation."""

    @property
    def eval_metrics(self) -> dict[str, dict[str, float]]:
        return self.evaluation.metrics

    @property
    def eval_outputs(self) -> dict[str, dict[str, Tensor]]:
        return self.evaluation.outputs

    def on_validation_epoch_start(self) -> None:  # (the repeat shares: the test's only)
        self.eval_loop.begin(self.net, self.evaluation.begin(), shares=False)

    def validation_step(self, batch: Chunk, batch_idx: int) -> None:
        self.eval_loop.chunk(batch)

    def on_validation_epoch_end(self) -> None:
        if len(self.evaluation.collector) or torch.distributed.is_initialized():
            self.evaluation.log(self, "val", distributed.eval_gather())

    def on_test_epoch_start(self) -> None:
        ev = self.evaluation
        self.eval_loop.begin(self.net, ev.begin(), shares=ev.repeat_share)

    def test_step(self, batch: Chunk, batch_idx: int) -> None:
        self.eval_loop.chunk(batch)

    def on_test_epoch_end(self) -> None:
        self.evaluation.log(self, "test", distributed.eval_gather())
