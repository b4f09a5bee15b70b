"""HRNN with the user's own history in the output: ``model=hrnn_history``.

What the strong simple baselines exploit on user-structured data is repeat consumption: a
user comes back to items of their earlier sessions (``user_pop`` ranks by the user's own
counts). An RNN scoring the catalogue from its states has to relearn that for every item.
This network keeps the hierarchical RNN (``RecurrentCore``: session GRU, user GRU, init) and
adds, RepeatNet-style, a repeat part to each item's score:

    score(b, n) = s_rnn(b, n) + sum_k g_k(b) * f_k(b, n)

with f_k per slot and item (a user's history, kept in the state and reset at user starts):
    f_0 = log(1 + count of n in the user's past events),
    f_1 = recency: the count with every earlier session weighted decay^(sessions back),
    f_2 = 1 if n is already in the current session;
and the gates g(b) = W_g [h; c] + b_g: the state decides how much this slot repeats
(e.g. early in a session, or for a user who keeps coming back) and how much it explores.
Where history carries no signal the gates can go to zero and the model is the HRNN.
``repeat=False`` (an ablation) drops the repeat part.

State: (h [B, H], c [B, U], history [B, 3, n_items]); the history counts are updated in
place at each step (they take no gradient), so a step costs O(B) there, and the score of
N candidates reads [B, 3, N] of it.
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
        repeat: bool = True,
        dropout_session: float = 0.0,
        dropout_user: float = 0.0,
        dropout_init: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.n_items, self.decay, self.repeat = n_items, decay, repeat
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
        return h, c, torch.zeros(batch_size, N_FEATURES, self.n_items, device=device)

    def start(self, state: State, starts: Starts) -> State:
        h, c, hist = state
        if starts.next_session_rows.numel():  # a known user's next session
            rows = starts.next_session_rows
            hist[rows, 1] *= self.decay  # earlier sessions weigh less
            hist[rows, 2] = 0.0  # a new current session
        hist.masked_fill_(starts.user[:, None, None], 0.0)  # a new user: no history
        h, c = self.rnn.start((h, c), starts)
        return h, c, hist

    def step(self, items: Tensor, state: State) -> State:
        h, c, hist = state
        slots = torch.arange(items.numel(), device=items.device)
        hist[slots, 0, items] += 1.0
        hist[slots, 1, items] += 1.0
        hist[slots, 2, items] = 1.0
        h, c = self.rnn.step(items, (h, c))
        return h, c, hist

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        """log p(n) of the mixture; training's candidates stand in for the catalogue in
        the explore part's normalisation (a sampled softmax), the repeat part is always
        normalised over the user's whole history."""
        h, c, hist = state
        if not self.repeat:  # ablation: the explore part alone (an HRNN scored as log p)
            s = self.rnn.score((h, c), items)
            return s - torch.logsumexp(s, dim=1, keepdim=True)
        hc = torch.cat([h, c], dim=1)
        g = self.gate(hc)  # [B, 3]
        r_all = torch.bmm(g[:, None, :], _features(hist)).squeeze(1)  # [B, n_items]
        r_all = r_all.masked_fill(hist[:, 0] == 0, -1e9)  # only the user's past items
        log_norm = torch.logsumexp(r_all, dim=1, keepdim=True)  # [B, 1]
        r = r_all if items is None else r_all.index_select(1, items)  # [B, N]
        s = self.rnn.score((h, c), items)  # [B, N]
        log_explore = s - torch.logsumexp(s, dim=1, keepdim=True)
        a = self.mode(hc)  # [B, 1]: repeat or explore
        seen = hist[:, 0].sum(1, keepdim=True) > 0  # no history: explore only
        log_rep = torch.where(seen, F.logsigmoid(a), -1e9) + r - log_norm
        return torch.logaddexp(log_rep, F.logsigmoid(-a).where(seen, 0.0) + log_explore)


def _features(hist: Tensor) -> Tensor:
    """[B, 3, n] history counts -> the repeat part's features (log count, recency, in
    session)."""
    return torch.cat([hist[:, :1].log1p(), hist[:, 1:]], dim=1)
