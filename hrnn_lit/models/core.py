"""The recurrent core shared by the session RNN (GRU4Rec) and the hierarchical RNN.

Shapes: B slots, H session units, U user units, N candidate items, E embedding units.
- input item -> its row of ``item_in`` ([n_items, 3H]: the GRU's input weights applied to a
  one-hot item), so the input projection is a gather, not a matmul (the default, one-hot
  input); or, as the official GRU4Rec code's alternatives, its row of an input embedding
  [n_items, E] (``embedding=E``) or of the output item matrix ``out_w`` (H units,
  ``constrained_embedding``: input and output item embeddings tied), times ``w_in`` [3H, E];
- session GRU: h [B, H]; user GRU: c [B, U] (HRNN only);
- scores: h @ out_w[items].T + out_b[items] (+ c @ out_u[items].T with user_to_output).

HRNN state rules (docs/design.md §2): at a user's first step h = 0 and c = 0; at any other session
start c <- GRU_usr(h, c), with h the state after the last input of the previous session, and
h <- dropout(act(W_init c + b_init)). Without a user level, h is zeroed at every session
start (GRU4Rec) or only at user starts (``reset_at="user"``: the paper's RNN Concat, one
sequence of all of a user's sessions). ``user_propagation="all"`` also adds W_c c to the
session GRU's reset and update gates at every step (the reference code's choice).

Dropouts of a session step, in training, in this order (docs/design.md §11):
- ``dropout_embed``: on the input embedding before the GRU (the official
  ``dropout_p_embed``); with one-hot input it drops the slot's whole input item (its one-hot
  vector, scaled by 1 / (1 - p));
- ``dropout_hidden``: on the GRU's new state, which is carried to the next step and scored
  (the official ``dropout_p_hidden``; with one-hot input the official code applies
  ``dropout_p_embed`` there, as its input embedding is the GRU itself);
- ``dropout_session``: on the state where it is scored only (the carried state keeps all
  its units).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hrnn_lit.models import native
from hrnn_lit.models.api import Starts, State

PROPAGATIONS = ("none", "init", "all")
RESETS = ("session", "user")
ACTIVATIONS = {"linear": lambda x: x, "tanh": torch.tanh, "relu": torch.relu}
INPUT_TABLES = {"onehot": "item_in", "embedding": "embed", "constrained": "out_w"}
PARAMETRIC = {"leaky": 1, "elu": 1, "selu": 2}  # name-<a>[-<b>]: number of parameters


def parse_activation(name: str) -> tuple[str, tuple[float, ...]]:
    """(kind, parameters) of an activation name: ``linear``, ``tanh``, ``relu``, or the
    official GRU4Rec code's ``leaky-<a>``, ``elu-<a>``, ``selu-<lambda>-<alpha>`` with
    parameters > 0 (strictly increasing functions). ValueError naming what is wrong."""
    if name in ACTIVATIONS:
        return name, ()
    kind, *args = str(name).split("-")
    if kind not in PARAMETRIC or len(args) != PARAMETRIC[kind]:
        raise ValueError(
            f"must be one of {sorted(ACTIVATIONS)}, leaky-<a>, elu-<a> or "
            f"selu-<lambda>-<alpha>, got {name!r}"
        )
    try:
        params = tuple(float(a) for a in args)
    except ValueError:
        raise ValueError(f"{name!r}: the parameters must be numbers") from None
    if not all(p > 0 and p < float("inf") for p in params):
        raise ValueError(f"{name!r}: the parameters must be finite and > 0")
    return kind, params


def activation(name: str):
    """The function of an activation name (``parse_activation``), as the official code
    defines them (switching at x >= 0): leaky-a: x or a x; elu-a: x or a (e^x - 1);
    selu-l-a: l x or l a (e^x - 1)."""
    kind, params = parse_activation(name)
    if kind in ACTIVATIONS:
        return ACTIVATIONS[kind]
    if kind == "leaky":
        (a,) = params
        return lambda x: torch.where(x >= 0, x, a * x)
    lam, a = (1.0, *params) if kind == "elu" else params
    # expm1 of the clamped value: the unused branch stays finite (no 0 * inf in backward)
    return lambda x: lam * torch.where(x >= 0, x, a * torch.expm1(x.clamp(max=0)))


def activation_derivative(name: str, y: Tensor) -> Tensor | float | None:
    """d y / d x of y = act(x) from y alone (None: identity). With parameters > 0, y >= 0
    exactly where x >= 0."""
    kind, params = parse_activation(name)
    if kind == "linear":
        return None
    if kind == "tanh":
        return 1 - y * y
    if kind == "relu":
        return y > 0
    if kind == "leaky":
        return torch.full_like(y, params[0]).masked_fill_(y >= 0, 1.0)
    lam, a = (1.0, *params) if kind == "elu" else params
    return (y + lam * a).masked_fill_(y >= 0, lam)


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
    index (faster than a broadcast mask there); elsewhere by mask (no host sync)."""
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
        embedding: int = 0,
        constrained_embedding: bool = False,
        dropout_embed: float = 0.0,
        dropout_hidden: float = 0.0,
    ):
        super().__init__()
        if constrained_embedding and embedding > 0:
            raise ValueError(
                "constrained_embedding (input = output item matrix) and "
                "embedding > 0 (a separate input embedding) exclude each other"
            )
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
        self.final_act = activation(final_act)
        # evaluation ranks the catalogue by the scores before a parametric activation: it is
        # strictly increasing (the same order) and cannot saturate scores into ties; the
        # official code's evaluation leaves its elu out too
        self.eval_act = self.final_act if final_act in ACTIVATIONS else ACTIVATIONS["linear"]
        self.init_act_name = user_to_session_act
        self.init_act = ACTIVATIONS[user_to_session_act]

        self.input_mode = (
            "constrained" if constrained_embedding else "embedding" if embedding > 0 else "onehot"
        )
        if self.input_mode == "onehot":
            scale = (6.0 / (n_items + 3 * H)) ** 0.5
            self.item_in = nn.Embedding(n_items, 3 * H, sparse=True)
            nn.init.uniform_(self.item_in.weight, -scale, scale)
        else:
            E = H if constrained_embedding else embedding
            self.embedding_size = E
            if self.input_mode == "embedding":
                self.embed = nn.Embedding(n_items, E, sparse=True)
                emb_scale = (6.0 / (n_items + E)) ** 0.5
                nn.init.uniform_(self.embed.weight, -emb_scale, emb_scale)
            # the official code's (compatibility-mode) initialisation: each gate's block
            # uniform in +-sqrt(6 / (fan_in + fan_out))
            self.w_in = nn.Linear(E, 3 * H, bias=False)
            nn.init.uniform_(self.w_in.weight, -((6.0 / (E + H)) ** 0.5), (6.0 / (E + H)) ** 0.5)
        self.bias_in = nn.Parameter(torch.zeros(3 * H))
        self.w_h = nn.Linear(H, 3 * H)
        self.out_w = nn.Embedding(n_items, H, sparse=True)
        out_scale = (6.0 / (n_items + H)) ** 0.5
        nn.init.uniform_(self.out_w.weight, -out_scale, out_scale)
        self.out_b = nn.Embedding(n_items, 1, sparse=True)
        nn.init.zeros_(self.out_b.weight)
        self.drop_session = nn.Dropout(dropout_session)
        self.drop_embed = nn.Dropout(dropout_embed)
        self.drop_hidden = nn.Dropout(dropout_hidden)
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

    @property
    def input_table(self) -> nn.Embedding:
        """The item table the input item's row comes from (``item_in``, ``embed`` or, tied,
        ``out_w``)."""
        return getattr(self, INPUT_TABLES[self.input_mode])

    def input_projection(self, item: Tensor) -> Tensor:
        """The GRU's input projection [B, 3H] of input items [B] (bias included), with
        ``dropout_embed`` on the input embedding (one-hot: on the one-hot vector, i.e. the
        row as a whole)."""
        drop = self.drop_embed.p > 0 and self.training
        if self.input_mode == "onehot":
            x = self.item_in(item)
            if drop:
                x = x * self.drop_embed(x.new_ones(x.shape[0], 1))
            return x + self.bias_in
        e = self.input_table(item)
        if drop:
            e = self.drop_embed(e)
        return torch.addmm(self.bias_in, e, self.w_in.weight.T)

    def session_step(self, item: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """One session-GRU step on input items [B]; returns the new h [B, H]
        (``dropout_hidden`` applied: the state carried and scored)."""
        H = self.hidden_size
        gi = self.input_projection(item)  # [B, 3H]
        gh = self.w_h(h)  # [B, 3H]
        if self.user_propagation == "all":  # W_c c joins the reset and update gates
            gi[:, : 2 * H].addmm_(c, self.w_c.weight.T)
        h_new = gru_gates(gi, gh, h)[0]
        return self.drop_hidden(h_new) if self.drop_hidden.p > 0 else h_new

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
        return self.eval_act(s)
