"""The check that stops training on a non-finite loss, naming the update and the last finite
loss, without a host sync per step: a chunk's per-step losses are kept on the device and
checked once per chunk (on CUDA one chunk late, so the host's work between chunks overlaps
the device's), and always before a checkpoint is written, before validation and at the end
of each epoch, so a checkpoint never takes bad weights."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from hrnn_lit.errors import NumericalError


class LossChecks:
    """Chunks whose losses are not checked yet, and the last finite loss seen."""

    def __init__(self) -> None:
        self.unchecked: list[tuple[Tensor, int, int, int]] = []  # (losses, epoch, batch, update)
        self.last_finite: tuple[int, Tensor] | None = None  # (update, loss)

    def add(self, losses: Tensor, epoch: int, batch_idx: int, first_update: int) -> None:
        self.unchecked.append((losses, epoch, batch_idx, first_update))

    def check(self, kept_weights: Callable[[], str], behind: int = 0) -> None:
        """Raise on the first NaN/inf loss of the unchecked chunks but the last ``behind``;
        ``kept_weights()`` says where the last good weights are."""
        while len(self.unchecked) > behind:
            self._check_chunk(*self.unchecked.pop(0), kept_weights)

    def _check_chunk(self, losses, epoch, batch_idx, first_update, kept_weights) -> None:
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            self.last_finite = (first_update + losses.numel() - 1, losses[-1])
            return
        self.unchecked.clear()
        t = int((~finite).nonzero()[0])
        if t > 0:
            self.last_finite = (first_update + t - 1, losses[t - 1])
        last = (
            "none"
            if self.last_finite is None
            else f"{float(self.last_finite[1]):.6g} at update {self.last_finite[0]}"
        )
        raise NumericalError(
            f"training loss is {float(losses[t])} at epoch {epoch}, batch "
            f"{batch_idx}, update {first_update + t} (time step {t} of the batch); last finite "
            f"loss: {last}. {kept_weights()}; lower model.lr or set model.clip_grad_norm"
        )


def kept_weights(trainer) -> str:
    """Where the last good weights are, for a stop message."""
    ckpt = trainer.checkpoint_callback if trainer is not None else None
    last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
    if last and os.path.isfile(last):
        return f"{last} holds the last good weights"
    return "No checkpoint was written"
