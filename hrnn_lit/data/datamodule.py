"""User-sorted session DataModule: raw source -> splits -> user-parallel batch plans."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytorch_lightning as pl_lightning
import torch
from torch.utils.data import DataLoader

from hrnn_lit.data.batching import (
    PlanDataset,
    Steps,
    build_plan,
    build_steps,
    select_users,
    shard_users,
    user_lengths,
)
from hrnn_lit.data.cache import discard_entry, key_inputs, key_of, load_splits, report, save_splits
from hrnn_lit.data.preprocess import Splits, preprocess, split_stats
from hrnn_lit.errors import ConfigError, DataError

FIT_SPLITS = ("valid_train", "train")


class ResumeSampler(torch.utils.data.Sampler):
    """Chunk indices ``start..n-1`` of a resumed epoch, reporting the epoch's full length
    ``n``: Lightning counts a resumed epoch's batches on from the checkpoint's batch index
    and ends the epoch when that count equals the loader's length, so a loader shortened to
    the chunks left would end the epoch early (losing its last ``start`` chunks)."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, min(max(start, 0), n)

    def __iter__(self):
        return iter(range(self.start, self.n))

    def __len__(self) -> int:
        return self.n


class SessionDataModule(pl_lightning.LightningDataModule):
    """Trains on ``fit_split``; validates on ``valid_test`` (only when fitting on
    ``valid_train``, so validation never scores sessions seen in training); tests on
    ``test``. Evaluated users first replay their earlier sessions (history), then their
    held-out session is scored. The item catalogue is the fit split's items; held-out
    events with items outside it are removed before steps are built (``n_dropped_*``).
    """

    def __init__(
        self,
        source: Callable[[], pl.DataFrame],
        name: str = "data",
        path: str | None = None,
        preprocess: dict | None = None,
        cache_dir: str | None = None,
        generate: Callable[[str], object] | None = None,
        missing_hint: str = "",
        batch_size: int = 100,
        eval_batch_size: int = 512,
        steps_per_batch: int = 64,
        fit_split: str = "valid_train",
        shuffle_users: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if fit_split not in FIT_SPLITS:
            raise ConfigError(f"data.fit_split must be one of {FIT_SPLITS}, got {fit_split!r}")
        self.source = source
        self.name = name
        self.path = path
        self.preprocess_cfg = dict(preprocess or {})
        self.cache_dir = cache_dir
        self.generate = generate
        self.missing_hint = missing_hint
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.steps_per_batch = steps_per_batch
        self.fit_split = fit_split
        self.shuffle_users = shuffle_users
        self.seed = seed
        self.splits: Splits | None = None
        self.cache_hit = False
        self.rank, self.world_size = 0, 1
        self.notices: list[str] = []  # for the user: the data stage, clamped settings
        self.data_key: str | None = None  # the splits' identity (cache key), when computed

    def shard(self, rank: int, world_size: int) -> None:
        """Give this process a disjoint, step-balanced share of the users (DDP)."""
        self.rank, self.world_size = rank, world_size

    # ----------------------------------------------------------------- setup
    def load_splits(self) -> Splits:
        """Read + preprocess the raw data, or load the cached result of that. Records a
        one-line account in ``notices`` (generated / preprocessed in N s / loaded from the
        cache); a bad cache entry is reported on stderr and rebuilt."""
        t0 = time.perf_counter()
        generated = ""
        if self.path is not None and self.generate is not None and not Path(self.path).exists():
            self.generate(self.path)  # generated raw file (e.g. synthetic XING format)
            generated = f"generated {self.path} in {time.perf_counter() - t0:.1f} s, "
        if self.path is None and "path" in getattr(self.source, "keywords", {}):
            raise DataError(f"data.path is not set for data '{self.name}'. {self.missing_hint}")
        if self.path is not None and not Path(self.path).exists():
            raise DataError(f"{self.path}: file not found (data.path). {self.missing_hint}")
        if self.path is not None and not Path(self.path).is_file():
            raise DataError(f"{self.path}: not a regular file (data.path must name a file)")
        entry, inputs = None, None
        t1 = time.perf_counter()
        if self.cache_dir is not None or self.path is None:  # (no file digest to pay for)
            inputs = key_inputs(self.path, self.source, self.preprocess_cfg)
            self.data_key = key_of(inputs)
        if self.cache_dir is not None:
            key = self.data_key
            entry = Path(self.cache_dir) / f"{self.name}-{key}"
            cached, why = load_splits(entry, key)
            if cached is not None:
                self.cache_hit = True
                self.notices.append(
                    f"data {self.name}: loaded from the cache {entry} "
                    f"({time.perf_counter() - t1:.1f} s)"
                )
                return cached
            if why is not None:
                report(f"cache: {entry}: {why}; rebuilding the entry")
                discard_entry(entry)
        events = self.source()
        splits = preprocess(events, source=self.path or self.name, **self.preprocess_cfg)
        if entry is not None:
            save_splits(splits, entry, inputs)
        self.cache_hit = False
        what = "generated and preprocessed" if self.path is None else "preprocessed"
        where = f" (cached: {entry})" if entry is not None else ""
        self.notices.append(
            f"data {self.name}: {generated}{what} in {time.perf_counter() - t1:.1f} s{where}"
        )
        return splits

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = self.load_splits()
        fit = self.splits.train if self.fit_split == "train" else self.splits.valid_train
        counts = fit.group_by("item").agg(pl.len().alias("n")).sort("item")
        self.item_ids = counts.get_column("item")
        self.item_counts = counts.get_column("n").to_numpy().astype(np.int64)
        self._vocab = counts.select("item", pl.int_range(pl.len(), dtype=pl.Int64).alias("idx"))
        # the users a network may learn about (``api.Context.user``): the fit split's
        self.user_ids = fit.get_column("user").unique().sort()
        self._user_vocab = pl.DataFrame(
            {"user": self.user_ids, "user_index": np.arange(self.user_ids.len(), dtype=np.int64)}
        )
        self.fit_steps, _ = self._steps(fit)
        n_users = int(self.fit_steps.user_start.sum())
        if 0 < n_users < self.batch_size:  # slots no user could fill: same run, less memory
            self.notices.append(
                f"data.batch_size={self.batch_size} is more than the {n_users} users of the "
                f"fit split: using {n_users} (the same run as data.batch_size={n_users})"
            )
            self.batch_size = n_users
        self.eval_steps: dict[str, Steps] = {}
        self.n_dropped: dict[str, int] = {}
        self.n_without_history: dict[str, int] = {}
        if self.has_validation:
            self._add_eval("val", self.splits.valid_train, self.splits.valid_test)
        self._add_eval("test", self.splits.train, self.splits.test)
        # wider evaluation batches than users only add empty slots: same metrics, less memory
        most = max(int(st.user_start.sum()) for st in self.eval_steps.values())
        self.eval_batch_size = max(1, min(self.eval_batch_size, most))

    @property
    def n_items(self) -> int:
        return int(self.item_counts.size)

    @property
    def n_users(self) -> int:
        """Users of the fit split: the vocabulary of ``api.Context.user``."""
        return int(self.user_ids.len())

    @property
    def has_validation(self) -> bool:
        return self.fit_split == "valid_train"

    def stats(self) -> dict[str, dict[str, int]]:
        assert self.splits is not None, "call setup() first"
        return {k: split_stats(v) for k, v in self.splits.items().items()}

    def _steps(self, frame: pl.DataFrame, scored: bool | None = None) -> tuple[Steps, int]:
        """Map items to catalogue indices (dropping unknown ones) and build steps."""
        df = frame.join(self._vocab, on="item", how="inner", maintain_order="left")
        df = df.join(self._user_vocab, on="user", how="left", maintain_order="left")
        df = df.sort(["user", "session", "ts"], maintain_order=True)
        user = df.get_column("user").rank("dense").to_numpy()
        score = df.get_column("scored").to_numpy() if scored else None
        steps = build_steps(
            df.get_column("idx").to_numpy(), user, df.get_column("session").to_numpy(), score,
            time=df.get_column("ts").cast(pl.Int64).to_numpy(),
            user_index=df.get_column("user_index").fill_null(-1).to_numpy(),
        )  # fmt: skip
        return steps, frame.height - df.height

    def _add_eval(self, stage: str, history: pl.DataFrame, heldout: pl.DataFrame) -> None:
        users = heldout.get_column("user").unique().implode()
        seq = pl.concat(
            [
                history.filter(pl.col("user").is_in(users)).with_columns(scored=pl.lit(False)),
                heldout.with_columns(scored=pl.lit(True)),
            ]
        )
        steps, _ = self._steps(seq, scored=True)
        n_known = int(heldout.join(self._vocab, on="item", how="semi").height)
        self.n_dropped[stage] = heldout.height - n_known
        # users evaluated with no earlier session start from the zero state, like new users
        self.n_without_history[stage] = int(
            heldout.select("user")
            .unique()
            .join(history.select("user").unique(), on="user", how="anti")
            .height
        )
        if not steps.score.any():
            raise DataError(f"{self.path or self.name}: no {stage} event left to evaluate")
        self.eval_steps[stage] = steps

    # ----------------------------------------------------------- dataloaders
    def _shards(self, steps: Steps) -> list[Steps]:
        if self.world_size == 1:
            return [steps]
        rank_of = shard_users(user_lengths(steps.user), self.world_size)
        return [select_users(steps, rank_of == r) for r in range(self.world_size)]

    def _loader(
        self, steps: Steps, batch_size: int, epoch: int | None, start: int = 0
    ) -> DataLoader:
        """This rank's plan; for training (``epoch`` given) users are shuffled per epoch and
        every rank's plan is padded to the longest, so all ranks run the same steps.
        ``start``: the first chunk (a resumed epoch; see ``ResumeSampler``)."""
        plans = []
        for shard in self._shards(steps):
            order = None
            if epoch is not None and self.shuffle_users:
                n_users = int(shard.user_start.sum())
                order = np.random.default_rng([self.seed, epoch]).permutation(n_users)
            plans.append((shard, build_plan(shard.user, batch_size, order)))
        shard, plan = plans[self.rank]
        if epoch is not None:
            longest = max(p.shape[0] for _, p in plans)
            plan = np.vstack([plan, np.full((longest - plan.shape[0], batch_size), -1)])
        # its own generator: creating an iterator must not draw from the global RNG, which
        # the model's dropout and negative sampling use (resumed runs must match exactly)
        # pinned host chunks on a GPU machine: Lightning's copy to the device is then async
        dataset = PlanDataset(shard, plan, self.steps_per_batch)
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=ResumeSampler(len(dataset), start) if start else None,
            generator=torch.Generator(),
            pin_memory=self._pin_memory(),
        )

    def _pin_memory(self) -> bool:
        trainer = self.trainer
        if trainer is None or not torch.cuda.is_available():
            return False
        return trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        epoch, skip = 0, 0
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
            fit_loop = self.trainer.fit_loop
            if fit_loop.restarting:  # resumed: skip the batches the checkpoint already trained
                skip = fit_loop.epoch_loop.batch_progress.current.processed
        return self._loader(self.fit_steps, self.batch_size, epoch, skip)

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []
        return self._loader(self.eval_steps["val"], self.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_steps["test"], self.eval_batch_size, None)
