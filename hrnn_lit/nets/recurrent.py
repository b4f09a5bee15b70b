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
Each is ``nn.Dropout``: a fresh mask per step, per slot and unit, scaled by 1 / (1 - p).

The session GRU's cell (``gru_variant``): ``torch``, torch's reset-after cell
n = tanh(x_n + r * (W_hn h + b_hn)); or ``official``, the official GRU4Rec code's one-hot
cell (its ``GRUEmbedding``), reset before the product, n = tanh(x_n + (r * h) W_hn^T),
and no hidden biases: ``bias_in`` is the only bias (``w_h``'s is unused; torch's cell has
both, so its r and z biases are two parameters, each updated by the optimiser).
``gru_init``: ``torch``, ``w_h`` as ``nn.Linear`` (uniform +-1/sqrt(H), biases too) and the
one-hot table uniform +-sqrt(6 / (n_items + 3H)); or ``official``, the official code's
compatibility mode: every gate block uniform +-sqrt(6 / (fan_in + fan_out)) (``w_h``
+-sqrt(6 / 2H), the one-hot table +-sqrt(6 / (n_items + H))), zero biases. With an input
embedding or the tied one the official code uses torch's cell (``nn.GRUCell``). The user
GRU keeps torch's cell and init.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hrnn_lit.nets.api import ScoreFactors, Starts, State, linear_scores
from hrnn_lit.ops.activations import (  # noqa: F401 (re-exported: config, tests)
    ACTIVATIONS,
    activation,
    activation_derivative,
    parse_activation,
)
from hrnn_lit.ops.gru import dropout_mask, gru_cell, user_start, zero_rows
from hrnn_lit.ops.tables import rows

PROPAGATIONS = ("none", "init", "all")
RESETS = ("session", "user")
GRU_VARIANTS = ("torch", "official")
GRU_INITS = ("torch", "official")
INPUT_TABLES = {"onehot": "item_in", "embedding": "embed", "constrained": "out_w"}


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
        gru_variant: str = "torch",
        gru_init: str = "torch",
    ):
        super().__init__()
        if gru_variant not in GRU_VARIANTS:
            raise ValueError(f"gru_variant must be one of {GRU_VARIANTS}, got {gru_variant!r}")
        if gru_init not in GRU_INITS:
            raise ValueError(f"gru_init must be one of {GRU_INITS}, got {gru_init!r}")
        self.gru_variant = gru_variant
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
        parse_activation(final_act)  # ValueError naming a wrong name
        self.final_act_name = final_act
        if user_to_session_act not in ACTIVATIONS:
            raise ValueError(f"user_to_session_act must be one of {sorted(ACTIVATIONS)}")
        self.init_act_name = user_to_session_act

        self.input_mode = (
            "constrained" if constrained_embedding else "embedding" if embedding > 0 else "onehot"
        )
        if self.input_mode == "onehot":
            # official: each gate's block [n_items, H] in +-sqrt(6 / (n_items + H))
            scale = (6.0 / (n_items + (H if gru_init == "official" else 3 * H))) ** 0.5
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
        if gru_init == "official":  # each gate's block [H, H] in +-sqrt(6 / 2H), zero bias
            nn.init.uniform_(self.w_h.weight, -((3.0 / H) ** 0.5), (3.0 / H) ** 0.5)
            nn.init.zeros_(self.w_h.bias)
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

    # ---- the model API (hrnn_lit.nets.api): the state is (h [B, H], c [B, U])
    def initial_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        h = torch.zeros(batch_size, self.hidden_size, device=device)
        c = torch.zeros(
            batch_size, self.user_hidden_size if self.hierarchical else 0, device=device
        )
        return h, c

    def start(self, state: State, starts: Starts) -> State:
        """The session- and user-start rules (module docstring); the user GRU and the init
        projection run on the rows of known users' next sessions only."""
        h, c = state
        if not self.hierarchical:  # GRU4Rec resets per session, RNN Concat per user
            return zero_rows(h, starts.user if self.reset_at == "user" else starts.session), c
        h, c = zero_rows(h, starts.user), zero_rows(c, starts.user)
        next_rows = starts.next_session_rows
        if next_rows.numel():
            R, (H, U) = next_rows.numel(), (self.hidden_size, self.user_hidden_size)
            mask_user = dropout_mask(self.drop_user, (R, U), c)  # drawn in nn.Dropout's order
            mask_init = dropout_mask(self.drop_init, (R, H), h)
            h_rows, c_rows = user_start(
                h[next_rows], c[next_rows], self.user_gru, self.w_init, self.init_act_name,
                mask_user, mask_init,
            )  # fmt: skip
            c = c.index_copy(0, next_rows, c_rows)
            h = h.index_copy(0, next_rows, h_rows)
        return h, c

    def step(self, items: Tensor, state: State) -> State:
        """One session-GRU step on input items [B]; the new h (``dropout_hidden`` applied:
        the state carried and scored)."""
        h, c = state
        H = self.hidden_size
        gi = self.input_projection(items)  # [B, 3H]
        if self.user_propagation == "all":  # W_c c joins the reset and update gates
            gi = torch.cat([torch.addmm(gi[:, : 2 * H], c, self.w_c.weight.T), gi[:, 2 * H :]], 1)
        if self.gru_variant == "official":  # reset before the product, no hidden biases
            w = self.w_h.weight
            h_new = gru_cell(gi, h @ w[: 2 * H].T, h, w_hn=w[2 * H :])  # gh [B, 2H]
        else:
            h_new = gru_cell(gi, self.w_h(h), h)  # gh [B, 3H]
        return (self.drop_hidden(h_new) if self.drop_hidden.p > 0 else h_new), c

    @property
    def session_only(self) -> bool:
        """Whether every session starts from h = 0 (GRU4Rec): evaluation then replays only
        the sessions it scores (``hrnn_lit.evaluation.loop``)."""
        return not self.hierarchical and self.reset_at == "session"

    def score_factors(self, state: State) -> ScoreFactors:
        """The scores' linear form: h . out_w[item] + out_b[item] (+ c . out_u[item]), then
        ``final_act`` (``dropout_session`` on h in training)."""
        h, c = state
        queries, tables = [self.drop_session(h)], [self.out_w.weight]
        if self.user_to_output:
            queries.append(c)
            tables.append(self.out_u.weight)
        return ScoreFactors(tuple(queries), tuple(tables), self.out_b.weight, self.final_act_name)

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        return linear_scores(self.score_factors(state), items)

    # ---- the parts of the step
    @property
    def input_table(self) -> nn.Embedding:
        """The item table the input item's row comes from (``item_in``, ``embed`` or, tied,
        ``out_w``)."""
        return getattr(self, INPUT_TABLES[self.input_mode])

    def input_projection(self, items: Tensor) -> Tensor:
        """The GRU's input projection [B, 3H] of input items [B] (bias included), with
        ``dropout_embed`` on the input embedding (one-hot: on the one-hot vector, i.e. the
        row as a whole)."""
        drop = self.drop_embed.p > 0 and self.training
        x = rows(self.input_table.weight, items)  # [B, 3H] one-hot, else [B, E]
        if self.input_mode == "onehot":
            if drop:
                x = x * self.drop_embed(x.new_ones(x.shape[0], 1))
            return x + self.bias_in
        if drop:
            x = self.drop_embed(x)
        return torch.addmm(self.bias_in, x, self.w_in.weight.T)
