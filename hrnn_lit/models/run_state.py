"""What a checkpoint carries of a training run besides weights and optimiser state: the
slots' carried states, the loss checks' last finite point and the RNG, so a run resumed
from a mid-epoch checkpoint continues exactly where it stopped (docs/reliability.md)."""

from __future__ import annotations

import torch

KEY = "hrnn_lit"


def save(module, checkpoint: dict) -> None:
    checkpoint[KEY] = {
        "train_state": module._train_state,
        "last_finite": module.checks.last_finite,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def load(module, checkpoint: dict) -> None:
    extra = checkpoint.get(KEY)
    if not extra:
        return
    module._train_state = extra["train_state"]
    module.checks.last_finite = extra["last_finite"]
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
