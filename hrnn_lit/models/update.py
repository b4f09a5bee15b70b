"""One training step of the recurrent core, forward and backward by hand.

A step (docs/design.md §2: one update per time step, no back-propagation through time) is the
session-GRU step, the scores of the step's targets and sampled negatives, the loss and the
gradients of every parameter the step touched. They are set as ``.grad``: dense for the GRU
weights, and for the item tables a coalesced row-sparse gradient with one row per distinct
item, so the optimiser, gradient clipping and data-parallel averaging see what autograd on
``nn.Embedding(sparse=True)`` would give them, without its per-occurrence rows, sort and
merge. No autograd graph is built: the user level's step at HRNN session starts
(``start_sessions``) is differentiated by hand too.

With cross-entropy (``distinct_loss``) the step scores each distinct candidate once, its
multiplicity entering the softmax as a log-count logit bias: (a)'s popularity samples repeat
items, and the [B, N] products, gathers and per-column row sums shrink to [B, M].

The loss is the mean over the step's valid slots; the gradient is that of the loss times
the share of valid slots, i.e. of the sum over valid slots / B. The results equal autograd
through ``RecurrentCore.step``, ``score_items`` and that scaled loss (tests/test_update.py).
Shapes: B slots, H session units, U user units, N candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hrnn_lit.data.batching import Chunk
from hrnn_lit.models import native
from hrnn_lit.models.core import RecurrentCore, activation_derivative, gru_gates, zero_rows

LossGrad = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]
DistinctLossGrad = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _act_derivative(name: str, y: Tensor) -> Tensor | None:
    """d y / d s of an activation y = act(s) (final scores, init projection), from y
    (None: identity)."""
    return activation_derivative(name, y)


def _merge_rows(rows_a: Tensor, g_a: Tensor, rows_b: Tensor, g_b: Tensor) -> tuple[Tensor, Tensor]:
    """One coalesced row-sparse gradient (distinct rows, their summed gradient rows) from two
    of the same table (the tied item matrix: its output rows and its input rows)."""
    rows, inv = torch.unique(torch.cat([rows_a, rows_b]), return_inverse=True)
    g = g_a.new_zeros(rows.numel(), g_a.shape[1])
    return rows, g.index_add_(0, inv, torch.cat([g_a, g_b]))


def _row_sums(uniq: Tensor, inv: Tensor, per_occurrence: Tensor) -> Tensor:
    """Gradient rows [M, D] of a table's distinct items uniq [M] from per-occurrence rows:
    rows of repeated items summed (inv: each occurrence's index into uniq)."""
    rows = per_occurrence.new_zeros(uniq.numel(), per_occurrence.shape[1])
    return rows.index_add_(0, inv, per_occurrence)


def chunk_unique(x: Tensor, n: int) -> tuple[Tensor, Tensor, list[int]]:
    """``torch.unique(x[t], return_inverse=True)`` of every row of x [T, M] (values in
    [0, n)) in one call, on keys t * n + x: the rows' sorted distinct values concatenated,
    the inverse [T, M] (indices into the row's own values) and the rows' offsets into the
    values as host ints (one device sync per chunk instead of two per step).
    Row t: ``values[off[t]:off[t + 1]], inverse[t]``."""
    T = x.shape[0]
    base = torch.arange(T, device=x.device)[:, None] * n  # [T, 1]
    keys, inverse = torch.unique(x + base, return_inverse=True)
    row = keys.div(n, rounding_mode="floor")
    starts = torch.zeros(T + 1, dtype=torch.long, device=x.device)
    starts[1:] = torch.bincount(row, minlength=T).cumsum(0)
    return keys - row * n, inverse - starts[:-1, None], starts.tolist()


def _counts(inverse: Tensor, valid: Tensor, size: int) -> Tensor:
    """How often each of ``size`` distinct candidates occurs among the valid columns (the
    B slots' targets where valid [..., B], then the samples), from each column's index
    into them, inverse [..., N] (indices over all rows when batched): int64 [size]."""
    occurs = torch.ones_like(inverse)
    occurs[..., : valid.shape[-1]] = valid
    return torch.zeros(size, dtype=torch.long, device=inverse.device).index_add_(
        0, inverse.reshape(-1), occurs.reshape(-1)
    )


Distinct = tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def step_distinct(candidates: Tensor, items: Tensor, valid: Tensor) -> Distinct:
    """A step's distinct candidates (values [M], each candidate's index into them [N],
    their counts among the valid columns [M]) and distinct input items (values, inverse)."""
    values, inverse = torch.unique(candidates, return_inverse=True)
    counts = _counts(inverse, valid, values.numel())
    return (values, inverse, counts), torch.unique(items, return_inverse=True)


def chunk_distinct(candidates: Tensor, items: Tensor, valid: Tensor, n: int) -> list[Distinct]:
    """``step_distinct`` for every time step of a chunk: candidates [T, N], input items and
    valid slots [T, B] (values in [0, n)), one call each: on CPU through
    ``native.distinct_rows`` (a bitset per row, faster than the sort where n is at most
    512 entries per row), else through ``chunk_unique``."""
    cpu = candidates.device.type == "cpu"
    out = native.distinct_rows(candidates, n, valid, counts=True) if cpu else None
    if out is not None:
        c_val, c_inv, c_off, counts = out
    else:
        c_val, c_inv, c_off = chunk_unique(candidates, n)
        offsets = torch.tensor(c_off[:-1], device=c_inv.device)[:, None]  # [T, 1]
        counts = _counts(c_inv + offsets, valid, c_val.numel())
    out = native.distinct_rows(items, n) if cpu else None
    i_val, i_inv, i_off = out[:3] if out is not None else chunk_unique(items, n)
    c_sizes = [b - a for a, b in zip(c_off, c_off[1:])]
    i_sizes = [b - a for a, b in zip(i_off, i_off[1:])]
    return list(
        zip(
            zip(c_val.split(c_sizes), c_inv.unbind(), counts.split(c_sizes)),
            zip(i_val.split(i_sizes), i_inv.unbind()),
        )
    )


def _dropout_mask(module: torch.nn.Dropout, like: Tensor) -> Tensor | None:
    """nn.Dropout's mask (scaled by 1 / (1 - p)) from the same draws: equal masks for equal
    RNG states; None where it would draw nothing (p = 0 or evaluation)."""
    p = module.p if module.training else 0.0
    if p <= 0 or like.numel() == 0:
        return None
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


def _gru(gi: Tensor, gh: Tensor, h_prev: Tensor) -> tuple[Tensor, dict]:
    """GRU cell (torch's gate order r, z, n) from the input and hidden projections gi, gh
    [R, 3K] of the previous state h_prev [R, K]: the new state and what ``_gru_backward``
    needs."""
    h_new, rz, n = gru_gates(gi, gh, h_prev)
    K = h_prev.shape[1]
    return h_new, dict(h_prev=h_prev, rz=rz, r=rz[:, :K], z=rz[:, K:], n=n, gh=gh)


def _gru_backward(dh: Tensor, g: dict) -> tuple[Tensor, Tensor]:
    """d gi and d gh [R, 3K] from d h_new [R, K] (the gates' pre-activation gradients):
    one native pass on CPU float32 (``native.gru_backward``), else torch's ops."""
    if dh.device.type == "cpu":
        out = native.gru_backward(dh, g["h_prev"], g["rz"], g["n"], g["gh"])
        if out is not None:
            return out
    K = dh.shape[1]
    r, z, n = g["r"], g["z"], g["n"]
    da = torch.empty(dh.shape[0], 3 * K, dtype=dh.dtype, device=dh.device)
    a_r, a_z, a_n = da[:, :K], da[:, K : 2 * K], da[:, 2 * K :]
    torch.mul(dh, 1 - z, out=a_n).mul_(1 - n * n)
    torch.mul(dh, g["h_prev"] - n, out=a_z).mul_(z * (1 - z))
    torch.mul(a_n, g["gh"][:, 2 * K :], out=a_r).mul_(r * (1 - r))
    dgh = da.clone()  # the candidate's hidden part goes through r
    dgh[:, 2 * K :].mul_(r)
    return da, dgh


@torch.no_grad()
def start_sessions(
    core: RecurrentCore,
    h: Tensor,
    c: Tensor,
    session_start: Tensor,
    user_start: Tensor,
    rows: Tensor,
) -> tuple[Tensor, Tensor, dict | None]:
    """``RecurrentCore.start_sessions`` (same values, same dropout draws) for training:
    (h, c, what ``backward`` needs for the user level, or None where nothing of it ran).
    ``rows``: the slots with session_start and not user_start."""
    if not core.hierarchical:
        h, c = core.start_sessions(h, c, session_start, user_start)
        return h, c, None
    h, c = zero_rows(h, user_start), zero_rows(c, user_start)
    if rows.numel() == 0:
        return h, c, None
    gru = core.user_gru
    x, c_old = h[rows], c[rows]  # [R, H], [R, U]
    gi = torch.addmm(gru.bias_ih, x, gru.weight_ih.T)  # [R, 3U]
    gh = torch.addmm(gru.bias_hh, c_old, gru.weight_hh.T)  # [R, 3U]
    c_rows, g = _gru(gi, gh, c_old)
    mask_user = _dropout_mask(core.drop_user, c_rows)
    if mask_user is not None:
        c_rows = c_rows * mask_user
    h0 = core.init_act(torch.addmm(core.w_init.bias, c_rows, core.w_init.weight.T))  # [R, H]
    mask_init = _dropout_mask(core.drop_init, h0)
    h_rows = h0 if mask_init is None else h0 * mask_init
    cache = dict(rows=rows, x=x, gru=g, mask_user=mask_user, c_rows=c_rows, h0=h0)
    cache["mask_init"] = mask_init
    return h.index_copy(0, rows, h_rows), c.index_copy(0, rows, c_rows), cache


def start_step(
    core: RecurrentCore, batch: Chunk, t: int, h: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, dict | None]:
    """``start_sessions`` for time step t of a chunk (a PlanDataset batch): its session and
    user starts, at steps that have any."""
    if not batch.any_start[t]:
        return h, c, None
    lo, hi = batch.next_session_offsets[t : t + 2]
    ss, us = batch.session_start[t], batch.user_start[t]
    return start_sessions(core, h, c, ss, us, batch.next_session_rows[lo:hi])


def _user_level_gradients(core: RecurrentCore, st: dict, dh0: Tensor, dc: Tensor | None):
    """Gradients of the user GRU and the init projection from those of the step's starting
    states: d h of the rows that started a session, dh0 [R, H] (overwritten), and d c
    [B, U] (None: c was not used by the step)."""
    rows = st["rows"]
    if st["mask_init"] is not None:
        dh0.mul_(st["mask_init"])
    d_act = _act_derivative(core.init_act_name, st["h0"])
    da = dh0 if d_act is None else dh0.mul_(d_act)  # d (W_init c + b_init)
    grads = [(core.w_init.weight, None, da.T @ st["c_rows"]), (core.w_init.bias, None, da.sum(0))]
    dc_rows = da @ core.w_init.weight  # [R, U]
    if dc is not None:
        dc_rows.add_(dc[rows])
    if st["mask_user"] is not None:
        dc_rows.mul_(st["mask_user"])
    dgi, dgh = _gru_backward(dc_rows, st["gru"])
    gru = core.user_gru
    return grads + [
        (gru.weight_ih, None, dgi.T @ st["x"]),
        (gru.bias_ih, None, dgi.sum(0)),
        (gru.weight_hh, None, dgh.T @ st["gru"]["h_prev"]),
        (gru.bias_hh, None, dgh.sum(0)),
    ]


@torch.no_grad()
def forward(
    core: RecurrentCore,
    loss_grad: LossGrad,
    item: Tensor,
    h: Tensor,
    c: Tensor,
    candidates: Tensor,
    valid: Tensor,
    start: dict | None = None,
    mm_dtype: torch.dtype | None = None,
    distinct: Distinct | None = None,
    distinct_loss: DistinctLossGrad | None = None,
    logq_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Session-GRU step on input items [B] from states h [B, H], c [B, U] (``start``: the
    cache of ``start_sessions`` when it ran before this step), scores of the candidates [N]
    (targets first), the loss and its gradient. Returns (new h [B, H], loss, what
    ``backward`` needs). ``mm_dtype`` (e.g. bfloat16): the two [B, N] products of the
    backward (the scores' gradients to h and to the item rows) run in that dtype. The
    scores stay float32, as logits usually do under mixed precision: a bfloat16 score of
    magnitude 20 is off by up to 0.06, a 6% change of its softmax weight, while the scores'
    gradients (ds) are bounded by 1 and take the rounding as noise. ``distinct``: the
    (values, inverse) of ``torch.unique`` of the candidates and of the items, when known
    (``chunk_unique``); None: computed in ``backward``. ``distinct_loss``
    (``losses.distinct_loss_and_grad``): score each distinct candidate once, with its
    multiplicity (the same loss and gradients; ``loss_grad`` is then unused).
    ``logq_bias`` [N] (the logQ correction, ``logq * log p_sample`` of each candidate
    column): subtracted from the training scores before the loss; on distinct candidates a
    column's multiplicity becomes the sum of exp(-bias) over its occurrences.
    Dropout masks are drawn in the network's order: input embedding, new state, scored
    state."""
    H, B = core.hidden_size, item.numel()
    emb = None
    if core.input_mode == "onehot":
        gi = core.item_in.weight.index_select(0, item)  # [B, 3H]
        mask_embed = _dropout_mask(core.drop_embed, gi[:, :1])  # the one-hot vector
        if mask_embed is not None:
            gi.mul_(mask_embed)
        gi.add_(core.bias_in)
    else:  # the input embedding's rows [B, E] (tied: out_w's) through w_in
        emb = core.input_table.weight.index_select(0, item)
        mask_embed = _dropout_mask(core.drop_embed, emb)
        if mask_embed is not None:
            emb.mul_(mask_embed)
        gi = torch.addmm(core.bias_in, emb, core.w_in.weight.T)
    gh = torch.addmm(core.w_h.bias, h, core.w_h.weight.T)  # [B, 3H]
    if core.user_propagation == "all":
        gi[:, : 2 * H].addmm_(c, core.w_c.weight.T)
    h_new, gru = _gru(gi, gh, h)
    mask_hidden = _dropout_mask(core.drop_hidden, h_new)  # carried to the next step
    if mask_hidden is not None:
        h_new = h_new * mask_hidden

    mask = _dropout_mask(core.drop_session, h_new)
    h_out = h_new if mask is None else h_new * mask
    scored = candidates  # the score matrix's columns [N], or the distinct ones [M]
    if distinct_loss is not None:
        if distinct is None:
            distinct = step_distinct(candidates, item, valid)
        scored = distinct[0][0]
    w_out = core.out_w.weight.index_select(0, scored)  # [N, H]
    b_out = core.out_b.weight.index_select(0, scored).view(-1)  # [N]
    s = torch.addmm(b_out, h_out, w_out.T)  # [B, N]
    u_out = None
    if core.user_to_output:
        u_out = core.out_u.weight.index_select(0, scored)  # [N, U]
        s.addmm_(c, u_out.T)
    y = core.final_act(s)
    d_act = _act_derivative(core.final_act_name, y)
    if distinct_loss is None:  # may overwrite y; loss: mean over valid slots
        if logq_bias is not None:
            y = y.sub_(logq_bias)
        loss, ds, row_scale = loss_grad(y, valid)
    else:  # the slots' targets' columns, the columns' multiplicities
        _, inv, counts = distinct[0]
        if logq_bias is not None:  # occurrences weighted by exp(-bias)
            occurs = torch.ones_like(logq_bias)
            occurs[:B] = valid
            weights = torch.exp(-logq_bias).mul_(occurs)
            counts = weights.new_zeros(counts.numel()).index_add_(0, inv, weights)
        loss, ds, row_scale = distinct_loss(y, valid, inv[:B], counts)
        if logq_bias is not None:  # the target's logit is its score minus its bias
            n_valid = valid.sum().clamp(min=1)
            loss = loss + (logq_bias[:B] * valid).sum() / n_valid
    if d_act is not None:
        ds.mul_(d_act)  # [B, N]
    # the update weighs each slot alike, an empty one as zero: a step with few valid slots
    # (the epoch's last steps, where few users are left) moves the weights that much less.
    # d step / d s = ds * r[:, None]; r is applied to the [B, *] factors in backward.
    share = valid.sum().to(ds.dtype) / B  # of the slots
    r = (share if row_scale is None else row_scale * share).expand(B)[:, None]  # [B, 1]
    cache = dict(
        c=c, item=item, candidates=candidates, gru=gru, mask=mask, h_out=h_out,
        w_out=w_out, u_out=u_out, ds=ds, r=r, start=start, mm_dtype=mm_dtype,
        valid=valid, distinct=distinct, on_distinct=distinct_loss is not None,
        emb=emb, mask_embed=mask_embed, mask_hidden=mask_hidden,
    )  # fmt: skip
    return h_new, loss, cache


Grad = tuple[torch.nn.Parameter, Tensor | None, Tensor]


@torch.no_grad()
def gradients(core: RecurrentCore, cache: dict) -> list[Grad]:
    """The gradient of every parameter the step touched, as (parameter, None, dense
    gradient) or, for an item table, (parameter, rows [M], gradient rows [M, D]): one row per
    distinct item of the step (``distinct``'s values; padded ones get zero rows)."""
    H = core.hidden_size
    ds, r, c, gru, start = cache["ds"], cache["r"], cache["c"], cache["gru"], cache["start"]

    # ---- output layer (the step's gradient of the scores is ds * r: r scales the rows)
    distinct = cache["distinct"]
    if distinct is None:
        distinct = step_distinct(cache["candidates"], cache["item"], cache["valid"])
    (uniq, inv, _), (in_uniq, in_inv) = distinct

    def out_rows(g: Tensor) -> Tensor:  # per score column [N, D] -> per distinct item [M, D]
        return g if cache["on_distinct"] else _row_sums(uniq, inv, g)

    db = ds.T @ r  # [N, 1], in ds's dtype
    lp = cache["mm_dtype"]  # the two [B, N] products' dtype (None: ds's own)
    ds_lp = ds if lp is None else ds.to(lp)

    def mm(a: Tensor, b: Tensor) -> Tensor:  # a (from ds_lp) @ b, result in ds's dtype
        return a @ b if lp is None else (a @ b.to(lp)).to(ds.dtype)

    g_w = mm(ds_lp.T, cache["h_out"] * r)  # [N, H]
    grads = [
        (core.out_w.weight, uniq, out_rows(g_w)),
        (core.out_b.weight, uniq, out_rows(db)),
    ]
    dh = mm(ds_lp, cache["w_out"]).mul_(r)  # [B, H]
    dc = None
    if core.user_to_output:
        g_u = mm(ds_lp.T, c * r)  # [N, U]
        grads.append((core.out_u.weight, uniq, out_rows(g_u)))
        dc = mm(ds_lp, cache["u_out"]).mul_(r)  # [B, U]
    if cache["mask"] is not None:
        dh.mul_(cache["mask"])
    if cache["mask_hidden"] is not None:
        dh.mul_(cache["mask_hidden"])

    # ---- session GRU and its input
    da, dgh = _gru_backward(dh, gru)  # [B, 3H] each
    mask_embed = cache["mask_embed"]
    if core.input_mode == "onehot":
        d_in = da if mask_embed is None else da * mask_embed
        grads.append((core.item_in.weight, in_uniq, _row_sums(in_uniq, in_inv, d_in)))
    else:
        grads.append((core.w_in.weight, None, da.T @ cache["emb"]))
        d_emb = da @ core.w_in.weight  # [B, E]
        if mask_embed is not None:
            d_emb.mul_(mask_embed)
        g_in = _row_sums(in_uniq, in_inv, d_emb)
        if core.input_mode == "embedding":
            grads.append((core.embed.weight, in_uniq, g_in))
        else:  # tied: out_w's output rows and input rows as one gradient
            grads[0] = (core.out_w.weight, *_merge_rows(uniq, grads[0][2], in_uniq, g_in))
    grads += [
        (core.bias_in, None, da.sum(0)),
        (core.w_h.weight, None, dgh.T @ gru["h_prev"]),
        (core.w_h.bias, None, dgh.sum(0)),
    ]
    if core.user_propagation == "all":
        grads.append((core.w_c.weight, None, da[:, : 2 * H].T @ c))
        if start is not None:
            dc_all = da[:, : 2 * H] @ core.w_c.weight
            dc = dc_all if dc is None else dc.add_(dc_all)

    # ---- the user level, where this step started sessions
    if start is not None:
        rows = start["rows"]  # d h_prev of the rows that started a session [R, H]
        dh0 = torch.addmm(dh[rows] * gru["z"][rows], dgh[rows], core.w_h.weight)
        grads += _user_level_gradients(core, start, dh0, dc)
    return grads


@torch.no_grad()
def backward(core: RecurrentCore, cache: dict) -> None:
    """Set ``.grad`` of every parameter the step touched (they must be None before): an
    item table's as a coalesced row-sparse tensor."""
    for p, rows, g in gradients(core, cache):
        if rows is not None:
            g = torch.sparse_coo_tensor(
                rows[None], g, p.shape, is_coalesced=True, check_invariants=False
            )
        p.grad = g
