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
  r(n) = g(b) . f(n) (+ a learned per-item repeat bias with ``item_bias``), the features
  f(n) = [log(1 + count of n), recency of n, n in the current session] (the recency being
  the count with a session k back weighted decay^k), plus event_decay^(events since n)
  with ``event_decay`` > 0;
- P(repeat) = sigmoid(w . [h; c] + v . u + b), and g(b) = W_g [h; c] + b_g: the states
  decide how much this slot repeats and how it weighs its history. ``user_features`` adds
  u = [log((repeats + 1/2) / (events - repeats + 1/2)), log(1 + events)], repeats being the
  user's past events whose item was listed (v starts at (1, 0): P(repeat) starts near the
  user's own repeat rate), so that the gate switches the repeat part off for a user who
  does not repeat without having to learn it first; ``mode_bias`` is b's initial value.
Where history carries no signal P(repeat) can go to zero and the model is the HRNN.
``repeat=False`` (an ablation) drops the repeat part. The explore part takes the GRU4Rec
recipe's options of ``RecurrentCore`` (``embedding``, ``constrained_embedding``,
``dropout_embed``, ``dropout_hidden``, ``final_act``); logQ is the module's ``model.logq``,
on the training scores only. ``fold_outside`` (training only) keeps the repeat mass of
listed items that are not candidates in the candidates' softmax (``_fold_outside``). None of
the options changes what ``score_bound`` relies on: an input embedding changes h only,
``final_act`` is non-decreasing, and the repeat features reach the listed items only.

