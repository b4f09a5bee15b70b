"""The tasks behind the CLI: ``train`` (fit + test + results.json) and ``prepare``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hrnn_lit import checkpoints, distributed, launch, runtime
from hrnn_lit.callbacks import RunRecord, Throughput
from hrnn_lit.config import own_network, validate
from hrnn_lit.data.preprocess import split_stats
from hrnn_lit.errors import HrnnError
from hrnn_lit.evaluation.evaluator import breakdowns
from hrnn_lit.loggers import (
    finish,
    keep_csv_history,
    log_results,
    name_wandb_runs,
    resume_wandb_runs,
)
from hrnn_lit.models.engine import takes
from hrnn_lit.recommend import checkpoint as recommending


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_info(cfg: DictConfig) -> dict:
    """What a result depends on besides the config: versions, git revision, command."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in (
        "hrnn_lit",
        "torch",
        "pytorch-lightning",
        "hydra-core",
        "omegaconf",
        "polars",
        "numpy",
        "wandb",
    ):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    repo = Path(__file__).resolve().parents[1]
    git = {"revision": None, "dirty": None}
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if rev.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            )
            git = {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    from hrnn_lit.ops import native

    return {
        "seed": cfg.seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git": git,
        "argv": sys.argv,
        "native_kernels": native.load() is not None,  # CPU speed; results as torch, to rounding
    }


def _instantiate(node, **kwargs):
    """hydra.utils.instantiate, letting our one-line errors through Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, HrnnError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def format_metrics(results: dict, stage: str = "test") -> str:
    """The metrics table printed at the end of a run: one row per K."""
    ks = sorted({int(k.split("@")[1]) for k in results if k.startswith(f"{stage}/recall@")})
    lines = [
        f"{stage} metrics: {results.get('model')} on {results.get('data')}, seed "
        f"{results.get('seed')}, {int(results.get(f'{stage}/n_events', 0))} events, ties "
        f"{results.get('eval/ties')}",
        f"{'K':>4} {'Recall':>8} {'MRR':>8} {'NDCG':>8}",
    ]
    for k in ks:
        lines.append(
            f"{k:>4} {results[f'{stage}/recall@{k}']:>8.4f} {results[f'{stage}/mrr@{k}']:>8.4f} "
            f"{results[f'{stage}/ndcg@{k}']:>8.4f}"
        )
    return "\n".join(lines)


def format_stats(stats: dict) -> str:
    """The paper's Table 1 columns, one row per split."""
    lines = [f"{'split':<12} {'users':>8} {'items':>8} {'sessions':>9} {'events':>10}"]
    for name, s in stats.items():
        lines.append(
            f"{name:<12} {s['users']:>8} {s['items']:>8} {s['sessions']:>9} {s['events']:>10}"
        )
    return "\n".join(lines)


def prepare(cfg: DictConfig) -> dict:
    """Run only the data pipeline: write the splits (Parquet) and stats.json, print stats."""
    dm = _instantiate(cfg.data)
    splits = dm.load_splits()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items().items():
        tmp = out / f".{name}.parquet.tmp"
        frame.write_parquet(tmp)
        os.replace(tmp, out / f"{name}.parquet")
    stats = {name: split_stats(frame) for name, frame in splits.items().items()}
    write_json(out / "stats.json", stats)
    state = "cached" if dm.cache_hit else "processed"
    print(f"{cfg.data.name}: {state} ({dm.path or 'generated in memory'})")
    print(format_stats(stats))
    print(f"splits and stats.json: {out}")
    return stats


def train(cfg: DictConfig) -> dict:
    """Fit on the fit split (``mode=train``; ``mode=test`` loads ``ckpt_path`` instead), test
    on the test split, write results.json. With ``trainer.devices=N > 1`` this runs as rank
    0 of N data-parallel processes (hrnn_lit.launch); ranks 1..N-1 run ``worker_main``."""
    world = launch.setup(cfg, worker=[sys.executable, "-m", "hrnn_lit.run"])
    ok = False
    try:
        results = _train_rank(cfg, world)
        ok = True
    finally:
        launch.teardown(world, failed=not ok)
    return results


def _train_rank(cfg: DictConfig, world: launch.World) -> dict:
    runtime.keep_freed_memory()
    # default: the CPUs this process may use, shared by this machine's ranks (and by a
    # joblib multirun's jobs); fewer later if the cores turn out shared (ContentionGuard)
    torch.set_num_threads(cfg.get("num_threads") or runtime.default_threads(world.local_size))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    ckpt_file, ckpt, note = _read_checkpoint(cfg)  # mode=test: the checkpoint's model config
    if world.is_main and note:
        print(note)
    if world.is_main:  # next to results.json: the exact config and what else it depends on
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        write_json(out / "run_info.json", run_info(cfg))
    dm = _instantiate(cfg.data)
    dm.shard(world.rank, world.size)
    dm.setup("fit")
    if world.is_main:
        for line in dm.notices:  # data stage (generated / preprocessed / cache), clamps
            print(line)
    users = {"n_users": dm.n_users} if takes(cfg.model.get("_target_"), "n_users") else {}
    model = _instantiate(
        cfg.model,
        _convert_="all",  # plain lists in hparams: checkpoints load with weights_only
        n_items=dm.n_items,
        **users,  # the user vocabulary's size, for networks that learn per user
        item_counts=dm.item_counts,
        ks=list(cfg.eval.ks),
        ties=cfg.eval.ties,
    )
    # the test's repeat shares cost a pass over the catalogue for many rows (design §6)
    model.evaluation.repeat_share = bool(cfg.eval.get("repeat_share", True))
    if world.is_main and getattr(model, "engine", None):  # which engine trains it
        write_json(out / "run_info.json", {**run_info(cfg), "engine": model.engine})
    resumed = None
    if ckpt is not None and cfg.mode == "test":
        checkpoints.check_fits(model, ckpt, ckpt_file)
        model.load_state_dict(checkpoints.state_dict_of(ckpt))
    elif ckpt is not None:
        checkpoints.check_resume(model, ckpt, ckpt_file)
        resumed = {
            "from": str(ckpt_file),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "changed": {
                **checkpoints.resume_changes(model, ckpt),
                **checkpoints.check_data(ckpt, checkpoints.plan_settings(dm), ckpt_file),
            },
        }
        if world.is_main:
            changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in resumed["changed"].items())
            note = f"; changed: {changed} (applied)" if changed else ""
            print(
                f"resuming from {ckpt_file} (epoch {resumed['epoch']}, update "
                f"{resumed['global_step']}){note}"
            )
    if torch.distributed.is_initialized():  # on this rank's device, then rank 0's weights
        distributed.replicate(model, world.device)
    if world.size > 1:
        torch.manual_seed(cfg.seed * 1000 + world.rank)  # own negatives and dropout per rank
    throughput = Throughput()
    record = RunRecord(
        OmegaConf.to_container(cfg.model, resolve=True),
        checkpoints.plan_settings(dm),
        recommending.payload(cfg, dm),  # item ids and session rule: recommending needs them
    )
    guard = runtime.ContentionGuard(adapt=not cfg.get("num_threads"), verbose=world.is_main)
    callbacks = [throughput, record, guard]
    loggers = []
    if not world.is_main and cfg.get("callbacks") and cfg.callbacks.get("divergence"):
        # every rank holds the same weights: all stop together instead of waiting on rank 0
        callbacks.append(instantiate(cfg.callbacks.divergence))
    if world.is_main:
        callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
        logger_cfgs = OmegaConf.create(
            OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
        )
        name_wandb_runs(logger_cfgs)
        if resumed is not None:
            resume_wandb_runs(logger_cfgs, (ckpt.get(checkpoints.RECORD_KEY) or {}).get("wandb_id"))
        loggers = [instantiate(c) for c in logger_cfgs.values()]
        if resumed is not None:
            keep_csv_history(loggers, checkpoints.batches_done(ckpt))
    del ckpt  # the trainer reads the file again when it resumes
    try:
        results = _fit_and_test(
            cfg, dm, model, callbacks, loggers, throughput, world, ckpt_file if resumed else None
        )
        results.update(guard.summary())  # threads at the start and the end
        if resumed is not None:
            resumed["changed"].update(record.changed)
            results["resumed_from"] = resumed
        log_results(loggers, results)
    finally:
        finish(loggers)
    if world.is_main:
        last = checkpoints.checkpoint_dir(cfg) / "last.ckpt"
        saving = OmegaConf.select(cfg, "callbacks.model_checkpoint") is not None
        if cfg.mode == "train" and saving and not getattr(model, "trainable", True):
            entries = {"model_config": record.model_config, "data": record.data}
            checkpoints.save_fitted(last, model, {checkpoints.RECORD_KEY: entries,
                                                  recommending.PAYLOAD_KEY: record.recommend})
        if cfg.mode == "train" and last.is_file():
            # the users with their states after their training events (mode=recommend)
            rec = recommending.recommender_for(model, record.recommend, model.device)
            recommending.store_users(last, rec, dm.splits.train)
        write_json(out / "results.json", results)
        print(format_metrics(results))
        print(f"results: {out / 'results.json'}")
    return results


