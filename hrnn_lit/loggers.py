"""Logger plumbing around Lightning's loggers: W&B run naming, final results, clean finish.

W&B: one run per job; group = the Hydra sweep (its directory name) so a sweep's jobs sit
together on the dashboard, name = the job's overrides. Set WANDB_MODE=offline on machines
without network (runs stay syncable with ``wandb sync``); Lightning's WandbLogger logs on
rank 0 only.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger


def hydra_job_info() -> tuple[str | None, str | None]:
    """(sweep group, job name) from the running Hydra job, or (None, None)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # not under hydra.main (tests, notebooks)
        return None, None
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return group, hc.job.override_dirname or None


def name_wandb_runs(logger_cfgs: dict) -> None:
    """Fill W&B ``group`` and ``name`` from the Hydra job where the config leaves them null."""
    group, name = hydra_job_info()
    for cfg in logger_cfgs.values():
        if str(cfg.get("_target_", "")).endswith("WandbLogger"):
            if cfg.get("group") is None:
                cfg.group = group
            if cfg.get("name") is None:
                cfg.name = name


def resume_wandb_runs(logger_cfgs: dict, run_id: str | None) -> None:
    """A resumed run continues the checkpoint's W&B run (same id) unless the config names one."""
    if not run_id:
        return
    for cfg in logger_cfgs.values():
        if str(cfg.get("_target_", "")).endswith("WandbLogger") and not cfg.get("id"):
            cfg.id = run_id
            cfg.resume = "allow"


def keep_csv_history(loggers: list[Logger], batches_done: int) -> None:
    """A resumed run appends to ``csv/metrics.csv``: the rows logged before the checkpoint
    are kept (Lightning's CSV writer would delete the file), rows at or after its step are
    dropped, since the resumed run logs them again."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        header, rows = [], []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if _step(r) < batches_done]
        writer = logger.experiment  # deletes the old file
        if not header:
            continue
        writer.metrics_keys = sorted(header)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
            out.writeheader()
            out.writerows(rows)
        os.replace(tmp, path)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def log_results(loggers: list[Logger], results: dict) -> None:
    """Final metrics to every logger; W&B also gets the breakdowns as tables and charts."""
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and "_by_" not in k}
    for logger in loggers:
        logger.log_metrics(scalars)
        if isinstance(logger, WandbLogger):
            _wandb_breakdowns(logger, results)
        logger.save()


def _wandb_breakdowns(logger: WandbLogger, results: dict) -> None:
    import wandb

    for by in ("position", "history"):
        prefix = f"test_by_{by}/"
        groups = sorted({int(k.split("/")[1]) for k in results if k.startswith(prefix)})
        if not groups:
            continue
        metrics = sorted({k.split("/")[2] for k in results if k.startswith(prefix)} - {"n_events"})
        rows = [[g] + [results[f"{prefix}{g}/{m}"] for m in metrics] for g in groups]
        table = wandb.Table(columns=[by, *metrics], data=rows)
        charts = {
            f"test_by_{by}/{m}": wandb.plot.line(table, by, m, title=f"test {m} by {by}")
            for m in metrics
            if m.startswith("recall@")
        }
        logger.experiment.log({f"test_by_{by}/table": table, **charts})


def finish(loggers: list[Logger]) -> None:
    """Close W&B runs (one per job, also when the job failed)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish()
