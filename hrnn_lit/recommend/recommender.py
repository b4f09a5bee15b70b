"""Top-k items for users of a trained model, each user's state carried from session to
session as in training (docs/design.md §13). ``mode=recommend`` is built on this class.

Events are observed in time order per user. A new session opens at a user's first event
and after more than ``session_gap`` idle seconds, the rule of the model's preprocessing
(and, as there, an item repeated within a session is dropped when the model's data was
deduplicated). Within a session each event steps the network on the previous item, the
input of training's step whose target is this event; the session's last item stays
pending until the next event or a recommendation, so the user-level rule at the next
session start sees the state training would. Items the model never saw are skipped and
counted; their times still count for the idle gap, as in preprocessing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from hrnn_lit.data.batching import build_plan
from hrnn_lit.errors import ConfigError, NumericalError
from hrnn_lit.evaluation.loop import EvalLoop, padded_rows
from hrnn_lit.nets import api
from hrnn_lit.ops.activations import at_least_float32
from hrnn_lit.recommend.ids import Ids
from hrnn_lit.recommend.replay import UserSlots, replay_chunk
from hrnn_lit.recommend.topk import exclude_items, top_k
from hrnn_lit.recommend.users import NO_TIME, UserTable, current_items, user_key

AT = ("next", "new_session")
EXCLUDE = ("none", "session", "history")
PAYLOAD_KEY = "hrnn_lit_recommend"  # what a checkpoint carries for recommending
BLOCK_SCORES = 4 << 20  # scores per block of users


@dataclass
class Observed:
    """What one ``observe_many`` call did: events replayed, events skipped (items the model
    never saw, or repeated within a session), users new to the recommender and of those
    the ones unknown to the model's checkpoint (fresh states)."""

    n_events: int = 0
    n_users: int = 0
    n_unknown_items: int = 0
    n_repeated: int = 0
    n_new_users: int = 0
    skipped_ids: list = field(default_factory=list)  # a few unknown item ids, for messages

    def line(self) -> str:
        return (
            f"observed {self.n_events} events of {self.n_users} users; skipped "
            f"{self.n_unknown_items} events with items the model never saw and "
            f"{self.n_repeated} repeated within a session; {self.n_new_users} users unknown "
            "to the model start with a fresh state"
        )


