"""Checks on the composed config, so a bad value stops the run with one line naming its key."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf, open_dict

from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.metrics import TIES
from hrnn_lit.models.engine import ENGINES, REMOVED, resolve_engine
from hrnn_lit.nets.recurrent import (
    ACTIVATIONS,
    GRU_INITS,
    GRU_VARIANTS,
    PROPAGATIONS,
    RESETS,
    parse_activation,
)
from hrnn_lit.ops.losses import LOSSES
from hrnn_lit.ops.optim import ADAGRAD_EPS
from hrnn_lit.ops.optim import KINDS as OPTIMIZERS

MODES = ("train", "test", "prepare", "recommend")
PRECISIONS = ("32-true", "32", "bf16-mixed", "64-true")  # 64-true: float64, reference checks
# keys of the built-in network (conf/model/hrnn_init.yaml): a custom model.net has its own
BUILTIN_NET_KEYS = (
    "hidden_size", "user_hidden_size", "user_propagation", "user_to_output",
    "user_to_session_act", "reset_at", "final_act", "embedding", "constrained_embedding",
    "dropout_embed", "dropout_hidden", "dropout_session", "dropout_user", "dropout_init",
    "gru_variant", "gru_init",
)  # fmt: skip


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as e:  # missing mandatory value or bad interpolation
        raise ConfigError(f"{key}: {e}".splitlines()[0]) from None


def _int(cfg: DictConfig, key: str, minimum: int, optional: bool = False) -> None:
    v = _get(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {v!r}")


def _float(cfg: DictConfig, key: str, lo: float, hi: float | None = None) -> None:
    v = _get(cfg, key)
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)  # nan passes every comparison; inf is no setting either
        or v < lo
        or (hi is not None and v > hi)
    ):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key} must be a number {rng}, got {v!r}")


def _choice(cfg: DictConfig, key: str, choices) -> None:
    v = _get(cfg, key)
    if v not in choices:
        raise ConfigError(f"{key} must be one of {sorted(choices)}, got {v!r}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value found."""
    _choice(cfg, "mode", MODES)
    _int(cfg, "seed", 0)
    _int(cfg, "num_threads", 1, optional=True)
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.eval_batch_size", 1)
    _int(cfg, "data.steps_per_batch", 1)
    _choice(cfg, "data.fit_split", ("valid_train", "train"))
    if cfg.mode == "prepare":
        return
    if cfg.mode == "recommend":
        if not cfg.get("ckpt_path"):
            raise ConfigError("ckpt_path must name a checkpoint when mode=recommend")
        _int(cfg, "recommend.k", 1)
        _choice(cfg, "recommend.at", ("next", "new_session"))
        _choice(cfg, "recommend.exclude", ("none", "session", "history"))
        _int(cfg, "recommend.session_gap", 0, optional=True)
        return
    if cfg.mode == "test" and not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path must name a checkpoint when mode=test")
    devices = _get(cfg, "trainer.devices")
    if not (isinstance(devices, int) and devices >= 1 or OmegaConf.is_list(devices)):
        raise ConfigError(f"trainer.devices must be an integer >= 1 or a list, got {devices!r}")
    ks = _get(cfg, "eval.ks")
    if not OmegaConf.is_list(ks) or len(ks) == 0:
        raise ConfigError(f"eval.ks must be a non-empty list of positive integers, got {ks!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"eval.ks must hold positive integers, got {k!r}")
    _choice(cfg, "eval.ties", TIES)
    if not isinstance(cfg.eval.get("repeat_share", True), bool):
        raise ConfigError(f"eval.repeat_share must be true or false, got {cfg.eval.repeat_share!r}")
    _int(cfg, "trainer.max_epochs", 1)
    precision = OmegaConf.select(cfg, "trainer.precision", default="32-true")
    if str(precision) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {list(PRECISIONS)} (bf16-mixed: the output "
            f"layer's backward products in bfloat16; 64-true: float64), got {precision!r}"
        )
    if OmegaConf.select(cfg, "callbacks.model_checkpoint") is not None:
        # optimiser updates (one per time step); saved at the first batch end past each multiple
        _int(cfg, "callbacks.model_checkpoint.every_n_train_steps", 1, optional=True)
        if OmegaConf.select(cfg, "callbacks.model_checkpoint.every_n_minutes") is not None:
            _float(cfg, "callbacks.model_checkpoint.every_n_minutes", 0.0)
    if OmegaConf.select(cfg, "callbacks.divergence") is not None:
        _float(cfg, "callbacks.divergence.max_norm_ratio", 1.0)
        _float(cfg, "callbacks.divergence.max_loss_ratio", 1.0)
        _int(cfg, "callbacks.divergence.check_every", 1)
    if "loss" in cfg.model:
        validate_training(cfg)
    if OmegaConf.select(cfg, "model.net") is None and "hidden_size" in cfg.model:
        validate_rnn(cfg)


def validate_training(cfg: DictConfig) -> None:
    """Keys of the trained models (any network of the model API); a key a model's config
    leaves out takes the module's default."""
    m = cfg.model
    net = OmegaConf.select(cfg, "model.net")
    if net is not None and (not OmegaConf.is_dict(net) or "_target_" not in net):
        raise ConfigError(f"model.net must be a config with a _target_ (a class), got {net!r}")
    checks = {
        "engine": (_choice, ENGINES + tuple(REMOVED)),
        "loss": (_choice, LOSSES),
        "optimizer": (_choice, OPTIMIZERS),
        "adagrad_eps": (_choice, ADAGRAD_EPS),
        "n_sample": (_int, 0),
        "sample_alpha": (_float, 0.0),
        "lr": (_float, 0.0),
        "momentum": (_float, 0.0, 0.999),
        "weight_decay": (_float, 0.0),
        "clip_grad_norm": (_float, 0.0),
        "bpreg": (_float, 0.0),
    }
    for key, (check, *args) in checks.items():
        if key in m:
            check(cfg, f"model.{key}", *args)
    if m.get("engine", "auto") in REMOVED:
        raise ConfigError(f"model.engine={m.engine}: {REMOVED[m.engine]}")
    graph = m.get("cuda_graph", False)
    if not isinstance(graph, bool):
        raise ConfigError(f"model.cuda_graph must be true or false, got {graph!r}")
    if graph:
        resolve_engine("auto", cuda_graph=True)  # retired: one line saying what to use


def validate_rnn(cfg: DictConfig) -> None:
    """Keys of the built-in recurrent network (session RNN, RNN Concat, HRNN)."""
    _int(cfg, "model.hidden_size", 1)
    _choice(cfg, "model.user_propagation", PROPAGATIONS)
    _choice(cfg, "model.reset_at", RESETS)
    if cfg.model.reset_at == "user" and cfg.model.user_propagation != "none":
        raise ConfigError("model.reset_at=user (RNN Concat) needs model.user_propagation=none")
    if cfg.model.user_propagation != "none":
        _int(cfg, "model.user_hidden_size", 1)
    try:
        parse_activation(_get(cfg, "model.final_act"))
    except ValueError as e:
        raise ConfigError(f"model.final_act {e}") from None
    _choice(cfg, "model.user_to_session_act", ACTIVATIONS)
    for key, choices in (("gru_variant", GRU_VARIANTS), ("gru_init", GRU_INITS)):
        if key in cfg.model:
            _choice(cfg, f"model.{key}", choices)
    for key in (
        "dropout_session",
        "dropout_user",
        "dropout_init",
        "dropout_embed",
        "dropout_hidden",
    ):
        if key in cfg.model:
            _float(cfg, f"model.{key}", 0.0, 0.999)
    m = cfg.model
    if "embedding" in m:
        _int(cfg, "model.embedding", 0)
    tied = m.get("constrained_embedding", False)
    if not isinstance(tied, bool):
        raise ConfigError(f"model.constrained_embedding must be true or false, got {tied!r}")
    if tied and m.get("embedding", 0):
        raise ConfigError(
            "model.constrained_embedding=true ties the input to the output item matrix: "
            f"set model.embedding=0 (got {m.embedding})"
        )
    if "logq" in m:
        _float(cfg, "model.logq", 0.0)



def own_network(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """A custom ``model.net`` on a built-in model's config (``model=session_rnn
    'model.net={_target_:pkg.Net}'``) makes the run the network's own: the built-in
    network's keys, which it ignores, leave ``cfg.model`` (so config.yaml, the checkpoint's
    model config and the logs do not show them) and the run is named after the network's
    class unless ``model.name`` is set on the command line. ``overrides``: the command
    line's (None outside Hydra); setting a built-in network's key there stops with one line,
    since the network would not see it."""
    net = OmegaConf.select(cfg, "model.net")
    ignored = [k for k in BUILTIN_NET_KEYS if net is not None and k in cfg.model]
    if not ignored:
        return
    target = str(net["_target_"])
    given = [o.lstrip("+~").split("=", 1)[0] for o in overrides or []]
    for k in ignored:
        if f"model.{k}" in given:
            own = f"{'' if k in net else '+'}model.net.{k}=..."
            raise ConfigError(
                f"model.{k}: a key of the built-in network, which model.net ({target}) "
                f"replaces; the network takes its own arguments (e.g. {own})"
            )
    with open_dict(cfg):
        for k in ignored:
            del cfg.model[k]
        if "model.name" not in given:
            cfg.model.name = target.rpartition(".")[2]