State: (h [B, H], c [B, U], listed [B, memory] items, their entries [B, 4, memory] (count,
recency, in session, the user's event number at the item's last event), n_listed [B],
the user's (events, repeats) [B, 2]): the user's distinct past items and their counts,
updated in place (they take no gradient), independent of the catalogue's size. A user with
more than ``memory`` distinct items forgets the oldest listed one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrnn_lit.nets.api import ScoreBound, Starts, State
from hrnn_lit.nets.recurrent import RecurrentCore

N_ENTRIES = 4  # per listed item: count, recency, in session, event number at its last event
GATE_PRIOR = (1.0, 1.0, -3.0, 0.0)  # the repeat scores' initial weights of the features
N_USER = 2  # the gate's user features: repeat log-odds, log(1 + events)


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
        embedding: int = 0,
        constrained_embedding: bool = False,
        dropout_embed: float = 0.0,
        dropout_hidden: float = 0.0,
        final_act: str = "linear",
        event_decay: float = 0.0,
        user_features: bool = False,
        item_bias: bool = False,
        mode_bias: float | None = None,
        fold_outside: bool = False,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not 0.0 <= event_decay < 1.0:
            raise ValueError(f"event_decay must be in [0, 1), got {event_decay}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.n_items, self.decay, self.memory, self.repeat = n_items, decay, memory, repeat
        self.event_decay, self.user_features = event_decay, user_features
        self.fold_outside = fold_outside
        self.rnn = RecurrentCore(
            n_items, hidden_size=hidden_size, user_hidden_size=user_hidden_size,
            user_propagation=user_propagation, dropout_session=dropout_session,
            dropout_user=dropout_user, dropout_init=dropout_init, embedding=embedding,
            constrained_embedding=constrained_embedding, dropout_embed=dropout_embed,
            dropout_hidden=dropout_hidden, final_act=final_act,
        )  # fmt: skip
        c_size = user_hidden_size if user_propagation != "none" else 0
        n_features = 3 + (event_decay > 0)
        self.gate = nn.Linear(hidden_size + c_size, n_features)  # repeat scores' weights
        self.mode = nn.Linear(hidden_size + c_size, 1)  # P(repeat) = sigmoid(mode)
        nn.init.zeros_(self.gate.weight)
        with torch.no_grad():  # a prior: repeats of past items are likely, in-session ones not
            self.gate.bias.copy_(torch.tensor(GATE_PRIOR[:n_features]))
            if mode_bias is not None:
                self.mode.bias.fill_(mode_bias)
        if user_features:  # the user's repeat rate and events into P(repeat)
            self.mode_user = nn.Linear(N_USER, 1, bias=False)
            with torch.no_grad():
                self.mode_user.weight.copy_(torch.tensor([[1.0, 0.0]]))
        if item_bias:  # a learned repeat score per item (row-sparse updates)
            self.item_repeat = nn.Embedding(n_items, 1, sparse=True)
            nn.init.zeros_(self.item_repeat.weight)

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        h, c = self.rnn.initial_state(batch_size, device)
        listed = torch.zeros(batch_size, self.memory, dtype=torch.long, device=device)
        feats = torch.zeros(batch_size, N_ENTRIES, self.memory, device=device)
        n_listed = torch.zeros(batch_size, dtype=torch.long, device=device)
        stats = torch.zeros(batch_size, 2, device=device)
        return h, c, listed, feats, n_listed, stats

    def start(self, state: State, starts: Starts) -> State:
        h, c, listed, feats, n_listed, stats = state
        if starts.next_session_rows.numel():  # a known user's next session
            rows = starts.next_session_rows
            feats[rows, 1] *= self.decay  # earlier sessions weigh less
            feats[rows, 2] = 0.0  # a new current session
        new = starts.user.nonzero().view(-1)
        if new.numel():  # a new user: no history
            feats[new] = 0.0
            n_listed[new] = 0
            stats[new] = 0.0
        h, c = self.rnn.start((h, c), starts)
        return h, c, listed, feats, n_listed, stats

    def step(self, items: Tensor, state: State) -> State:
        h, c, listed, feats, n_listed, stats = state
        listed, feats = listed.contiguous(), feats.contiguous()  # (written through flat views)
        B, memory = items.numel(), self.memory
        # the item's first entry; the filled entries are each row's first n_listed ones (the
        # others hold stale items), and they are distinct
        found, first = (listed == items[:, None]).to(torch.uint8).max(1)
        new = (found == 0) | (first >= n_listed)  # a new item: the next place (the oldest one's)
        at = torch.where(new, n_listed % memory, first)
        slots = torch.arange(B, device=items.device)
        listed.view(-1)[slots * memory + at] = items
        n_listed += new
        stats[:, 0] += 1.0  # the user's events, and those that repeated a listed item
        stats[:, 1] += (~new).to(stats.dtype)
        # the item's (count, recency, in session, event number): (0, 0, 0, 0) first if new,
        # then (+1, +1, = 1, = the user's events)
        entry = (slots * (N_ENTRIES * memory) + at)[:, None] + self._entry_offsets(items)
        flat = feats.view(-1)
        value = flat[entry].masked_fill_(new[:, None], 0.0).add_(1.0)
        value[:, 2] = 1.0
        value[:, 3] = stats[:, 0]
        flat[entry] = value
        h, c = self.rnn.step(items, (h, c))
        return h, c, listed, feats, n_listed, stats

    def _entry_offsets(self, like: Tensor) -> Tensor:
        """[1, 4]: the entries' offsets in a slot's flat [4, memory] block."""
        return torch.arange(0, N_ENTRIES * self.memory, self.memory, device=like.device)[None]

    def _filled(self, n_listed: Tensor) -> Tensor:
        return torch.arange(self.memory, device=n_listed.device) < n_listed[:, None]

    def _features(self, feats: Tensor, stats: Tensor) -> Tensor:
        """The listed items' entries [B, 4, memory] -> the repeat part's features [B, F,
        memory]: log count, recency, in session (, event_decay^(events since the item))."""
        out = [feats[:, :1].log1p(), feats[:, 1:3]]
        if self.event_decay > 0:
            age = stats[:, :1, None] - feats[:, 3:4]  # 0 for the input item
            out.append(torch.pow(self.event_decay, age))
        return torch.cat(out, dim=1)

    def score(self, state: State, items: Tensor | None = None) -> Tensor:
        """log p(n) of the mixture for candidates [N] (training) or the catalogue. Only the
        listed items' columns mix both parts; every other column is log(1 - P(repeat)) +
        log p_explore, so the mixing costs O(B * memory), not O(B * N)."""
        if items is not None:  # (training: the module calls score_distinct)
            distinct, inverse = torch.unique(items, return_inverse=True)
            return self.score_distinct(state, distinct, inverse).index_select(1, inverse)
        h, c, listed = state[:3]
        s = self.rnn.score((h, c))  # [B, n_items]
        lse = torch.logsumexp(s, dim=1, keepdim=True)
        inplace = not s.requires_grad  # (evaluation: no [B, n_items] temporaries)
        out = s.sub_(lse) if inplace else s - lse  # log p_explore
        if not self.repeat:  # ablation: the explore part alone
            return out
        log_repeat, log_explore_w, filled = self._repeat_part(state)
        out = out.add_(log_explore_w) if inplace else out + log_explore_w
        return _mix(out, log_repeat, filled, listed)

    def score_bound(self, state: State) -> ScoreBound:
        """The catalogue scores' lower bound (``api.ScoreBound``): an item's score is
        log p_explore + log(1 - P(repeat)), a non-decreasing function of the HRNN's linear
        score, except on the row's listed items, whose score mixes in the repeat part
        (logaddexp: never below that value)."""
        h, c, listed, _, n_listed = state[:5]
        r, k = self._filled(n_listed).nonzero(as_tuple=True)
        if not self.repeat:
            r = k = r[:0]
        return ScoreBound(self.rnn.score_factors((h, c)), r, listed[r, k])

    def _repeat_part(self, state: State) -> tuple[Tensor, Tensor, Tensor]:
        """(log P(repeat) + log p_repeat [B, memory], log(1 - P(repeat)) [B, 1] (0 for a
        slot without history: explore only), the filled list entries [B, memory])."""
        h, c, listed, feats, n_listed, stats = state
        hc = torch.cat([h, c], dim=1)
        g = self.gate(hc)[:, None, :]  # [B, 1, F]
        r_list = torch.bmm(g, self._features(feats, stats)).squeeze(1)  # [B, memory]
        if hasattr(self, "item_repeat"):
            r_list = r_list + self.item_repeat(listed).squeeze(2)
        filled = self._filled(n_listed)
        # (finite mask: a slot without history keeps finite, zero gradients here)
        log_p_list = torch.log_softmax(r_list.masked_fill(~filled, -1e30), dim=1)
        a = self.mode_logit(hc, stats)  # [B, 1]: repeat or explore
        seen = n_listed[:, None] > 0  # no history yet: explore only
        log_explore_w = torch.where(seen, F.logsigmoid(-a), 0.0)  # [B, 1]
        return F.logsigmoid(a) + log_p_list, log_explore_w, filled

    def mode_logit(self, hc: Tensor, stats: Tensor) -> Tensor:
        """P(repeat)'s logit [B, 1] from [h; c] and the user's (events, repeats)."""
        a = self.mode(hc)
        if self.user_features:
            events, repeats = stats[:, :1], stats[:, 1:]
            odds = ((repeats + 0.5) / (events - repeats + 0.5)).log()
            a = a + self.mode_user(torch.cat([odds, events.log1p()], dim=1))
        return a

    def p_repeat(self, state: State) -> Tensor:
        """P(repeat) [B] of each slot (0 for a slot without history)."""
        h, c, n_listed, stats = state[0], state[1], state[4], state[5]
        p = torch.sigmoid(self.mode_logit(torch.cat([h, c], dim=1), stats)).squeeze(1)
        return torch.where(n_listed > 0, p, 0.0)

    def score_distinct(self, state: State, items: Tensor, inverse: Tensor) -> Tensor:
        """Scores [B, M] of the distinct candidates ``items`` [M], given each of the N
        candidate columns' index into them, ``inverse`` [N] (``api``): a candidate that
        occurs k times weighs k in the explore part's softmax over the candidates."""
        h, c, listed = state[:3]
        counts = torch.bincount(inverse, minlength=items.numel())
        s = self.rnn.score((h, c), items)  # [B, M]
        if not self.repeat:  # ablation: the explore part alone
            return _log_softmax_counts(s, counts, None)
        log_repeat, log_explore_w, filled = self._repeat_part(state)
        out = _log_softmax_counts(s, counts, log_explore_w)  # log (1 - P(repeat)) p_explore
        where = torch.full((self.n_items,), -1, dtype=torch.long, device=items.device)
        where[items] = torch.arange(items.numel(), device=items.device)
        col = where[listed]
        out = _mix(out, log_repeat, filled, col)
        if self.fold_outside and self.training and items.numel() > 1:
            out = _fold_outside(out, log_repeat, filled & (col < 0), inverse, counts)
        return out


def _mix(out: Tensor, log_repeat: Tensor, filled: Tensor, col: Tensor) -> Tensor:
    """The mixture's rule on the listed items' columns ``col`` [B, memory] (-1: no column)
    of ``out`` = log (1 - P(repeat)) p_explore: log (P(repeat) p_repeat + (1 - P(repeat))
    p_explore), in place, over [B, memory] only (a row's listed items are distinct)."""
    r, k = (filled & (col >= 0)).nonzero(as_tuple=True)
    cols = col[r, k]
    mixed = torch.logaddexp(log_repeat[r, k], out[r, cols])
    return out.index_put_((r, cols), mixed)


def _fold_outside(
    out: Tensor, log_repeat: Tensor, outside: Tensor, inverse: Tensor, counts: Tensor
) -> Tensor:
    """Training: the repeat mass on a row's listed items that are not candidates
    (``outside`` [B, memory]) added to one column other than the row's target (column 0,
    or 1 where the target is 0; divided by its count), so that the candidates' softmax
    keeps the mixture's whole mass: otherwise it renormalises that mass away, and P(repeat)
    gets no gradient from the listed items the step did not sample."""
    B = out.shape[0]
    mass = torch.logsumexp(log_repeat.masked_fill(~outside, -1e30), dim=1)  # [B] (finite)
    other = (inverse[:B] == 0).long()[:, None]  # [B, 1]
    mass = mass[:, None] - counts[other].to(out.dtype).log()
    return out.scatter(1, other, torch.logaddexp(out.gather(1, other), mass))


class _LogSoftmaxCounts(torch.autograd.Function):
    """s - log(sum_m counts_m exp(s_m)) (+ shift) of scores s [B, M]: the log-softmax of M
    columns where column m stands for counts_m equal ones, in one pass less than autograd's
    and one pass back."""

    @staticmethod
    def forward(ctx, s: Tensor, counts: Tensor, shift: Tensor | None) -> Tensor:
        m = s.amax(1, keepdim=True)
        e = (s - m).exp_().mul_(counts.to(s.dtype))  # counts_m exp(s_m - max)
        z = e.sum(1, keepdim=True)
        lse = z.log().add_(m)
        ctx.save_for_backward(e, z)
        ctx.shift = shift is not None
        return s - (lse if shift is None else lse - shift)

    @staticmethod
    def backward(ctx, g: Tensor):
        e, z = ctx.saved_tensors
        g_sum = g.sum(1, keepdim=True)
        # d/ds_m = g_m - p_m sum(g), p_m = counts_m exp(s_m - lse) = e_m / z
        return torch.addcmul(g, e, g_sum / z, value=-1), None, (g_sum if ctx.shift else None)


def _log_softmax_counts(s: Tensor, counts: Tensor, shift: Tensor | None) -> Tensor:
    return _LogSoftmaxCounts.apply(s, counts, shift)
