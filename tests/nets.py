"""Small networks on the model API for tests (importable by the DDP worker processes)."""

from __future__ import annotations

import torch
from torch import nn


class TiedNet(nn.Module):
    """A session GRU whose one item table is both its input and its output (as SASRec's
    shared embedding): a step touches the B input rows and the B + S candidate rows of
    that table, more than the B + S the built-in step touches per table."""

    def __init__(self, n_items: int, hidden_size: int = 8):
        super().__init__()
        self.items = nn.Embedding(n_items, hidden_size, sparse=True)
        nn.init.uniform_(self.items.weight, -0.1, 0.1)
        self.gru = nn.GRUCell(hidden_size, hidden_size)

    def initial_state(self, batch_size, device):
        return (torch.zeros(batch_size, self.gru.hidden_size, device=device),)

    def start(self, state, starts):
        return (state[0].masked_fill(starts.session[:, None], 0.0),)

    def step(self, items, state):
        return (self.gru(self.items(items), state[0]),)

    def score(self, state, items=None):
        w = self.items.weight if items is None else self.items(items)
        return state[0] @ w.T


class ContextNet(nn.Module):
    """A session GRU that needs the step's ``api.Context`` and the user vocabulary's size:
    a learned user embedding in its scores, the log gap and the position in its input.
    ``record``: a list that collects each step's (items, context) when set."""

    def __init__(self, n_items: int, n_users: int, hidden_size: int = 8):
        super().__init__()
        self.n_users = n_users
        self.items = nn.Embedding(n_items, hidden_size, sparse=True)
        self.out = nn.Embedding(n_items, hidden_size, sparse=True)
        for e in (self.items, self.out):
            nn.init.uniform_(e.weight, -0.1, 0.1)
        self.users = nn.Embedding(n_users + 1, hidden_size)  # the last row: unknown users
        nn.init.uniform_(self.users.weight, -0.1, 0.1)
        self.gru = nn.GRUCell(hidden_size + 2, hidden_size)
        self.record: list | None = None

    def initial_state(self, batch_size, device):
        h = torch.zeros(batch_size, self.gru.hidden_size, device=device)
        return h, h.clone()

    def start(self, state, starts):
        return state[0].masked_fill(starts.session[:, None], 0.0), state[1]

    def step(self, items, state, context):
        if self.record is not None:
            self.record.append((items.clone(), context))
        h = state[0]
        u = self.users(torch.where(context.user >= 0, context.user, self.n_users))
        extra = torch.stack(
            [torch.log1p(context.gap.clamp(min=0).to(h.dtype)), context.position.to(h.dtype)], 1
        )
        return self.gru(torch.cat([self.items(items), extra / 10], 1), h), u

    def score(self, state, items=None):
        w = self.out.weight if items is None else self.out(items)
        return (state[0] + state[1]) @ w.T
