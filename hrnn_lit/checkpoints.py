"""Which checkpoint a run starts from, and whether it fits: ``ckpt_path`` resolution, the
checks that turn a wrong file into one line, and what a resumed run changes.

``ckpt_path`` (config.yaml): ``last`` resumes from this run directory's ``last.ckpt`` and
stops with one line when there is none; ``auto`` resumes from it when it exists and starts
fresh otherwise (for jobs that a cluster may requeue); any other value is a file.
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from hrnn_lit.errors import ConfigError

FITTED_KEY = "hrnn_lit_fitted"  # a baseline's tables fitted from data (save_fitted)
RECORD_KEY = "hrnn_lit_run"  # what RunRecord adds to a checkpoint: model config, W&B run id
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay")  # applied to a resumed optimiser
# network classes that moved (issue 27's layout): checkpoints name them by their old path
MOVED = {
    f"hrnn_lit.models.{old}": f"hrnn_lit.nets.{new}"
    for old, new in (
        ("attention_hrnn.AttentionHRNN", "attention_hrnn.AttentionHRNN"),
        ("history.HistoryHRNN", "history.HistoryHRNN"),
        ("core.RecurrentCore", "recurrent.RecurrentCore"),
    )
}
# hyperparameters that only matter while training: a mode=test run may differ in them
TRAINING_ONLY = (
    "lr", "momentum", "adagrad_eps", "weight_decay", "clip_grad_norm", "optimizer", "loss", "bpreg",
    "n_sample", "sample_alpha", "dropout_session", "dropout_user", "dropout_init", "ks",
    "ties", "eval_block", "cuda_graph", "engine",
)  # fmt: skip


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where this run's checkpoint callback writes (``last.ckpt`` lives there)."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def resolve(cfg: DictConfig) -> Path | None:
    """The checkpoint file ``ckpt_path`` names (None: start fresh)."""
    value = cfg.get("ckpt_path")
    if value is None or value == "":
        return None
    if value in ("last", "auto"):
        last = checkpoint_dir(cfg) / "last.ckpt"
        if last.is_file():
            return last
        if value == "auto":
            return None
        raise ConfigError(
            f"ckpt_path=last: nothing to resume, {last} does not exist (resume with the "
            "same hydra.run.dir as the run to continue; ckpt_path=auto starts fresh when "
            "there is no checkpoint)"
        )
    path = Path(str(value))
    if not path.exists():
        raise ConfigError(f"ckpt_path: checkpoint {path} not found")
    if not path.is_file():
        raise ConfigError(f"ckpt_path: {path} is not a file")
    return path


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read(path: Path) -> dict:
    """The checkpoint's contents, or one line saying why the file is not a checkpoint.

    A checkpoint is data (docs/reliability.md, "Security"): it is read with
    ``weights_only=True``, so unpickling builds tensors and plain containers only and never
    calls anything the file names. A file that needs more is refused, naming what it holds."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, another format
        found = _GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:  # a pickle that would build or call something: never loaded
            raise ConfigError(
                f"ckpt_path: {path} holds objects that a checkpoint does not need "
                f"({found.group(1)}); refusing to load it (hrnn_lit reads checkpoints as data "
                "only: a file written by hrnn_lit holds tensors and plain values, so this one "
                "was changed or written by other code)"
            ) from None
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if isinstance(e, pickle.UnpicklingError):  # torch's preamble, then the cause
            lines = [ln for ln in lines if ln.startswith(("Unsupported", "Trying"))] or lines
        reason = (lines or [""])[0][:120]
        raise ConfigError(
            f"ckpt_path: {path} is not a readable checkpoint ({type(e).__name__}: {reason})"
        ) from None
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise ConfigError(f"ckpt_path: {path} is not a checkpoint (not a dict of tensors)")
    return ckpt


