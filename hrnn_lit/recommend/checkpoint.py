"""What a checkpoint carries for recommending (docs/design.md §13), and reading it back.

Every checkpoint of a run holds the item ids of the catalogue (index order), the session
rule of the model's preprocessing and the events file's column settings; the run's final
``last.ckpt`` also holds the users it was trained on with their states after their
training events (the ``train`` split: everything but each user's held-out last session).
So recommending needs neither the training data nor its cache.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from omegaconf import DictConfig, OmegaConf

from hrnn_lit import checkpoints
from hrnn_lit.errors import ConfigError
from hrnn_lit.models.engine import takes
from hrnn_lit.recommend.ids import Ids
from hrnn_lit.recommend.recommender import PAYLOAD_KEY, Recommender

__all__ = ["PAYLOAD_KEY", "load", "payload", "recommender_for", "store_users"]

EVENTS_COLUMNS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp",
                  "time_unit": "s", "separator": None}  # fmt: skip


def payload(cfg: DictConfig, dm) -> dict:
    """Item ids, session rule and column settings of a run (small: written each time)."""
    pre = cfg.data.get("preprocess")
    pre = OmegaConf.to_container(pre, resolve=True) if pre is not None else {}
    source = cfg.data.get("source")
    columns = dict(EVENTS_COLUMNS)
    if source is not None and str(source.get("_target_", "")).endswith("read_events"):
        columns.update({k: source[k] for k in EVENTS_COLUMNS if k in source})
    if cfg.data.get("session_col"):  # sessions given by the data's files
        columns.update({k: cfg.data.get(k) for k in ("user_col", "item_col", "time_col")})
        columns["session_col"] = cfg.data.session_col
    return {
        "items": Ids(dm.item_ids).payload(),
        "user_ids": Ids(dm.user_ids).payload(),  # the users api.Context.user indexes
        "session_gap": pre.get("session_gap") if not cfg.data.get("session_col") else None,
        "dedupe": bool(pre.get("dedupe", False)),
        "columns": columns,
        "name": cfg.model.get("name"),
    }


def store_users(path: Path, rec: Recommender, train: pl.DataFrame) -> int:
    """Observe each user's training events (``train``: user, item, ts, session) and write
    the users' table into the checkpoint at ``path`` (atomically). Returns the users."""
    rec.observe_many(train.with_columns(pl.col("session").cast(pl.Int64)), "user", "item",
                     "ts", session_col="session")  # fmt: skip
    ckpt = checkpoints.read(path)
    ckpt.setdefault(PAYLOAD_KEY, {})["users"] = rec.users.payload()
    tmp = path.with_name(f".{path.name}.users.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return len(rec.users)


def recommender_for(module, info: dict, device: str = "cpu") -> Recommender:
    """A recommender over a trained module's network, with no users yet."""
    users = Ids(info["user_ids"]) if "user_ids" in info else None
    return Recommender(
        module.net, Ids(info["items"]), info.get("session_gap"), info.get("dedupe", True),
        name=str(info.get("name") or type(module.net).__name__), device=device, user_ids=users,
    )  # fmt: skip


def load(path: Path, device: str = "cpu") -> Recommender:
    """The recommender a checkpoint describes (one-line errors for files that are not)."""
    from hydra.utils import instantiate

    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint {path} not found")
    ckpt = checkpoints.read(path)
    info = ckpt.get(PAYLOAD_KEY)
    config = checkpoints.saved_model_config(ckpt)
    if not info or config is None:
        raise ConfigError(
            f"ckpt_path: {path} carries no item ids for recommending (written by an earlier "
            "version of hrnn_lit): train it again to recommend from it"
        )
    items = Ids(info["items"])
    sizes = {"n_items": len(items)}
    if takes(config.get("_target_"), "n_users"):
        sizes["n_users"] = len(info["user_ids"]) if "user_ids" in info else 0
    module = instantiate(config, **sizes, _convert_="all")
    checkpoints.check_fits(module, ckpt, path)
    checkpoints.load_weights(module, ckpt)
    rec = recommender_for(module, info, device)
    rec.columns = dict(info.get("columns") or {})
    if info.get("users"):
        rec.users.load(info["users"])
    return rec
