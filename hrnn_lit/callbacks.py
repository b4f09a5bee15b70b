"""Lightning callbacks of hrnn_lit: throughput, crash-safe checkpoints, the divergence guard
and the run record a checkpoint carries (model config, logger ids)."""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from hrnn_lit.errors import NumericalError

TMP_SUFFIX = ".hrnn-tmp"  # a checkpoint being written: `.<name>.<unique>.hrnn-tmp`


class Throughput(pl.Callback):
    """Events per second in training (time from epoch start to the last batch's end, data
    loading included, validation excluded) and in testing (scored events over the whole
    test loop, history replay included).

    ``rates()`` gives the ``perf/`` keys of results.json. With N data-parallel processes
    ``perf/train_events_per_s`` and ``perf/eval_events_per_s`` are totals (all ranks'
    events over the slowest rank's seconds) and the ``..._per_process`` keys are those / N;
    ``perf/train_seconds`` is the slowest rank's. The logged ``perf/train_events_per_s``
    (each epoch) is the total too. Every rank must call ``rates()`` (a collective)."""

    def __init__(self) -> None:
        self.train_events = 0
        self.train_seconds = 0.0
        self.test_events = 0
        self.test_seconds = 0.0
        self._t0 = self._t_last = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_events += batch.n_events
        self._t_last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_seconds += self._t_last - self._t0
        pl_module.log("perf/train_events_per_s", self.rates()["perf/train_events_per_s"])

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_events += batch.n_scored

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.test_seconds += time.perf_counter() - self._t0

    @property
    def train_events_per_s(self) -> float:
        """This process's."""
        return self.train_events / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def eval_events_per_s(self) -> float:
        """This process's."""
        return self.test_events / self.test_seconds if self.test_seconds > 0 else 0.0

    def rates(self) -> dict[str, float]:
        """The ``perf/`` keys over all ranks (see the class)."""
        from hrnn_lit.distributed import over_ranks

        world = dist.get_world_size() if dist.is_initialized() else 1
        train_events, test_events = over_ranks([self.train_events, self.test_events])
        train_s, test_s = over_ranks([self.train_seconds, self.test_seconds], op="max")
        train = train_events / train_s if train_s > 0 else 0.0
        test = test_events / test_s if test_s > 0 else 0.0
        return {
            "perf/train_events_per_s": train,
            "perf/train_events_per_s_per_process": train / world,
            "perf/train_seconds": train_s,  # fitting (a baseline: its counts)
            "perf/eval_events_per_s": test,
            "perf/eval_events_per_s_per_process": test / world,
        }


# ------------------------------------------------------------------------ checkpoints


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported here (e.g. some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target directory, fsyncs it and
    renames it over the target: a kill at any moment leaves either the old file or the new
    one, never a partial file, and nothing is copied across file systems (Lightning's own
    save goes through a temporary file in $TMPDIR that is then moved, which is a copy when
    $TMPDIR is on another file system)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a process killed while saving."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    orphans = sorted(directory.glob(f".*{TMP_SUFFIX}"))
    for f in orphans:
        f.unlink(missing_ok=True)
    return orphans


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at the end of every training epoch; with ``every_n_train_steps``, at the
    first batch end at or past every multiple of that many optimiser updates (so epochs
    whose update count is not a multiple still get their mid-epoch saves); with
    ``every_n_minutes``, at the first batch end that many minutes after the last save (a
    resumed run continues exactly from any batch end, so time-based saves lose nothing of
    the run's reproducibility, and their cost does not grow with the catalogue). Writes are
    atomic (``AtomicCheckpointIO``) and temporary files of a killed save are removed when
    training starts. Other ModelCheckpoint options (``save_top_k``, ``monitor``) work as in
    Lightning."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
        **kwargs,
    ) -> None:
        kwargs.update(save_last=True, enable_version_counter=False, save_on_train_epoch_end=True)
        kwargs.setdefault("save_top_k", 0)
        super().__init__(dirpath=dirpath, **kwargs)
        self.every_n_updates = int(every_n_train_steps or 0)
        self.every_s = 60.0 * float(every_n_minutes or 0.0)
        self._saved_at = 0
        self._saved_time = time.monotonic()

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            remove_orphans(self.dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = trainer.global_step
        self._saved_time = time.monotonic()

    def _save_last_now(self, trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        for cb in trainer.callbacks:  # never save weights that a guard would reject
            if isinstance(cb, DivergenceGuard):
                cb.check(trainer, trainer.lightning_module)
        for logger in trainer.loggers:  # metrics.csv holds every row up to the checkpoint
            logger.save()
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._saved_at = trainer.global_step
        self._saved_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_updates
        if n > 0 and trainer.global_step // n > self._saved_at // n:
            self._save_last_now(trainer)
        elif self.every_s > 0 and time.monotonic() - self._saved_time >= self.every_s:
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # top-k saves, if any
        self._save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass  # saved at the training epoch's end, which comes after validation

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_now(trainer)


class RunRecord(pl.Callback):
    """What a checkpoint carries besides Lightning's state: the model config it was built
    from (``mode=test`` rebuilds the model from it), the data plan settings (a mid-epoch
    resume needs the same) and the W&B run id (a resumed run continues that run). On a
    resumed run it also applies the configured lr, momentum and weight decay to the restored
    optimiser (``changed``: what differed)."""

    def __init__(
        self, model_config: dict | None = None, data: dict | None = None,
        recommend: dict | None = None,
    ) -> None:  # fmt: skip
        self.model_config = model_config
        self.data = data  # the plan settings (checkpoints.PLAN_KEYS)
        self.recommend = recommend  # item ids, session rule (hrnn_lit.recommend.checkpoint)
        self.changed: dict[str, list] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from pytorch_lightning.loggers import WandbLogger

        from hrnn_lit.checkpoints import RECORD_KEY

        wandb_id = next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        checkpoint[RECORD_KEY] = {
            "model_config": self.model_config,
            "data": self.data,
            "wandb_id": wandb_id,
        }
        if self.recommend is not None:
            from hrnn_lit.recommend.recommender import PAYLOAD_KEY

            checkpoint[PAYLOAD_KEY] = self.recommend

    def on_train_start(self, trainer, pl_module) -> None:
        from hrnn_lit.checkpoints import apply_optimizer_hparams

        self.changed = apply_optimizer_hparams(trainer, pl_module)


# ------------------------------------------------------------------------ divergence


def parameter_norm(module: torch.nn.Module) -> float:
    """L2 norm of all parameters (one host sync); in float64 where float32 overflows (its
    squares do near 1e19), so a huge but finite norm is told from an infinite one."""
    params = [p.detach() for p in module.parameters()]
    if not params:
        return 0.0
    with torch.no_grad():
        norm = float(torch.linalg.vector_norm(torch.stack([p.norm() for p in params])))
        if not math.isfinite(norm):
            norm = float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) for p in params])
                )
            )
    return norm


