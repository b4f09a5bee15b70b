"""HRNN with an attentive user state: a model the paper does not have, written the way a
user writes one, on the model API only (``hrnn_lit.nets.api``): this file and
``conf/model/attention_hrnn.yaml`` are all of it; training, evaluation, sweeps and DDP
come from hrnn_lit.

Instead of a user GRU, each slot files its user's last ``memory`` session states; a new
session of a known user starts from tanh(W_init u), u being attention over the filed
states with the most recent one as the query. State: (h [B, H], memory [B, M, H],
filled [B])."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hrnn_lit.nets.api import ScoreFactors, Starts, linear_scores


class AttentionHRNN(nn.Module):
    def __init__(self, n_items: int, hidden_size: int = 100, memory: int = 10,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.hidden_size, self.memory = hidden_size, memory
        self.item_emb = nn.Embedding(n_items, hidden_size, sparse=True)  # sparse: rows only
        self.gru = nn.GRUCell(hidden_size, hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.w_init = nn.Linear(hidden_size, hidden_size)
        self.out_w = nn.Embedding(n_items, hidden_size, sparse=True)
        self.out_b = nn.Embedding(n_items, 1, sparse=True)
        nn.init.uniform_(self.item_emb.weight, -0.05, 0.05)
        nn.init.uniform_(self.out_w.weight, -0.05, 0.05)
        nn.init.zeros_(self.out_b.weight)
        self.drop = nn.Dropout(dropout)

    def initial_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, ...]:
        H, M = self.hidden_size, self.memory
        return (
            torch.zeros(batch_size, H, device=device),
            torch.zeros(batch_size, M, H, device=device),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def start(self, state: tuple[Tensor, ...], starts: Starts) -> tuple[Tensor, ...]:
        h, mem, filled = state
        file = (starts.session & ~starts.user)[:, None]  # a known user's next session
        mem = torch.where(file[:, :, None], torch.cat([h[:, None], mem[:, :-1]], 1), mem)
        filled = torch.where(file[:, 0], (filled + 1).clamp(max=self.memory), filled)
        mem = mem.masked_fill(starts.user[:, None, None], 0.0)  # a new user: forget
        filled = filled.masked_fill(starts.user, 0)
        q = self.query(mem[:, 0])  # [B, H]: the last session asks
        logits = (mem @ q[:, :, None]).squeeze(2) / self.hidden_size**0.5  # [B, M]
        empty = torch.arange(self.memory, device=h.device) >= filled[:, None]
        weights = torch.softmax(logits.masked_fill(empty, -1e9), dim=1)  # [B, M]
        h0 = torch.tanh(self.w_init((weights[:, :, None] * mem).sum(1)))  # [B, H]
        h = torch.where(file, h0, h.masked_fill(starts.session[:, None], 0.0))
        return h, mem, filled

    def step(self, items: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h, mem, filled = state
        return self.gru(self.item_emb(items), h), mem, filled

    def score_factors(self, state: tuple[Tensor, ...]) -> ScoreFactors:
        """Scores linear in the state, h . out_w[item] + out_b[item]: training fuses them
        with the loss, evaluation ranks the catalogue without the score matrix."""
        return ScoreFactors((self.drop(state[0]),), (self.out_w.weight,), self.out_b.weight)

    def score(self, state: tuple[Tensor, ...], items: Tensor | None = None) -> Tensor:
        return linear_scores(self.score_factors(state), items)  # [B, N] or [B, n_items]