def _read_checkpoint(cfg: DictConfig) -> tuple[Path | None, dict | None, str | None]:
    """(file, contents, line to print) of the checkpoint ``ckpt_path`` names; for
    ``mode=test`` ``cfg.model`` becomes the checkpoint's model config."""
    path = checkpoints.resolve(cfg)
    if path is None:
        return None, None, None
    ckpt = checkpoints.read(path)
    note = None
    if cfg.mode == "test":
        note = checkpoints.model_config_for_test(cfg, ckpt, path)
    return path, ckpt, note


def _fit_and_test(cfg, dm, model, callbacks, loggers, throughput, world, ckpt_file=None) -> dict:
    per_rank = {}
    if world.size > 1:  # one single-device Trainer per rank
        gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda")
        per_rank = {"devices": [world.local_rank] if gpu else 1, "strategy": "auto"}
        if not world.is_main:
            per_rank["enable_progress_bar"] = False
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        limit_val_batches=None if dm.has_validation else 0,
        **per_rank,
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if cfg.mode == "test":
        pass  # evaluate the loaded checkpoint only
    elif getattr(model, "trainable", True):
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_file) if ckpt_file else None)
        distributed.check_in_sync(model)
    else:  # non-neural baselines: fit from the training steps, no gradient steps
        t0 = time.perf_counter()
        model.fit_data(dm.fit_steps)
        throughput.train_events = len(dm.fit_steps)
        throughput.train_seconds = time.perf_counter() - t0
        if dm.has_validation:
            trainer.validate(model, datamodule=dm, verbose=False)
    trainer.test(model, datamodule=dm, verbose=False)

    results = {
        "model": cfg.model.name,
        "engine": getattr(model, "engine", None),
        "data": cfg.data.name,
        "seed": cfg.seed,
        "world_size": world.size,
        "eval/ties": cfg.eval.ties,
        "n_items": dm.n_items,
        "data/n_dropped_test_events": dm.n_dropped["test"],
        "data/n_test_users_without_history": dm.n_without_history["test"],
        **throughput.rates(),  # perf/: totals over the ranks and per process (Throughput)
        **model.eval_metrics.get("val", {}),
        **model.eval_metrics["test"],
        **breakdowns(model.eval_outputs["test"], list(cfg.eval.ks)),
    }
    return results


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    own_network(cfg, checkpoints.explicit_overrides())  # a swapped model.net: its own name
    if cfg.mode == "recommend":
        from hrnn_lit.recommend.cli import recommend

        return recommend(cfg)
    return prepare(cfg) if cfg.mode == "prepare" else train(cfg)


def worker_main(cfg_file: str) -> None:
    """Entry of ranks 1..N-1 that ``train`` starts (``python -m hrnn_lit.run CONFIG``,
    hrnn_lit.launch): the job's resolved config, no Hydra."""
    from hrnn_lit.quiet import quiet

    quiet()  # its log file: the same lines as rank 0's console
    train(OmegaConf.load(cfg_file))


if __name__ == "__main__":
    worker_main(sys.argv[1])