class DivergenceGuard(pl.Callback):
    """Stops a run that has diverged without a NaN (the module stops on NaN losses): the
    parameter norm leaving ``max_norm_ratio`` times its value before the first update (or
    not finite), or the training loss exceeding ``max_loss_ratio`` times the first checked
    chunk's loss. Checked every ``check_every`` chunks, at each epoch end and before every
    checkpoint LastCheckpoint writes (and Lightning runs checkpoint callbacks after this
    one), so ``last.ckpt`` keeps weights that passed. The error is one line."""

    def __init__(
        self, max_norm_ratio: float = 50.0, max_loss_ratio: float = 10.0, check_every: int = 16
    ) -> None:
        self.max_norm_ratio = float(max_norm_ratio)
        self.max_loss_ratio = float(max_loss_ratio)
        self.check_every = max(1, int(check_every))
        self.initial_norm: float | None = None
        self.first_loss: float | None = None
        self._batches = 0

    def state_dict(self) -> dict:
        return {"initial_norm": self.initial_norm, "first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial_norm = state_dict.get("initial_norm")
        self.first_loss = state_dict.get("first_loss")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.initial_norm is None:  # a resumed run keeps the first run's reference
            self.initial_norm = parameter_norm(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches % self.check_every == 0:
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        where = f"epoch {trainer.current_epoch}, update {trainer.global_step}"
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None and math.isfinite(float(loss)):
            loss = float(loss)
            if self.first_loss is None:
                self.first_loss = loss
            elif self.first_loss > 0 and loss > self.max_loss_ratio * self.first_loss:
                self._stop(
                    trainer,
                    f"the training loss {loss:.6g} at {where} is above "
                    f"{self.max_loss_ratio:g}x its first value {self.first_loss:.6g} "
                    "(callbacks.divergence.max_loss_ratio)",
                )
        norm = parameter_norm(pl_module)
        if math.isnan(norm):  # NaN weights give NaN losses: the module's check names the update
            return
        ref = self.initial_norm
        if math.isinf(norm) or (ref and norm > self.max_norm_ratio * ref):
            self._stop(
                trainer,
                f"the parameter norm {norm:.6g} at {where} is "
                + (f"{norm / ref:.3g}x" if ref and math.isfinite(norm) else "far above")
                + f" its value before training ({ref:.6g}; callbacks.divergence."
                f"max_norm_ratio={self.max_norm_ratio:g})",
            )

    @staticmethod
    def _stop(trainer, why: str) -> None:
        ckpt = trainer.checkpoint_callback
        last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
        kept = (
            f"{last} holds the last weights that passed this check (ckpt_path=last resumes)"
            if last is not None and last.is_file()
            else "No checkpoint was written"
        )
        raise NumericalError(
            f"training diverged: {why}. {kept}; lower model.lr or set model.clip_grad_norm"
        )
