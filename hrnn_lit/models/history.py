"""HRNN with the user's own history in the output: ``model=hrnn_history``.

What the strong simple baselines exploit on user-structured data is repeat consumption: a
user comes back to items of their earlier sessions (``user_pop`` ranks by the user's own
counts). An RNN scoring the catalogue from its states has to relearn that for every item.
This network keeps the hierarchical RNN (``RecurrentCore``: session GRU, user GRU, init) and
adds, RepeatNet-style, a repeat part to each item's score:

    p(n) = P(repeat) p_repeat(n) + (1 - P(repeat)) p_explore(n),   score = log p(n)

- p_explore: softmax of the HRNN's scores (in training over the step's candidates, a
  sampled softmax; in evaluation over the catalogue);
- p_repeat: softmax over the user's last ``memory`` distinct items of
  r(n) = g(b) . [log(1 + count of n), recency of n, n in the current session], the
  recency being the count with a session k back weighted decay^k;
- P(repeat) = sigmoid(w . [h; c] + b), and g(b) = W_g [h; c] + b_g: the states decide how
  much this slot repeats and how it weighs its history.
Where history carries no signal P(repeat) can go to zero and the model is the HRNN.
``repeat=False`` (an ablation) drops the repeat part.

State: (h [B, H], c [B, U], counts [B, 3, n_items], listed [B, memory] items, n_listed [B]).
The counts (dense, for O(1) look-ups) and the list of the user's distinct items (what
p_repeat normalises over) are updated in place (they take no gradient): a step touches
O(B) counts, a score reads [B, 3, N] of them and [B, 3, memory] for the normaliser. A user
with more than ``memory`` distinct items forgets the oldest (its counts are zeroed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrnn_lit.models.api import Starts, State
from hrnn_lit.models.core import RecurrentCore

N_FEATURES = 3
GATE_PRIOR = (1.0, 1.0, -3.0)


class HistoryHRNN(nn.Module):
    def __init__(
        self,
        n_items: int,
        hidden_size: int = 100,
        user_hidden_size: int = 100,
        user_propagation: str = "init",
        decay: float = 0.5,
        memory: int = 200,
        repeat: bool = True,
        dropout_session: float = 0.0,
        dropout_user: float = 0.0,
        dropout_init: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.n_items, self.decay, self.memory, self.repeat = n_items, decay, memory, repeat
        self.rnn = RecurrentCore(
            n_items, hidden_size=hidden_size, user_hidden_size=user_hidden_size,
            user_propagation=user_propagation, dropout_session=dropout_session,
            dropout_user=dropout_user, dropout_init=dropout_init,
        )  # fmt: skip
        c_size = user_hidden_size if user_propagation != "none" else 0
        self.gate = nn.Linear(hidden_size + c_size, N_FEATURES)  # repeat scores' weights
        self.mode = nn.Linear(hidden_size + c_size, 1)  # P(repeat) = sigmoid(mode)
        nn.init.zeros_(self.gate.weight)
        with torch.no_grad():  # a prior: repeats of past items are likely, in-session ones not
            self.gate.bias.copy_(torch.tensor(GATE_PRIOR))

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        h, c = self.rnn.initial_state(batch_size, device)
        counts = torch.zeros(batch_size, N_FEATURES, self.n_items, device=device)
        listed = torch.zeros(batch_size, self.memory, dtype=torch.long, device=device)
        n_listed = torch.zeros(batch_size, dtype=torch.long, device=device)
        return h, c, counts, listed, n_listed

    def start(self, state: State, starts: Starts) -> State:
        h, c, counts, listed, n_listed = state
        if starts.next_session_rows.numel():  # a known user's next session
            rows = starts.next_session_rows
            counts[rows, 1] *= self.decay  # earlier sessions weigh less
            counts[rows, 2] = 0.0  # a new current session
        new = starts.user.nonzero().view(-1)
        if new.numel():  # a new user: no history
            counts[new] = 0.0
            n_listed[new] = 0
        h, c = self.rnn.start((h, c), starts)
        return h, c, counts, listed, n_listed

    def step(self, items: Tensor, state: State) -> State:
        h, c, counts, listed, n_listed = state
        slots = torch.arange(items.numel(), device=items.device)
        first = counts[slots, 0, items] == 0  # a new item for this user: list it
        at = n_listed % self.memory
        old = listed[slots, at]
        forget = first & (n_listed >= self.memory)  # the list is full: drop the oldest
        counts[slots[forget], :, old[forget]] = 0.0
        listed[slots, at] = torch.where(first, items, old)
        n_listed += first.long()
        counts[slots, 0, items] += 1.0
        counts[slots, 1, items] += 1.0
        counts[slots, 2, items] = 1.0
        h, c = self.rnn.step(items, (h, c))
        return h, c, counts, listed, n_listed

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        """log p(n) of the mixture for candidates [N] (training) or the catalogue."""
        h, c, counts, listed, n_listed = state
        s = self.rnn.score((h, c), items)  # [B, N]
        log_explore = s - torch.logsumexp(s, dim=1, keepdim=True)
        if not self.repeat:  # ablation: the explore part alone
            return log_explore
        hc = torch.cat([h, c], dim=1)
        g = self.gate(hc)[:, None, :]  # [B, 1, 3]
        on_list = counts.gather(2, listed[:, None, :].expand(-1, N_FEATURES, -1))
        r_list = torch.bmm(g, _features(on_list)).squeeze(1)  # [B, memory]
        filled = torch.arange(self.memory, device=h.device) < n_listed[:, None]
        # (finite mask: a slot without history keeps finite, zero gradients here)
        log_norm = torch.logsumexp(r_list.masked_fill(~filled, -1e30), 1, keepdim=True)
        f = counts if items is None else counts.index_select(2, items)  # [B, 3, N]
        r = torch.bmm(g, _features(f)).squeeze(1).masked_fill(f[:, 0] == 0, -torch.inf)
        a = self.mode(hc)  # [B, 1]: repeat or explore
        seen = n_listed[:, None] > 0  # no history yet: explore only
        log_rep = torch.where(seen, F.logsigmoid(a) + r - log_norm, -torch.inf)
        return torch.logaddexp(log_rep, torch.where(seen, F.logsigmoid(-a), 0.0) + log_explore)


def _features(counts: Tensor) -> Tensor:
    """[B, 3, n] history counts -> the repeat part's features (log count, recency, in
    session)."""
    return torch.cat([counts[:, :1].log1p(), counts[:, 1:]], dim=1)
