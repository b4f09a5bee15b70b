"""What a recommender knows of each user (docs/design.md §13): the network's state after the
user's observed events, the pending item (the last one observed, the input of the next
step: a session's last item is never stepped, as in training), the last event's time (the
idle-gap rule), and the items observed, with where the current session begins (for
``exclude``). Rows grow as users arrive; a checkpoint stores the table of the users it was
trained on (``payload`` / ``load``)."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor, nn

from hrnn_lit.nets import api

NO_TIME = np.iinfo(np.int64).min  # a user with no event yet
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")


def user_key(value):
    """A user id in canonical form: integers (and integer text without leading zeros) as
    int, other text stripped; the same user whether it came from a file or from Python."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        return int(text) if _INT.match(text) else text
    return value


class UserTable:
    """Per-user rows: ``state`` (the network's state tensors, rows = users), ``pending``,
    ``last_ts``, ``n_events`` and the observed items ``history[row]`` (an array; the current
    session is ``history[row][session_from[row]:]``)."""

    def __init__(self, net: nn.Module, device: torch.device, vocabulary=None):
        self.net, self.device = net, device
        self.vocabulary = vocabulary  # the model's user ids (Ids) -> api.Context.user
        self.fresh: api.State = net.initial_state(1, device)  # one fresh slot
        self.keys: list = []
        self.rows: dict = {}
        self.state: api.State = net.initial_state(0, device)
        self.pending = np.zeros(0, np.int64)
        self.context = np.zeros((0, 3), np.int64)  # the pending event's time, gap, position
        self.user_index = np.zeros(0, np.int64)  # in the model's user vocabulary (-1: none)
        self.last_kept = np.zeros(0, np.int64)  # time of the last event of a known item
        self.last_ts = np.zeros(0, np.int64)
        self.n_events = np.zeros(0, np.int64)
        self.session_from = np.zeros(0, np.int64)
        self.history: list[np.ndarray] = []
        self.session_id: dict = {}  # row -> its last session's id, where sessions are given
        self.n_known = 0  # users that came with the checkpoint

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: list) -> np.ndarray:
        """Rows of canonical ``keys`` (-1: not in the table)."""
        return np.fromiter((self.rows.get(k, -1) for k in keys), np.int64, len(keys))

    def add(self, keys: list) -> np.ndarray:
        """Rows of ``keys``, new users appended with a fresh state."""
        rows = self.find(keys)
        new = [k for k, r in zip(keys, rows) if r < 0]
        if new:
            n0, n = len(self.keys), len(dict.fromkeys(new))
            for k in dict.fromkeys(new):
                self.rows[k] = len(self.keys)
                self.keys.append(k)
            self.state = api.cat([self.state, self.net.initial_state(n, self.device)])
            self.pending = np.r_[self.pending, np.full(n, -1, np.int64)]
            self.context = np.r_[self.context, np.zeros((n, 3), np.int64)]
            fresh = list(dict.fromkeys(new))
            vocab = self.vocabulary
            index = [vocab.index(k) if vocab is not None else -1 for k in fresh]
            self.user_index = np.r_[self.user_index, np.array(index, np.int64)]
            self.last_kept = np.r_[self.last_kept, np.full(n, NO_TIME, np.int64)]
            self.last_ts = np.r_[self.last_ts, np.full(n, NO_TIME, np.int64)]
            self.n_events = np.r_[self.n_events, np.zeros(n, np.int64)]
            self.session_from = np.r_[self.session_from, np.zeros(n, np.int64)]
            self.history += [np.zeros(0, np.int64) for _ in range(n)]
            rows = self.find(keys) if n0 < len(self.keys) else rows
        return rows

    def put(self, rows: np.ndarray, sub: api.State) -> None:
        """Set the state of ``rows`` to the first rows of ``sub``."""
        idx = torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        self.state = api.put_rows(self.state, idx, sub, self.fresh, type(self.net).__name__)

    def get(self, rows: np.ndarray) -> api.State:
        """The states of ``rows``; a row of -1 (a user never seen) gets a fresh state."""
        rows = np.asarray(rows, np.int64)
        known = rows >= 0
        if known.all():
            return api.select(self.state, torch.from_numpy(rows).to(self.device))
        out = self.net.initial_state(rows.size, self.device)
        if known.any():
            sub = api.select(self.state, torch.from_numpy(rows[known]).to(self.device))
            idx = torch.from_numpy(np.flatnonzero(known)).to(self.device)
            out = api.put_rows(out, idx, sub, self.fresh, type(self.net).__name__)
        return out

    def in_session(self, rows: np.ndarray) -> np.ndarray:
        """Whether each row's pending item belongs to its current session (-1: False)."""
        rows = np.asarray(rows, np.int64)
        ok = rows >= 0
        out = np.zeros(rows.size, bool)
        lengths = np.fromiter((self.history[r].size for r in rows[ok]), np.int64, int(ok.sum()))
        out[ok] = lengths > self.session_from[rows[ok]]
        return out

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict:
        """The table as tensors and plain lists (a checkpoint loads it as data)."""
        keys = self.keys
        ints = all(isinstance(k, int) for k in keys)
        lengths = np.fromiter((h.size for h in self.history), np.int64, len(self.history))
        return {
            "users": torch.tensor(keys, dtype=torch.int64) if ints else [str(k) for k in keys],
            "state": [x.detach().cpu() for x in self.state],
            "pending": torch.from_numpy(self.pending.copy()),
            "context": torch.from_numpy(self.context.copy()),
            "last_kept": torch.from_numpy(self.last_kept.copy()),
            "last_ts": torch.from_numpy(self.last_ts.copy()),
            "n_events": torch.from_numpy(self.n_events.copy()),
            "session_from": torch.from_numpy(self.session_from.copy()),
            "history_ptr": torch.from_numpy(np.r_[0, np.cumsum(lengths)].astype(np.int64)),
            "history_items": torch.from_numpy(
                np.concatenate(self.history) if self.history else np.zeros(0, np.int64)
            ),
        }

    def load(self, p: dict) -> None:
        """Replace the table by a stored one (``payload``)."""
        users = p["users"]
        self.keys = [user_key(k) for k in (users.tolist() if torch.is_tensor(users) else users)]
        self.rows = {k: i for i, k in enumerate(self.keys)}
        fresh = self.net.initial_state(len(self.keys), self.device)
        stored = tuple(x.to(self.device) for x in p["state"])
        if len(stored) != len(fresh) or any(len(a) != len(b) for a, b in zip(stored, fresh)):
            raise ValueError("the stored user states do not fit the network")
        self.state = tuple(s.to(f.dtype) for s, f in zip(stored, fresh))
        self.pending = p["pending"].numpy().astype(np.int64)
        self.context = p["context"].numpy().astype(np.int64).reshape(-1, 3)
        self.last_kept = p["last_kept"].numpy().astype(np.int64)
        vocab = self.vocabulary
        self.user_index = np.array(
            [vocab.index(k) if vocab is not None else -1 for k in self.keys], np.int64
        )
        self.last_ts = p["last_ts"].numpy().astype(np.int64)
        self.n_events = p["n_events"].numpy().astype(np.int64)
        self.session_from = p["session_from"].numpy().astype(np.int64)
        ptr, items = p["history_ptr"].numpy(), p["history_items"].numpy().astype(np.int64)
        self.history = np.split(items, ptr[1:-1]) if len(self.keys) else []
        self.n_known = len(self.keys)

    def known(self, rows: np.ndarray) -> np.ndarray:
        """Whether each row came with the checkpoint."""
        return (np.asarray(rows) >= 0) & (np.asarray(rows) < self.n_known)


def current_items(table: UserTable, rows: np.ndarray, whole_history: bool) -> list[Tensor]:
    """For each row: the items of its current session, or of its whole history."""
    out = []
    for r in np.asarray(rows, np.int64):
        if r < 0:
            out.append(np.zeros(0, np.int64))
        else:
            h = table.history[r]
            out.append(h if whole_history else h[table.session_from[r] :])
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in out]
