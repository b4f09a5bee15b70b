"""Lightning callbacks of hrnn_lit."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Events per second in training (time from epoch start to the last batch's end, data
    loading included, validation excluded) and in testing (scored events over the whole
    test loop, history replay included)."""

    def __init__(self) -> None:
        self.train_events = 0
        self.train_seconds = 0.0
        self.test_events = 0
        self.test_seconds = 0.0
        self._t0 = self._t_last = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_events += batch["n_events"]
        self._t_last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_seconds += self._t_last - self._t0
        pl_module.log("perf/train_events_per_s", self.train_events_per_s)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_events += batch["n_scored"]

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.test_seconds += time.perf_counter() - self._t0

    @property
    def train_events_per_s(self) -> float:
        return self.train_events / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def eval_events_per_s(self) -> float:
        return self.test_events / self.test_seconds if self.test_seconds > 0 else 0.0
