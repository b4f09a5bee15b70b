"""No noise a user cannot act on: library warnings, Lightning's advertisement and info lines,
and W&B's warnings about settings hrnn_lit never asked for."""

from __future__ import annotations

import logging
import warnings

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger

# Python warnings of the libraries hrnn_lit runs on (message patterns).
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's _pytree on recent torch
    # data-parallel: each rank runs a single-device Trainer (sync_dist=True would reduce
    # nothing); the val/test metrics are gathered by hrnn_lit before they are logged and
    # perf/ is a total over the ranks, so Lightning's advice on every epoch-level key is moot
    r"It is recommended to use `self\.log\('[^']*', \.\.\., sync_dist=True\)` when logging "
    r"on epoch level in distributed setting",
)

# Lightning's info lines that say nothing a user can act on: an advertisement, TPUs (no
# hrnn_lit path uses one), and the fit loop's "stopped: max_epochs reached" (printed into
# the progress bar's last line).
QUIET_LIGHTNING = ("💡 Tip:", "TPU available:", "`Trainer.fit` stopped:")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet() -> None:
    """Ignore ``QUIET_WARNINGS`` and drop Lightning's ``QUIET_LIGHTNING`` lines (idempotent)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(QUIET_LIGHTNING))


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger without its noise: no ``anonymous`` setting handed to
    ``wandb.init`` unless asked for (recent wandb warns that it has no effect), and no
    empty keys in the logged config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def log_hyperparams(self, params) -> None:
        super().log_hyperparams(drop_empty_keys(params) if isinstance(params, dict) else params)


def drop_empty_keys(d: dict) -> dict:
    """``d`` without empty-string or None keys, at every depth."""
    return {
        k: drop_empty_keys(v) if isinstance(v, dict) else v
        for k, v in d.items()
        if k is not None and str(k) != ""
    }