def state_dict_of(ckpt: dict) -> dict:
    """Lightning checkpoint -> its ``state_dict``; a bare state dict as it is."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError("ckpt_path: the file holds no model weights (state_dict)")
    return state


def _show(v) -> str:
    return repr(list(v) if isinstance(v, tuple) else v)


def hparam_diffs(saved: dict, current: dict, skip=()) -> list[str]:
    """``key: A in the checkpoint, B here`` for each differing hyperparameter."""
    keys = [k for k in ("n_items", "name") if k in saved] + sorted(set(saved) - {"n_items", "name"})
    out = []
    for k in keys:
        if k in skip or k not in current:
            continue
        a, b = saved[k], current[k]
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            shown = k if k == "n_items" else f"model.{k}"
            out.append(f"{shown}: {_show(a)} in the checkpoint, {_show(b)} here")
    return out


def check_fits(model, ckpt: dict, path: Path) -> None:
    """One line when the checkpoint's weights do not fit ``model`` (other sizes, another
    model kind, other data), naming the hyperparameters that differ."""
    state = state_dict_of(ckpt)
    own = model.state_dict()
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if not (wrong or missing or unexpected):
        return
    diffs = hparam_diffs(ckpt.get("hyper_parameters") or {}, dict(model.hparams), TRAINING_ONLY)
    if diffs:
        why = "; ".join(diffs[:4])
        if diffs[0].startswith("n_items"):
            why += " (another dataset or preprocessing?)"
    elif wrong:
        why = f"{wrong[0]} has shape {list(state[wrong[0]].shape)} in the checkpoint, " + (
            f"{list(own[wrong[0]].shape)} here"
        )
    else:
        key = (missing or unexpected)[0]
        why = f"{key} is {'missing from' if missing else 'only in'} the checkpoint"
    raise ConfigError(f"ckpt_path: {path} does not fit this model ({why})")


def check_resume(model, ckpt: dict, path: Path) -> None:
    """Before resuming training: the weights fit and the optimiser kind is unchanged (its
    state would not carry over)."""
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ConfigError(
            f"ckpt_path: {path} holds weights only, not a training state to resume "
            "(mode=test evaluates it)"
        )
    check_fits(model, ckpt, path)
    saved = (ckpt.get("hyper_parameters") or {}).get("optimizer")
    current = model.hparams.get("optimizer")
    if saved is not None and current is not None and saved != current:
        raise ConfigError(
            f"model.optimizer: {path} was trained with {saved!r}; resuming with {current!r} "
            f"is not supported (its state does not carry over): keep model.optimizer={saved} "
            "or start fresh"
        )


def resume_changes(model, ckpt: dict) -> dict[str, list]:
    """Hyperparameters the resumed run changes: {"model.key": [checkpoint's, now]}."""
    saved = ckpt.get("hyper_parameters") or {}
    out = {}
    for k in sorted(saved):
        if k in model.hparams and saved[k] != model.hparams[k]:
            a, b = saved[k], model.hparams[k]
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b):
                continue
            out[f"model.{k}"] = [a, b]
    return out


def apply_optimizer_hparams(trainer, pl_module) -> dict[str, list]:
    """Set the module's lr / momentum / weight_decay on every optimiser parameter group
    (a restored optimiser keeps the checkpoint's); returns what changed."""
    hp = pl_module.hparams
    changed = {}
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for k in OPTIMIZER_KEYS:
                if k in hp and k in group and group[k] != hp[k]:
                    changed[f"model.{k}"] = [group[k], hp[k]]
                    group[k] = hp[k]
    return changed


# ------------------------------------------------------------------- mode=test


def explicit_overrides() -> list[str] | None:
    """The command line's overrides (None outside a Hydra run: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return None


def saved_model_config(ckpt: dict) -> dict | None:
    """The model config a checkpoint was built from (a network class of an earlier layout
    named at its new place), or None when it carries none (an older version wrote it)."""
    saved = (ckpt.get(RECORD_KEY) or {}).get("model_config")
    if not saved:
        return None
    saved = copy.deepcopy(saved)
    net = saved.get("net")
    if isinstance(net, dict) and net.get("_target_") in MOVED:
        net["_target_"] = MOVED[net["_target_"]]
    return saved


def load_weights(model, ckpt: dict) -> None:
    """The checkpoint's weights into ``model`` (after ``check_fits``), and a baseline's
    tables fitted from data (``save_fitted``), whatever their sizes."""
    for name, table in (ckpt.get(FITTED_KEY) or {}).items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = table
    model.load_state_dict(state_dict_of(ckpt))


def save_fitted(path: Path, model, extra: dict) -> None:
    """A checkpoint of a model fitted from data without training (the baselines): its
    buffers (sized by the data) and ``extra`` entries, written atomically."""
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        FITTED_KEY: {k: v.detach().cpu() for k, v in model.named_buffers()},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.fitted.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def model_config_for_test(cfg: DictConfig, ckpt: dict, path: Path) -> str | None:
    """``mode=test``: the model config comes from the checkpoint (``cfg.model`` replaced;
    ``model.key=value`` overrides on the command line still apply). An explicit ``model=X``
    that names another model stops with one line. Returns the line to print, or None when
    the checkpoint carries no model config (written by an older version)."""
    saved = saved_model_config(ckpt)
    if not saved:
        return None
    overrides = explicit_overrides() or []
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    current = OmegaConf.to_container(cfg.model, resolve=True)
    if chosen:
        keys = ("_target_", "name") + tuple(
            k for k in saved if k not in TRAINING_ONLY and k not in ("_target_", "name")
        )
        diffs = [
            f"{k}: {_show(saved.get(k))} in the checkpoint, {_show(current.get(k))} here"
            for k in keys
            if k in saved and k in current and saved.get(k) != current.get(k)
        ]
        if diffs:
            raise ConfigError(
                f"model={chosen[-1]} conflicts with ckpt_path {path} ("
                + "; ".join(diffs[:3])
                + "): drop model= to use the checkpoint's model config"
            )
    model = OmegaConf.create(saved)
    for o in overrides:  # model.key=value on the command line: its composed value
        if o.startswith(("model.", "+model.", "++model.")) and "=" in o:
            key = o.lstrip("+").split("=", 1)[0]
            value = OmegaConf.select(cfg, key)
            OmegaConf.update(model, key[len("model.") :], value, force_add=True)
    with open_dict(cfg):
        cfg.model = model
    return f"mode=test: model {saved.get('name')} as configured in {path}"


def batches_done(ckpt: dict) -> int:
    """Lightning's logging step at the checkpoint (training batches done): logged rows at
    this step or later belong to the part of the run the resume repeats."""
    loops = (ckpt.get("loops") or {}).get("fit_loop") or {}
    state = loops.get("epoch_loop.state_dict") or {}
    return int(state.get("_batches_that_stepped", 0))


# the settings that fix an epoch's plan: a mid-epoch checkpoint only continues under them
PLAN_KEYS = ("batch_size", "steps_per_batch", "shuffle_users", "seed", "fit_split", "data_key")


def plan_settings(dm) -> dict:
    """The datamodule's plan settings as used (``batch_size`` after clamping)."""
    return {k: getattr(dm, k) for k in PLAN_KEYS if hasattr(dm, k)}


def mid_epoch(ckpt: dict) -> bool:
    """Whether the checkpoint was written inside an epoch (not at its end)."""
    loops = (ckpt.get("loops") or {}).get("fit_loop") or {}
    progress = loops.get("epoch_loop.batch_progress") or {}
    done = (progress.get("current") or {}).get("processed", 0)
    return done > 0 and not progress.get("is_last_batch", False)


def check_data(ckpt: dict, now: dict, path: Path) -> dict[str, list]:
    """Plan settings changed since the checkpoint: refused (one line) when it was written
    mid-epoch, since the rest of that epoch would be another plan's; else returned as
    {"data.key": [checkpoint's, now]} to record."""
    saved = (ckpt.get(RECORD_KEY) or {}).get("data") or {}
    diffs = {
        k: [saved[k], now[k]] for k in PLAN_KEYS if k in saved and k in now and saved[k] != now[k]
    }
    if diffs and mid_epoch(ckpt):
        k, (a, b) = next(iter(diffs.items()))
        if k == "data_key":
            raise ConfigError(
                f"data: the splits differ from those {path} was trained on (data key {a}, "
                f"now {b}: another file or preprocessing); a mid-epoch checkpoint cannot "
                "continue on other data"
            )
        raise ConfigError(
            f"data.{k}: {path} was written mid-epoch with data.{k}={a}; resuming with {b} "
            f"cannot continue that epoch (resume with data.{k}={a}, or from a checkpoint "
            "written at an epoch end)"
        )
    return {f"data.{k}": v for k, v in diffs.items()}
