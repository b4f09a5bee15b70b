"""The model API: what a network implements to be trained, replayed and evaluated by
hrnn_lit (docs/design.md §10).

A network is a forward-only ``nn.Module`` whose constructor takes ``n_items`` (the catalogue
size) plus its own hyperparameters, and which defines four methods over a *state*: a tuple
of tensors whose first dimension is the B batch slots (any number of tensors, any shapes
after the first dimension).

- ``initial_state(batch_size, device) -> state``: the state of fresh slots;
- ``start(state, starts) -> state``: the rules at session and user starts (``Starts``),
  applied before the step of the time step where they happen;
- ``step(items, state) -> state``: one step on the slots' input items [B]; a ``step``
  with a third parameter, ``step(items, state, context)``, is also given the slots'
  ``Context`` (user, event time, gap, position in the session): what session-aware models
  learn from, and nothing for networks that do not ask. A constructor with an ``n_users``
  parameter gets the size of the user vocabulary (for a learned user embedding);
- ``score(state, items) -> scores``: scores [B, N] of candidate items [N] (training: the
  slots' targets, then sampled negatives), or of the whole catalogue [B, n_items] when
  ``items`` is None (evaluation).

hrnn_lit does the rest: user-parallel slots, masking of empty slots, sampled negatives, the
losses, one optimiser update per time step with states carried detached (no
back-propagation through time), history replay and full-catalogue ranking, checkpoints and
data-parallel gradient averaging. Item tables declared as ``nn.Embedding(..., sparse=True)``
get row-sparse gradients, and the optimisers update only the rows a step touched.
A slot's result must depend on its own row only (no batch statistics across slots).

Evaluation (``hrnn_lit.evaluation.loop``, docs/design.md §6) relies on that: at each time
step it runs ``start`` on the slots that start a session (the rules must leave a slot
without a start as it is) and ``step`` on the slots whose state can still matter (never on
an empty slot), writing their rows back into the carried state, and it ranks the scored
slots' targets in row blocks. A network may add, all optional:

- ``session_only = True``: the session-start rule wipes the state (nothing before a session
  start matters after it), so sessions without a scored step are not replayed;
- ``score_factors(state) -> ScoreFactors``: its scores are a linear form of the state;
  evaluation then ranks from column blocks of the product, never the score matrix, and
  stops at the largest K of the metrics (training fuses them with the loss);
- ``sparse_scores(state) -> SparseScores``: one base score per item for every slot, a few
  per-slot entries over it; ranks then come from a binary search in the sorted base;
- ``score_bound(state) -> ScoreBound``: its scores are, per slot, a non-decreasing
  function of a linear form of the state, except on a few per-slot entries that never
  score below it; with the conservative tie rule, a target outside its slot's entries that
  more than the largest K items beat on the linear form misses every top K, and is ranked
  so from column blocks of the product; only the others are scored by ``score`` (the bound
  must hold for the values ``score`` computes, rounding included);
- ``score_distinct(state, items, inverse) -> scores``: training's candidates scored once
  each: scores [B, M] of a step's distinct candidates ``items`` [M], given each of the N
  candidate columns' index into them, ``inverse`` [N] (a repeated candidate scores the same
  in each of its columns; a network normalising over the candidates weighs it by its
  count); cross-entropy then stays on the M columns (``ops.sampled_loss``); its ``score``
  of candidates should come from it (the spread ``[:, inverse]``), so the rule is written once;
- ``observe(state, targets) -> state``: told the slots' target items [B] after the step's
  scores were taken (evaluation only: how a model without training, like the baselines,
  learns a session's last item, which is never an input).

A state tensor may grow along its trailing dimensions (e.g. a buffer of the user's items),
at their ends; the new entries of slots that were not stepped take the value of the
initial state's first entry. Tensors of the state may be updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class Starts:
    """What happens at one time step's session boundaries, per slot.

    ``session`` [B] bool: the slot starts a session (its user's first one, or the next one);
    ``user`` [B] bool: the slot starts a new user (its state must be reset, whatever it was);
    ``next_session_rows`` [R] int64: the slots with ``session & ~user``, i.e. a known user's
    next session (where a hierarchical model updates its user state)."""

    session: Tensor
    user: Tensor
    next_session_rows: Tensor

    def rows(self, idx: Tensor) -> Starts:
        """The same starts for the slots ``idx`` only (evaluation on a subset of rows)."""
        session, user = self.session[idx], self.user[idx]
        return Starts(session, user, (session & ~user).nonzero().view(-1))


@dataclass(frozen=True)
class Context:
    """What a step knows besides its input items (for a ``step(items, state, context)``),
    each [B]: ``user``, the slot's user in the model's user vocabulary (the fit split's
    users in sorted order; -1 for a user it was not trained on); ``time``, the input event's
    Unix seconds; ``gap``, seconds since the user's previous event (0 at the first);
    ``position``, the input's 1-based position in its session."""

    user: Tensor
    time: Tensor
    gap: Tensor
    position: Tensor

    def rows(self, idx: Tensor) -> Context:
        return Context(self.user[idx], self.time[idx], self.gap[idx], self.position[idx])


def takes_context(net: torch.nn.Module) -> bool:
    """Whether the network's ``step`` takes a third argument, the ``Context``."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(net.step).parameters.values()
    return sum(p.kind in kinds for p in params) >= 3


@dataclass(frozen=True)
class ScoreFactors:
    """Scores as a linear form of the state, for networks that have one (optional
    ``score_factors(state)`` method): scores [B, N] of items [N] are
    ``act(sum_k queries[k] @ tables[k][items].T + bias[items])``, with ``queries[k]`` [B, D_k],
    ``tables[k]`` [n_items, D_k] (item tables: parameters) and ``bias`` [n_items, 1].
    Training then fuses the candidates' scores with the loss (``ops.sampled_loss``: each
    distinct candidate's rows gathered once, row-sparse gradients) and evaluation ranks the
    catalogue in blocks without the score matrix; a network defining it gets its
    ``score`` from it (``linear_scores``), so the rule is written once."""

    queries: tuple[Tensor, ...]
    tables: tuple[Tensor, ...]
    bias: Tensor
    act: str = "linear"


@dataclass(frozen=True)
class SparseScores:
    """Catalogue scores of N slots: ``base`` for every slot, except the entries
    (``rows``, ``items``) -> ``values`` (an item at most once per row). ``base`` is the same
    for every call of an evaluation pass."""

    base: Tensor  # [n_items]
    rows: Tensor  # [E] int64, in 0..N-1
    items: Tensor  # [E] int64
    values: Tensor  # [E], base's dtype

    def dense(self, n_rows: int) -> Tensor:
        """The [n_rows, n_items] score matrix."""
        scores = self.base.repeat(n_rows, 1)
        scores[self.rows, self.items] = self.values
        return scores


@dataclass(frozen=True)
class ScoreBound:
    """What a network's catalogue scores are bounded below by (optional
    ``score_bound(state)`` method): for each slot b there is a non-decreasing g_b with
    score(b, n) = g_b(f(b, n)) for every item n except the entries (``rows``, ``items``),
    where score(b, n) >= g_b(f(b, n)); f the scores ``factors`` define, as ``score`` computes
    them (e.g. a softmax's log-probabilities of a linear form, items of the slot's own
    history raised by a mixture). So an item that scores at least the target on f scores at
    least the target, unless the target is one of its slot's entries."""

    factors: ScoreFactors
    rows: Tensor  # [E] int64, in 0..B-1
    items: Tensor  # [E] int64


