"""Original ids <-> indices: a checkpoint's item and user vocabularies (docs/design.md §13).

Ids are kept in the canonical form every reader gives them (``data.columns``): Int64 when
all of a column's ids are integers, else text with integer ids in their integer form and
zero-padded codes (``007``) as names. Lookups accept either form, so a file whose ids read
as integers finds a vocabulary kept as text, and the other way round.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

_INT = r"^-?(?:0|[1-9][0-9]*)$"  # an id text that is an integer in canonical form


class Ids:
    """A vocabulary: ``values[i]`` is the original id of index ``i``."""

    def __init__(self, values: pl.Series | list | np.ndarray | torch.Tensor):
        if torch.is_tensor(values):
            values = values.numpy()
        series = values if isinstance(values, pl.Series) else pl.Series(values)
        if series.dtype.is_integer():
            series = series.cast(pl.Int64)
        elif series.dtype != pl.String:
            series = series.cast(pl.String)
        self.series = series.alias("id")
        self.is_int = series.dtype == pl.Int64
        self._frame = pl.DataFrame({"id": self.series, "idx": np.arange(len(series))})
        self._index: dict | None = None
        self._list: list | None = None

    def __len__(self) -> int:
        return len(self.series)

    def payload(self) -> torch.Tensor | list[str]:
        """What a checkpoint stores (tensors and plain lists: it loads as data)."""
        if self.is_int:
            return torch.from_numpy(self.series.to_numpy().copy())
        return self.series.to_list()

    def _matching(self, ids: pl.Series) -> pl.Series:
        """``ids`` in this vocabulary's dtype; ids that cannot be in it become null."""
        if ids.dtype.is_integer():
            return ids.cast(pl.Int64) if self.is_int else ids.cast(pl.String)
        text = ids.cast(pl.String)
        if not self.is_int:
            return text
        return pl.select(
            pl.when(text.str.contains(_INT)).then(text.cast(pl.Int64, strict=False))
        ).to_series()

    def lookup(self, ids: pl.Series) -> np.ndarray:
        """Index of each id, -1 where the vocabulary has none (vectorised)."""
        frame = pl.DataFrame({"id": self._matching(ids)})
        found = frame.join(self._frame, on="id", how="left", maintain_order="left")
        return found.get_column("idx").fill_null(-1).to_numpy().astype(np.int64)

    def index(self, value) -> int:
        """Index of one id (-1: unknown)."""
        if self._index is None:
            self._index = {v: i for i, v in enumerate(self.as_list())}
        if isinstance(value, (bool, np.bool_)):
            return -1
        if isinstance(value, (int, np.integer)):
            key = int(value) if self.is_int else str(int(value))
        else:
            key = str(value).strip()
            if self.is_int:
                if not pl.Series([key]).str.contains(_INT)[0]:
                    return -1
                key = int(key)
        return self._index.get(key, -1)

    def as_list(self) -> list:
        """The ids as a Python list (index -> id), made once."""
        if self._list is None:
            self._list = self.series.to_list()
        return self._list

    def values_at(self, idx: np.ndarray) -> pl.Series:
        """The original ids of indices ``idx``."""
        return self.series.gather(pl.Series(np.asarray(idx, np.int64)))