class Recommender:
    """A trained network with per-user state. ``from_checkpoint`` builds one from a
    checkpoint written by ``python -m hrnn_lit`` (its item ids, session rule and the users
    it was trained on, with their states after their training events)."""

    def __init__(
        self,
        net: nn.Module,
        items: Ids,
        session_gap: int | None = 1800,
        dedupe: bool = True,
        name: str = "model",
        batch_size: int = 512,
        device: str | torch.device = "cpu",
        user_ids: Ids | None = None,
    ):
        api.check_model(net)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.items, self.session_gap, self.dedupe = items, session_gap, dedupe
        self.name, self.batch_size = name, batch_size
        self.users = UserTable(self.net, self.device, user_ids)
        self._takes_context = api.takes_context(self.net)
        self.columns: dict = {}  # the events file's column settings the model was trained with
        self._said: set[str] = set()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Recommender:
        from hrnn_lit.recommend.checkpoint import load

        return load(Path(path), device)

    # --------------------------------------------------------------- observing
    def observe(self, user_id, item_id, timestamp) -> bool:
        """One event (timestamp in seconds); False when the item is unknown to the model
        (skipped; its time still counts for the idle gap)."""
        item = self.items.index(item_id)
        ts = np.array([_seconds(timestamp)], np.int64)
        self._observe([user_key(user_id)], np.array([item], np.int64), ts, None)
        return item >= 0

    def observe_many(
        self,
        events: pl.DataFrame,
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str = "timestamp",
        session_col: str | None = None,
    ) -> Observed:
        """Events of many users at once (a polars or pandas frame; times in seconds),
        replayed user-parallel in time order. ``session_col``: sessions as given instead of
        the idle-gap rule (e.g. a split whose sessions were cut before filtering)."""
        if not isinstance(events, pl.DataFrame):
            events = pl.from_pandas(events)
        cols = [user_col, item_col, time_col] + ([session_col] if session_col else [])
        missing = [c for c in cols if c not in events.columns]
        if missing:
            raise ValueError(f"observe_many: the events have no column(s) {missing}")
        ev = events.select(
            pl.col(user_col).alias("user"), pl.col(item_col).alias("item"),
            pl.col(time_col).cast(pl.Int64).alias("ts"),
            *([pl.col(session_col).alias("session")] if session_col else []),
        ).with_row_index("order")  # fmt: skip
        uniq = ev.get_column("user").unique(maintain_order=True)
        keys = [user_key(u) for u in uniq.to_list()]
        code = pl.DataFrame({"user": uniq, "code": np.arange(len(keys))})
        ev = ev.join(code, on="user", how="left").sort(["code", "ts", "order"])
        item = self.items.lookup(ev.get_column("item"))
        session = ev.get_column("session").to_numpy() if session_col else None
        done = self._observe(
            [keys[c] for c in ev.get_column("code").to_numpy()] if len(keys) < ev.height
            else keys, item, ev.get_column("ts").to_numpy(), session,
            codes=(keys, ev.get_column("code").to_numpy()),
        )  # fmt: skip
        unknown = ev.filter(pl.Series(item < 0)).get_column("item").unique(maintain_order=True)
        done.skipped_ids = unknown.head(3).to_list()
        return done

    def _observe(self, keys, item, ts, session, codes=None) -> Observed:
        """The events (users' groups contiguous, in time order) against the table;
        ``session``: each event's session id (None: the idle-gap rule)."""
        tab = self.users
        if codes is not None:
            uniq, code = codes
            before = tab.find(uniq)
            rows = tab.add(uniq)[code]
            n_new = int((before < 0).sum())
        else:
            n_new = int((tab.find(keys) < 0).sum())
            rows = tab.add(keys)
        n = rows.size
        done = Observed(n_events=n, n_users=int(np.unique(rows).size), n_new_users=n_new)
        if n == 0:
            return done
        first = _edges(rows)
        last = _edges(rows, last=True)
        prev = np.where(first, tab.last_ts[rows], _shifted(ts, 0))
        if np.any(first & (tab.last_ts[rows] != NO_TIME) & (ts < prev)):
            bad = int(np.flatnonzero(first & (ts < prev))[0])
            raise ValueError(
                f"user {tab.keys[rows[bad]]!r}: an event at {ts[bad]} comes before the user's "
                f"last observed event ({prev[bad]}); observe events in time order"
            )
        fresh = first & (tab.last_ts[rows] == NO_TIME)
        if session is not None:  # sessions as given: a new id opens one
            before = np.empty(n, object)
            before[1:] = session[:-1]
            before[first] = [tab.session_id.get(r) for r in rows[first]]
            new = fresh | (session != before)
            tab.session_id.update(zip(rows[last].tolist(), session[last].tolist()))
        elif self.session_gap is None:
            raise ValueError("the model's sessions were given by its data, not an idle gap: "
                             "pass the events' session column (session_col)")  # fmt: skip
        else:
            new = fresh | (~fresh & (ts - np.where(fresh, ts, prev) > self.session_gap))
        sid = np.cumsum(new | first)  # a session never spans two users
        cont = first & ~new  # the user's stored session goes on
        keep = item >= 0
        done.n_unknown_items = int((~keep).sum())
        if self.dedupe:
            seen = np.zeros(n, bool)
            key = sid * len(self.items) + np.maximum(item, 0)
            _, first_of = np.unique(np.where(keep, key, -1 - np.arange(n)), return_index=True)
            seen[:] = True
            seen[first_of] = False
            for i in np.flatnonzero(cont):  # items of the stored session (its user's events)
                j = i + int(np.searchsorted(sid[i:], sid[i], "right"))
                stored = tab.history[rows[i]][tab.session_from[rows[i]] :]
                seen[i:j] |= keep[i:j] & np.isin(item[i:j], stored)
            dup = keep & seen
            done.n_repeated = int(dup.sum())
            keep &= ~dup
        heads = np.flatnonzero(new | first)  # each event's session: where it begins
        head = heads[np.searchsorted(heads, np.arange(n), "right") - 1]
        in_stored = np.zeros(n, bool)  # the stored session goes on, its pending item in it
        in_stored[cont] = tab.in_session(rows[cont])
        in_stored = in_stored[head]
        k = np.flatnonzero(keep)
        rk = rows[k]
        k_first = _edges(head[k])
        starts = k_first & ~in_stored[k]
        u_first = _edges(rk)
        user_start = starts & u_first & (tab.n_events[rk] == 0)
        # each kept event's context as a step input (api.Context): time, gap, position
        t = ts[k]
        before = np.where(u_first, tab.last_kept[rk], _shifted(t, NO_TIME))
        gap = np.where(before == NO_TIME, 0, t - before)
        seg = np.flatnonzero(k_first)
        rank = np.arange(k.size) - seg[np.searchsorted(seg, np.arange(k.size), "right") - 1]
        base = np.where(in_stored[k], tab.context[rk, 2], 0)
        context = np.stack([t, gap, base + rank + 1], 1)
        self._replay(rk, item[k], starts, user_start, context)
        if k.size:
            u_last = _edges(rk, last=True)
            tab.last_kept[rk[u_last]] = t[u_last]
        # the table's bookkeeping (one iteration per user): times, the items observed and
        # where the current session begins
        tab.last_ts[rows[last]] = ts[last]
        bounds = np.append(np.flatnonzero(first), n)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            r, kept = rows[lo], keep[lo:hi]
            base = tab.history[r].size
            if kept.any():
                tab.history[r] = np.concatenate([tab.history[r], item[lo:hi][kept]])
                tab.n_events[r] += int(kept.sum())
            opened = np.flatnonzero(new[lo:hi])
            if opened.size:  # the current session began in these events
                tab.session_from[r] = base + int(kept[: opened[-1]].sum())
        return done

    def _replay(self, rows, items, starts, user_start, context) -> None:
        """Step the network through kept events (users contiguous, in time order) with the
        evaluation's replay loop: slots run users in parallel; a user's stored state is
        loaded into its slot at its first event and stored at its last. A session's first
        event runs the start rules; every other event steps the slot on the item before it
        (the stored pending item at a user's first event) and observes its own."""
        tab = self.users
        if rows.size == 0:
            return
        first, last = _edges(rows), _edges(rows, last=True)
        B = min(self.batch_size, int(first.sum()))
        plan = build_plan(rows, B)  # [T, B] event indices (-1: none)
        inputs = np.where(first, tab.pending[rows], _shifted(items, -1))
        in_ctx = np.where(first[:, None], tab.context[rows], np.roll(context, 1, 0))  # [n, 3]
        chunk = replay_chunk(
            plan, inputs, items, starts, user_start, in_ctx, tab.user_index[rows], self.device
        )
        loop = EvalLoop(len(self.items))
        loop.begin(self.net, None, shares=False)
        loop.chunk(chunk, UserSlots(tab, plan, rows, first, last, self.device))
        tab.pending[rows[last]] = items[last]
        tab.context[rows[last]] = context[last]

    # ----------------------------------------------------------------- the rules
    def _idx(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(self.device)

    def _put(self, state: api.State, slots: np.ndarray, sub: api.State, B: int) -> api.State:
        return api.put_rows(state, self._idx(slots), sub, self.users.fresh, self.name)

    def _start(self, state, slots, user, B) -> api.State:
        """The session-start rule on ``slots`` (a user start where ``user``)."""
        idx = self._idx(padded_rows(slots, B))
        session = torch.zeros(idx.numel(), dtype=torch.bool, device=self.device)
        session[: slots.size] = True
        users = torch.zeros_like(session)
        users[: slots.size] = torch.from_numpy(np.asarray(user, bool))
        starts = api.Starts(session, users, (session & ~users).nonzero().view(-1))
        sub = self.net.start(api.select(state, idx), starts)
        return self._put(state, slots, sub, B)

    def _step(self, state, slots, inputs, B, ctx) -> api.State:
        """One step on ``slots`` with their input items; ``ctx``: the slots' users and their
        inputs' (time, gap, position), for networks that take an ``api.Context``."""
        padded = padded_rows(np.arange(slots.size), B)
        idx = self._idx(slots[padded])
        extra = ()
        if self._takes_context:
            users, tgp = ctx[0][padded], ctx[1][padded]
            extra = (api.Context(*(self._idx(x) for x in (users, *tgp.T))),)
        sub = self.net.step(self._idx(inputs[padded]), api.select(state, idx), *extra)
        return self._put(state, slots, sub, B)

    # -------------------------------------------------------------- recommending
    def _query(self, rows: np.ndarray, at: str) -> api.State:
        """The states to score: the pending item stepped (``next``; a user with no ongoing
        session starts one), or a new session started (``new_session``)."""
        n = rows.size
        state = self.users.get(rows)
        ongoing = self.users.in_session(rows) if at == "next" else np.zeros(n, bool)
        n_events = np.where(rows >= 0, self.users.n_events[np.maximum(rows, 0)], 0)
        B = max(n, 1)
        with torch.no_grad():
            if (~ongoing).any():
                state = self._start(state, np.flatnonzero(~ongoing), n_events[~ongoing] == 0, B)
            if ongoing.any():
                slots = np.flatnonzero(ongoing)
                r = rows[slots]
                ctx = (self.users.user_index[r], self.users.context[r])
                state = self._step(state, slots, self.users.pending[r], B, ctx)
        return state

    def scores(self, user_ids: list, at: str = "next") -> Tensor:
        """Scores [len(user_ids), n_items] of the whole catalogue, at least float32."""
        _check(at=at)
        rows = self.users.find([user_key(u) for u in user_ids])
        with torch.no_grad():
            return at_least_float32(self.net.score(self._query(rows, at)))

    def recommend(self, user_id, k: int = 20, at: str = "next", exclude: str = "none") -> list:
        """The top ``k`` items for one user: ``[(item_id, score), ...]``, best first."""
        items, values = self._top([user_id], k, at, exclude)
        ok = items[0] >= 0
        ids = self.items.as_list()
        return [(ids[i], float(v)) for i, v in zip(items[0][ok], values[0][ok])]

    def recommend_many(
        self, user_ids, k: int = 20, at: str = "next", exclude: str = "none"
    ) -> pl.DataFrame:
        """Top ``k`` per user, batched: columns ``user_id, rank, item_id, score`` (rank 1 is
        the best; equal scores in catalogue order). ``at``: next (the ongoing session's next
        item) or new_session (a new session's first item); ``exclude``: none, session (items
        of the ongoing session; a new one has none) or history (every item the user had)."""
        user_ids = list(user_ids)
        items, values = self._top(user_ids, k, at, exclude)
        ok = items >= 0  # fewer than k where exclusion left fewer items
        who = np.repeat(np.arange(len(user_ids)), ok.sum(1))
        users = pl.Series("user_id", user_ids, strict=False).gather(who) if user_ids else []
        return pl.DataFrame(
            {
                "user_id": users,
                "rank": (np.cumsum(ok, 1)[ok]).astype(np.int64),
                "item_id": self.items.values_at(items[ok]),
                "score": values[ok],
            }
        )

    def _top(self, user_ids: list, k: int, at: str, exclude: str) -> tuple[np.ndarray, ...]:
        """Items [n, k] (-1: none left) and their scores, in blocks of users."""
        _check(k=k, at=at, exclude=exclude)
        if at == "new_session" and getattr(self.net, "session_only", False):
            self._say(f"recommend.at=new_session: {self.name} keeps no state across sessions, "
                      "so its first-item recommendations are the same for every user")  # fmt: skip
        rows = self.users.find([user_key(u) for u in user_ids])
        n_items = len(self.items)
        block = max(1, BLOCK_SCORES // max(n_items, 1))
        parts = []
        for lo in range(0, rows.size, block):
            r = rows[lo : lo + block]
            with torch.no_grad():
                s = at_least_float32(self.net.score(self._query(r, at)))
            if bool(torch.isnan(s).any()) or bool(torch.isposinf(s).any()):
                raise NumericalError(f"{self.name}: some scores are not finite (NaN/inf)")
            if exclude == "history" or (exclude == "session" and at == "next"):
                s = s.clone()  # (a network may hand out a tensor it keeps)
                exclude_items(s, current_items(self.users, r, exclude == "history"))
            items, values = top_k(s, k)
            parts.append((items.cpu().numpy(), values.double().cpu().numpy()))
        if not parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            print(line, file=sys.stderr)


def _edges(x: np.ndarray, last: bool = False) -> np.ndarray:
    """Where a run of equal values begins (or, ``last``, ends) in ``x``."""
    out = np.ones(x.size, bool)
    if last:
        np.not_equal(x[1:], x[:-1], out=out[:-1])
    else:
        np.not_equal(x[1:], x[:-1], out=out[1:])
    return out


def _shifted(x: np.ndarray, fill) -> np.ndarray:
    """``x`` one place later, ``fill`` first."""
    out = np.empty_like(x)
    out[:1] = fill
    out[1:] = x[:-1]
    return out


def _seconds(ts) -> int:
    if hasattr(ts, "timestamp"):  # datetime
        return int(ts.timestamp())
    return int(ts)


def _check(k: int = 1, at: str = "next", exclude: str = "none") -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"recommend.k must be an integer >= 1, got {k!r}")
    if at not in AT:
        raise ConfigError(f"recommend.at must be one of {list(AT)}, got {at!r}")
    if exclude not in EXCLUDE:
        raise ConfigError(f"recommend.exclude must be one of {list(EXCLUDE)}, got {exclude!r}")