def linear_scores(f: ScoreFactors, items: Tensor | None = None) -> Tensor:
    """The scores ``f`` defines: [B, N] of items [N] (training: with row-sparse gradients
    for the tables), or [B, n_items] of the whole catalogue when ``items`` is None."""
    from hrnn_lit.ops.activations import activation, ranking_activation
    from hrnn_lit.ops.tables import rows

    if items is None:
        s = torch.addmm(f.bias.T, f.queries[0], f.tables[0].T)  # [B, n_items]
        for q, w in zip(f.queries[1:], f.tables[1:]):
            s = s + q @ w.T
        return activation(ranking_activation(f.act))(s)
    s = torch.addmm(rows(f.bias, items).T, f.queries[0], rows(f.tables[0], items).T)  # [B, N]
    for q, w in zip(f.queries[1:], f.tables[1:]):
        s = s + q @ rows(w, items).T
    return activation(f.act)(s)


@runtime_checkable
class SessionModel(Protocol):
    """The four methods of the model API (see the module docstring)."""

    def initial_state(self, batch_size: int, device: torch.device) -> State: ...

    def start(self, state: State, starts: Starts) -> State: ...

    def step(self, items: Tensor, state: State) -> State: ...

    def score(self, state: State, items: Tensor | None = None) -> Tensor: ...


def check_model(net: torch.nn.Module, name: str = "model.net") -> None:
    """Raise TypeError naming what ``net`` lacks of the model API."""
    missing = [
        m
        for m in ("initial_state", "start", "step", "score")
        if not callable(getattr(net, m, None))
    ]
    if missing:
        raise TypeError(f"{name}: {type(net).__name__} lacks {', '.join(missing)} of the model API")


def detach(state: State) -> State:
    return tuple(x.detach() for x in state)


def select(state: State, idx: Tensor) -> State:
    """The slots ``idx`` of every tensor of the state."""
    return tuple(x[idx] for x in state)


def cat(states: list[State]) -> State:
    """States of row sets concatenated along the slots."""
    return tuple(torch.cat(xs) for xs in zip(*states))


def put_rows(state: State, rows: Tensor, sub: State, fresh: State, name: str = "model") -> State:
    """``state`` with the slots ``rows`` set to the first rows of ``sub``. A tensor that grew
    in ``sub`` is widened first, its new entries filled with the first entry of ``fresh``
    (a fresh slot's state, ``initial_state(1, ...)``); a tensor may only grow."""
    out = []
    for i, (full, part) in enumerate(zip(state, sub)):
        part = part[: rows.numel()]
        if part.shape[1:] != full.shape[1:]:
            shape = part.shape[1:]
            if len(shape) != full.dim() - 1 or any(a > b for a, b in zip(full.shape[1:], shape)):
                raise ValueError(f"{name}: a state tensor may only grow")
            full = widen(full, shape, fresh[i].reshape(-1)[0] if fresh[i].numel() else 0)
        out.append(full.index_copy(0, rows, part))
    return tuple(out)


def widen(full: Tensor, shape: torch.Size, fill) -> Tensor:
    """``full`` grown to ``shape`` after its first dimension, new entries ``fill``."""
    wide = full.new_full((full.shape[0], *shape), fill)
    wide[(slice(None), *(slice(0, s) for s in full.shape[1:]))] = full
    return wide
