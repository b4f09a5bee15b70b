"""The Lightning validation/test hooks shared by every recommender: one evaluation pass per
stage over the eval plan's chunks, ranks collected by a RankCollector and gathered across
data-parallel ranks, metrics logged and kept on the module for results.json."""

from __future__ import annotations

import torch

from hrnn_lit import distributed
from hrnn_lit.evaluation.evaluator import RankCollector


class RankingEvalHooks:
    """Mixin for a LightningModule that defines ``eval_ks``, ``eval_ties``,
    ``_eval_chunk(batch)`` (feeding ``self._collector``) and optionally ``_eval_reset()``."""

    def _eval_reset(self) -> None:
        """Per-pass state (e.g. carried hidden states) to clear at a pass start."""

    def _eval_begin(self) -> None:
        self._collector = RankCollector(self.eval_ties, rank_cap=max(self.eval_ks))
        self._eval_reset()

    def _eval_finish(self, stage: str) -> dict[str, float]:
        dist = torch.distributed
        parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        gather = distributed.gather_cat if parallel else None
        metrics, outputs = self._collector.finish(stage, self.eval_ks, gather)
        self.eval_outputs[stage] = outputs
        self.eval_metrics[stage] = metrics
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._eval_begin()

    def _eval_step(self, batch: dict) -> None:
        # ranks come from float32 scores under any trainer precision (bf16 scores would tie)
        with torch.autocast(batch["input"].device.type, enabled=False):
            self._eval_chunk(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if len(self._collector) or torch.distributed.is_initialized():
            self.log_dict(self._eval_finish("val"))

    def on_test_epoch_start(self) -> None:
        self._eval_begin()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._eval_finish("test"))
