"""The recurrent core shared by the session RNN (GRU4Rec) and the hierarchical RNN.

Shapes: B slots, H session units, U user units, N candidate items.
- input item -> its row of ``item_in`` ([n_items, 3H]: the GRU's input weights applied to a
  one-hot item), so the input projection is a gather, not a matmul;
- session GRU: h [B, H]; user GRU: c [B, U] (HRNN only);
- scores: h @ out_w[items].T + out_b[items] (+ c @ out_u[items].T with user_to_output).

HRNN state rules (DESIGN §2): at a user's first step h = 0 and c = 0; at any other session
start c <- GRU_usr(h, c), with h the state after the last input of the previous session, and
h <- dropout(act(W_init c + b_init)). Without a user level, h is zeroed at every session
start (GRU4Rec) or only at user starts (``reset_at="user"``: the paper's RNN Concat, one
sequence of all of a user's sessions). ``user_propagation="all"`` also adds W_c c to the
session GRU's reset and update gates at every step (the reference code's choice).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hrnn_lit.models import native
from hrnn_lit.models.api import Starts, State

PROPAGATIONS = ("none", "init", "all")
RESETS = ("session", "user")
ACTIVATIONS = {"linear": lambda x: x, "tanh": torch.tanh, "relu": torch.relu}


class _NativeGRUCell(torch.autograd.Function):
    """``native.gru_forward`` with its own backward (``native.gru_backward``), so that the C
    kernel can sit on an autograd path: the new state's gradient reaches gi, gh and h."""

    @staticmethod
    def forward(ctx, gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
        h_new, rz, n = native.gru_forward(gi, gh, h)
        ctx.save_for_backward(h, rz, n, gh)
        return h_new

    @staticmethod
    def backward(ctx, dh: Tensor):
        h, rz, n, gh = ctx.saved_tensors
        dh = dh.contiguous()
        out = native.gru_backward(dh, h, rz, n, gh)
        assert out is not None  # the forward ran natively on the same tensors
        dgi, dgh = out
        return dgi, dgh, dh * rz[:, h.shape[1] :]  # h_new = (1 - z) n + z h


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def gru_gates(gi: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GRU cell (torch's gate order r, z, n) from the input and hidden projections gi, gh
    [R, 3K] (biases included) of the state h [R, K]: (new state [R, K], the gates
    rz = [r, z] [R, 2K], the candidate n [R, K]). The session GRU and the user GRU, in
    training and evaluation, all step through here: on CPU float32 through one native pass
    (``native.gru_forward``: its sigmoid and tanh round like torch's, not bit for bit),
    elsewhere through torch's ops. Where autograd records (the autograd engine), the native
    pass runs inside ``_NativeGRUCell`` and only the new state is returned with a history
    (rz and n are then None)."""
    if h.device.type == "cpu" and native.gru_supported(gi, gh, h):
        if _needs_grad(gi, gh, h):
            return _NativeGRUCell.apply(gi, gh, h), None, None
        return native.gru_forward(gi, gh, h)
    K = h.shape[1]
    rz = torch.sigmoid(gi[:, : 2 * K] + gh[:, : 2 * K])  # [R, 2K]
    n = torch.tanh(torch.addcmul(gi[:, 2 * K :], rz[:, :K], gh[:, 2 * K :]))  # [R, K]
    return torch.lerp(n, h, rz[:, K:]), rz, n  # (1 - z) * n + z * h


def zero_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x [B, D] with the rows flagged in ``rows`` [B] bool set to 0 (a copy). On CPU by
    index (~5x faster than a broadcast mask at [512, 100]); elsewhere by mask (no host
    sync)."""
    if x.device.type == "cpu":
        return x.index_fill(0, rows.nonzero().view(-1), 0.0)
    return x.masked_fill(rows[:, None], 0.0)


class RecurrentCore(nn.Module):
    """Session GRU with an optional user-level GRU; ``user_propagation="none"`` is GRU4Rec."""

    def __init__(
        self,
        n_items: int,
        hidden_size: int = 100,
        user_hidden_size: int = 100,
        user_propagation: str = "init",
        user_to_output: bool = False,
        user_to_session_act: str = "tanh",
        reset_at: str = "session",
        final_act: str = "linear",
        dropout_session: float = 0.0,
        dropout_user: float = 0.0,
        dropout_init: float = 0.0,
    ):
        super().__init__()
        if user_propagation not in PROPAGATIONS:
            raise ValueError(f"user_propagation must be one of {PROPAGATIONS}")
        if reset_at not in RESETS or (reset_at == "user" and user_propagation != "none"):
            raise ValueError("reset_at='user' (RNN Concat) needs user_propagation='none'")
        self.reset_at = reset_at
        H, U = hidden_size, user_hidden_size
        self.hidden_size, self.user_hidden_size = H, U
        self.user_propagation = user_propagation
        self.hierarchical = user_propagation != "none"
        self.user_to_output = user_to_output and self.hierarchical
        self.final_act_name = final_act
        self.final_act = ACTIVATIONS[final_act]
        self.init_act_name = user_to_session_act
        self.init_act = ACTIVATIONS[user_to_session_act]

        scale = (6.0 / (n_items + 3 * H)) ** 0.5
        self.item_in = nn.Embedding(n_items, 3 * H, sparse=True)
        nn.init.uniform_(self.item_in.weight, -scale, scale)
        self.bias_in = nn.Parameter(torch.zeros(3 * H))
        self.w_h = nn.Linear(H, 3 * H)
        self.out_w = nn.Embedding(n_items, H, sparse=True)
        out_scale = (6.0 / (n_items + H)) ** 0.5
        nn.init.uniform_(self.out_w.weight, -out_scale, out_scale)
        self.out_b = nn.Embedding(n_items, 1, sparse=True)
        nn.init.zeros_(self.out_b.weight)
        self.drop_session = nn.Dropout(dropout_session)
        if self.hierarchical:
            self.user_gru = nn.GRUCell(H, U)
            self.w_init = nn.Linear(U, H)
            self.drop_user = nn.Dropout(dropout_user)
            self.drop_init = nn.Dropout(dropout_init)
            if user_propagation == "all":
                self.w_c = nn.Linear(U, 2 * H, bias=False)
            if self.user_to_output:
                self.out_u = nn.Embedding(n_items, U, sparse=True)
                nn.init.zeros_(self.out_u.weight)

    # ---- the model API (hrnn_lit.models.api): the state is (h [B, H], c [B, U])
    def start(self, state: State, starts: Starts) -> State:
        h, c = state
        return self.start_sessions(h, c, starts.session, starts.user, starts.next_session_rows)

    def step(self, items: Tensor, state: State) -> State:
        h, c = state
        return self.session_step(items, h, c), c

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        h, c = state
        return self.score_all(h, c) if items is None else self.score_items(h, c, items)

    def initial_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        h = torch.zeros(batch_size, self.hidden_size, device=device)
        c = torch.zeros(
            batch_size, self.user_hidden_size if self.hierarchical else 0, device=device
        )
        return h, c

    def start_sessions(
        self,
        h: Tensor,
        c: Tensor,
        session_start: Tensor,
        user_start: Tensor,
        next_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Apply the session- and user-start rules to rows flagged [B] bool.

        ``next_rows``: indices of the rows with session_start and not user_start; when given,
        the user GRU and the init projection run on those rows only.
        """
        ss, us = session_start[:, None], user_start[:, None]
        if not self.hierarchical:  # GRU4Rec resets per session, RNN Concat per user
            return zero_rows(h, user_start if self.reset_at == "user" else session_start), c
        if next_rows is None:
            c_next = self.drop_user(self.user_step(h, c))
            c = torch.where(us, 0.0, torch.where(ss, c_next, c))
            h0 = self.drop_init(self.init_act(self.w_init(c)))
            return torch.where(us, 0.0, torch.where(ss, h0, h)), c
        h, c = zero_rows(h, user_start), zero_rows(c, user_start)
        if next_rows.numel():
            c_rows = self.drop_user(self.user_step(h[next_rows], c[next_rows]))
            h_rows = self.drop_init(self.init_act(self.w_init(c_rows)))
            c = c.index_copy(0, next_rows, c_rows)
            h = h.index_copy(0, next_rows, h_rows)
        return h, c

    def session_step(self, item: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """One session-GRU step on input items [B]; returns the new h [B, H]."""
        H = self.hidden_size
        gi = self.item_in(item) + self.bias_in  # [B, 3H]
        gh = self.w_h(h)  # [B, 3H]
        if self.user_propagation == "all":  # W_c c joins the reset and update gates
            gi[:, : 2 * H].addmm_(c, self.w_c.weight.T)
        return gru_gates(gi, gh, h)[0]

    def user_step(self, h: Tensor, c: Tensor) -> Tensor:
        """The user GRU (``user_gru``'s weights) on session states h [R, H] from c [R, U]."""
        gru = self.user_gru
        gi = torch.addmm(gru.bias_ih, h, gru.weight_ih.T)  # [R, 3U]
        gh = torch.addmm(gru.bias_hh, c, gru.weight_hh.T)  # [R, 3U]
        return gru_gates(gi, gh, c)[0]

    def score_items(self, h: Tensor, c: Tensor, items: Tensor) -> Tensor:
        """Scores [B, N] of candidate items [N] (training: targets + samples)."""
        s = torch.addmm(self.out_b(items).T, self.drop_session(h), self.out_w(items).T)
        if self.user_to_output:
            s = s + c @ self.out_u(items).T
        return self.final_act(s)

    def score_all(self, h: Tensor, c: Tensor) -> Tensor:
        """Scores [B, n_items] over the whole catalogue (evaluation)."""
        s = torch.addmm(self.out_b.weight.T, h, self.out_w.weight.T)
        if self.user_to_output:
            s = s + c @ self.out_u.weight.T
        return self.final_act(s)
