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
