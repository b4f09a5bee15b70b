"""The hand-written training step (models/update.py) against autograd: the same loss, new
state and gradient of every parameter as back-propagating RecurrentCore.step, score_items
and the loss, for every model variant, loss and final activation, with dropouts, empty
slots, session/user starts and repeated items."""

from __future__ import annotations

import copy

import pytest
import torch

from hrnn_lit.models import native
from hrnn_lit.models.api import Starts
from hrnn_lit.models.core import RecurrentCore
from hrnn_lit.models.losses import LOSSES, distinct_loss_and_grad, loss_and_grad
from hrnn_lit.models.update import (
    backward,
    chunk_distinct,
    chunk_unique,
    forward,
    start_sessions,
)

N_ITEMS, B, H, U = 40, 6, 5, 4
VARIANTS = {
    "session_rnn": dict(user_propagation="none"),
    "rnn_concat": dict(user_propagation="none", reset_at="user"),
    "hrnn_init": dict(user_propagation="init"),
    "hrnn_all": dict(user_propagation="all"),
    "hrnn_init_output": dict(user_propagation="init", user_to_output=True),
    "hrnn_all_output": dict(user_propagation="all", user_to_output=True),
    "hrnn_init_relu": dict(user_propagation="init", user_to_session_act="relu"),
    "hrnn_init_linear": dict(user_propagation="init", user_to_session_act="linear"),
    # the official GRU4Rec code's input alternatives: tied and separate input embeddings
    "session_rnn_tied": dict(user_propagation="none", constrained_embedding=True),
    "rnn_concat_embedding": dict(user_propagation="none", reset_at="user", embedding=3),
    "hrnn_init_embedding": dict(user_propagation="init", embedding=3),
    "hrnn_all_output_tied": dict(
        user_propagation="all", user_to_output=True, constrained_embedding=True
    ),
}


def train_step(core, loss_grad, *args):
    """forward then backward, as RecurrentRecommender.training_step runs them."""
    h_new, loss, cache = forward(core, loss_grad, *args)
    backward(core, cache)
    return h_new, loss


def make_core(variant: str, final_act: str = "linear", dropout: float = 0.0) -> RecurrentCore:
    torch.manual_seed(0)
    core = RecurrentCore(
        N_ITEMS,
        hidden_size=H,
        user_hidden_size=U,
        final_act=final_act,
        dropout_session=dropout,
        dropout_user=dropout,
        dropout_init=dropout,
        dropout_embed=dropout,
        dropout_hidden=dropout,
        **VARIANTS[variant],
    ).double()
    with torch.no_grad():  # non-zero user-to-output weights and output biases
        for p in core.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return core.train()


def inputs(n_sample: int):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, H, generator=g, dtype=torch.float64)
    c = torch.randn(B, U, generator=g, dtype=torch.float64)
    item = torch.tensor([3, 3, 7, 0, 12, 3])  # repeated inputs
    tgt = torch.tensor([5, 9, 5, 0, 1, 2])  # repeated targets
    samples = torch.tensor([9, 30, 30, 5, 17])[:n_sample]  # repeats, and overlaps targets
    valid = torch.tensor([True, True, True, False, True, True])
    session_start = torch.tensor([False, True, False, False, True, True])
    user_start = torch.tensor([False, False, False, False, False, True])
    return h, c, item, torch.cat([tgt, samples]), valid, session_start, user_start


def dense_grads(core) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in core.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
    return out


def both(variant, loss, final_act="linear", dropout=0.0, n_sample=5, on_distinct=False, logq=None):
    """(loss, new h, grads) of the autograd reference and of train_step from equal states
    (``on_distinct``: the step scores the distinct candidates only; ``logq``: a logQ bias
    [N] subtracted from the candidates' training scores)."""
    h0, c0, item, cand, valid, ss, us = inputs(n_sample)
    results = []
    for hand_written in (False, True):
        core = make_core(variant, final_act, dropout)
        torch.manual_seed(7)  # equal dropout masks in both runs
        rows = (ss & ~us).nonzero().squeeze(1)
        if hand_written:
            h, c, st = start_sessions(core, h0, c0, ss, us, rows)
            dl = distinct_loss_and_grad(loss) if on_distinct else None
            args = (item, h, c, cand, valid, st, None, None, dl, logq)
            h_new, value = train_step(core, loss_and_grad(loss), *args)
        else:
            # the reference: the network's model API, as the autograd engine runs it
            state = core.start((h0, c0), Starts(ss, us, rows))
            h_new, c = core.step(item, state)
            scores = core.score((h_new, c), cand)
            value = LOSSES[loss](scores if logq is None else scores - logq, valid)
            (value * valid.sum() / B).backward()  # empty slots weigh in as zero
            h_new, value = h_new.detach(), value.detach()
        results.append((value, h_new, dense_grads(core)))
    return results


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_matches_autograd(variant, loss):
    (ref_loss, ref_h, ref_g), (loss_, h, g) = both(variant, loss, dropout=0.25)
    assert loss_.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-12)
    assert sorted(g) == sorted(ref_g)  # the same parameters were touched
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-12, msg=name)
    assert g["out_w.weight"].abs().sum() > 0 and g["w_h.weight"].abs().sum() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("final_act", ["linear", "tanh", "elu-1"])
def test_cross_entropy_on_distinct_candidates_matches_autograd(variant, final_act):
    """Scoring each distinct candidate once, with its multiplicity, gives the loss and the
    gradients of the full [B, B+S] matrix: the inputs repeat targets and samples, a sample
    equals a target, and the empty slot's target (item 0) occurs nowhere else."""
    (ref_loss, ref_h, ref_g), (loss_, h, g) = both(
        variant, "cross-entropy", final_act, dropout=0.25, on_distinct=True
    )
    assert loss_.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-12)
    assert sorted(g) == sorted(ref_g)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-12, msg=name)
    assert g["out_w.weight"][0].abs().sum() == 0  # nobody's negative, nobody's target
    assert distinct_loss_and_grad("top1") is None


@pytest.mark.skipif(native.load() is None, reason="no native kernels here")
@pytest.mark.parametrize("on_distinct", [False, True])
def test_float32_step_with_the_native_cross_entropy_matches_autograd(monkeypatch, on_distinct):
    """The float32 step (the native softmax kernel, row sums left in the row scales) against
    float64 autograd: within float32 rounding."""
    (ref_loss, _, ref_g), _ = both("hrnn_init_output", "cross-entropy", n_sample=5)
    calls, kernel = [], native.softmax_xent

    def counted(*args):
        out = kernel(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native, "softmax_xent", counted)
    h0, c0, item, cand, valid, ss, us = inputs(5)
    core = make_core("hrnn_init_output").float()
    rows = (ss & ~us).nonzero().squeeze(1)
    h, c, st = start_sessions(core, h0.float(), c0.float(), ss, us, rows)
    dl = distinct_loss_and_grad("cross-entropy") if on_distinct else None
    args = (item, h, c, cand, valid, st, None, None, dl)
    _, value = train_step(core, loss_and_grad("cross-entropy"), *args)
    assert calls == [True] and value.dtype == torch.float32
    assert value.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    g = dense_grads(core)
    assert sorted(g) == sorted(ref_g)
    for name in ref_g:
        scale = ref_g[name].abs().max().item()
        torch.testing.assert_close(
            g[name].double(), ref_g[name], rtol=0, atol=1e-6 * scale, msg=name
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_and_evaluation_steps_give_equal_states(variant):
    """The hand-written training step and RecurrentCore's step (evaluation) share their
    ops: a model evaluated on the states it was trained on sees them bit for bit."""
    core = make_core(variant).float()
    h0, c0, item, cand, valid, ss, us = inputs(5)
    h0, c0 = h0.float(), c0.float()
    rows = (ss & ~us).nonzero().squeeze(1)
    h, c, st = start_sessions(core, h0, c0, ss, us, rows)
    h_new, _, _ = forward(core, loss_and_grad("cross-entropy"), item, h, c, cand, valid, st)
    with torch.no_grad():
        h_eval, c_eval = core.start_sessions(h0, c0, ss, us, rows)
        assert torch.equal(h_eval, h) and torch.equal(c_eval, c)
        assert torch.equal(core.session_step(item, h_eval, c_eval), h_new)
    assert not torch.equal(h_new, h)


@pytest.mark.parametrize("final_act", ["tanh", "relu", "elu-0.5", "leaky-0.1", "selu-1.05-1.67"])
@pytest.mark.parametrize("loss", ["cross-entropy", "top1", "bpr-max"])
def test_final_activations(final_act, loss):
    (ref_loss, _, ref_g), (loss_, _, g) = both("hrnn_init_output", loss, final_act)
    assert loss_.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("on_distinct", [False, True])
@pytest.mark.parametrize("variant", ["session_rnn", "hrnn_all_output_tied"])
def test_logq_correction_matches_autograd(variant, loss, on_distinct):
    """The logQ column bias (subtracted from the training scores) in the hand-written step,
    on the full score matrix and, for cross-entropy, on the distinct candidates, where the
    occurrences of one item carry different biases (a target that is also a sample)."""
    if on_distinct and loss != "cross-entropy":
        pytest.skip("distinct candidates: cross-entropy only")
    bias = torch.linspace(-1.0, 2.0, B + 5, dtype=torch.float64)
    (ref_loss, ref_h, ref_g), (loss_, h, g) = both(
        variant, loss, dropout=0.25, on_distinct=on_distinct, logq=bias
    )
    (plain_loss, _, _), _ = both(variant, loss, dropout=0.25)
    assert loss_.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    assert abs(ref_loss.item() - plain_loss.item()) > 1e-3  # the bias changes the loss
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-12)
    assert sorted(g) == sorted(ref_g)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-12, msg=name)


def test_in_batch_negatives_only_and_user_level_gets_gradients():
    (_, _, ref_g), (_, _, g) = both("hrnn_init", "top1", n_sample=0)
    for name in ("user_gru.weight_ih", "w_init.weight", "out_w.weight", "item_in.weight"):
        assert g[name].abs().sum() > 0, name
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-9, atol=1e-12)
    # the empty slot's target (item 0) is nobody's negative: its output row gets nothing
    assert g["out_w.weight"][0].abs().sum() == 0


def test_item_gradients_are_coalesced_rows_of_touched_items():
    core = make_core("session_rnn")
    h, c, item, cand, valid, _, _ = inputs(5)
    train_step(core, loss_and_grad("cross-entropy"), item, h, c, cand, valid)
    out = core.out_w.weight.grad
    assert out.is_sparse and out.is_coalesced()
    assert out.indices()[0].tolist() == sorted(set(cand.tolist()))
    assert core.item_in.weight.grad.indices()[0].tolist() == sorted(set(item.tolist()))


@pytest.mark.parametrize("loss", ["cross-entropy", "top1"])
def test_hand_written_loss_gradients_by_finite_differences(loss):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True])
    value, grad, row_scale = loss_and_grad(loss)(scores.clone(), valid)
    grad = grad * row_scale[:, None]
    assert value.item() == pytest.approx(LOSSES[loss](scores, valid).item(), rel=1e-12)
    eps = 1e-6
    for i, j in [(0, 0), (0, 3), (2, 1), (3, 3), (1, 2), (3, 6)]:
        plus, minus = scores.clone(), scores.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        num = (LOSSES[loss](plus, valid) - LOSSES[loss](minus, valid)) / (2 * eps)
        assert grad[i, j].item() == pytest.approx(num.item(), abs=1e-8), (i, j)


def test_cross_entropy_loss_is_finite_when_the_target_probability_underflows():
    scores = torch.tensor([[-200.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    value, *_ = loss_and_grad("cross-entropy")(scores.clone(), torch.tensor([True, True]))
    ref = LOSSES["cross-entropy"](scores.double(), torch.tensor([True, True]))
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)


def test_state_is_unchanged_by_copies():
    """train_step reads the core's weights and writes only .grad."""
    core = make_core("hrnn_all")
    before = copy.deepcopy(core.state_dict())
    h, c, item, cand, valid, ss, us = inputs(3)
    train_step(core, loss_and_grad("top1"), item, h, c, cand, valid)
    for k, v in core.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant", ["session_rnn", "hrnn_init_output"])
def test_bfloat16_output_products_stay_close_to_full_precision(variant):
    """mm_dtype=bfloat16 (trainer.precision=bf16-mixed): the output layer's products take
    bfloat16 factors; loss, state and every gradient stay within bfloat16 rounding of the
    full-precision step, and are not bit-equal to it (the products did change dtype)."""
    h, c, item, cand, valid, *_ = inputs(5)
    runs = []
    for mm_dtype in (None, torch.bfloat16):
        core = make_core(variant)
        h_new, loss, cache = forward(
            core, loss_and_grad("cross-entropy"), item, h, c, cand, valid, None, mm_dtype
        )
        backward(core, cache)
        runs.append((loss, h_new, dense_grads(core)))
    (ref_loss, ref_h, ref_g), (loss, h_new, g) = runs
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    torch.testing.assert_close(h_new, ref_h, rtol=0, atol=0)  # the GRU is not affected
    assert sorted(g) == sorted(ref_g)
    for name in ref_g:
        assert g[name].dtype == ref_g[name].dtype, name
        scale = ref_g[name].abs().max()
        torch.testing.assert_close(g[name], ref_g[name], rtol=0, atol=2e-2 * scale, msg=name)
    assert not torch.equal(g["out_w.weight"], ref_g["out_w.weight"])


@pytest.mark.parametrize("kernel", ["native", "torch", "mixed"])
def test_chunk_unique_equals_torch_unique_per_row(monkeypatch, kernel):
    if kernel == "torch":  # chunk_distinct's fallback (and its path on GPUs)
        monkeypatch.setattr(native, "distinct_rows", lambda *a, **k: None)
    elif native.load() is None:
        pytest.skip("no native kernels here")
    elif kernel == "mixed":  # native for the candidates, the sort for the items
        real = native.distinct_rows  # (the candidates' call is the one with counts=)
        monkeypatch.setattr(
            native, "distinct_rows", lambda x, *a, **k: real(x, *a, **k) if k else None
        )
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 30, (7, 50), generator=g)
    x[3] = 4  # a row of one value
    values, inverse, offsets = chunk_unique(x, 30)
    assert len(offsets) == x.shape[0] + 1 and offsets[-1] == values.numel()
    for t in range(x.shape[0]):
        ref_values, ref_inverse = torch.unique(x[t], return_inverse=True)
        assert torch.equal(values[offsets[t] : offsets[t + 1]], ref_values)
        assert torch.equal(inverse[t], ref_inverse)
    valid = torch.rand(7, 9, generator=g) < 0.7
    steps = chunk_distinct(x, x[:, :9].flip(1), valid, 30)  # candidates, items, valid slots
    assert len(steps) == x.shape[0]
    for t, ((c_values, c_inverse, counts), (i_values, i_inverse)) in enumerate(steps):
        valid_columns = torch.cat([x[t, :9][valid[t]], x[t, 9:]])  # empty slots' targets out
        assert torch.equal(counts, (valid_columns[:, None] == c_values).sum(0))
        for got, ref in (
            ((c_values, c_inverse), torch.unique(x[t], return_inverse=True)),
            (
                (i_values, i_inverse),
                torch.unique(x[t, :9].flip(0), return_inverse=True),
            ),
        ):
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("loss", ["top1", "cross-entropy"])
def test_precomputed_distinct_rows_give_the_same_gradients(loss):
    h, c, item, cand, valid, *_ = inputs(5)
    runs = []
    for precomputed in (False, True):
        core = make_core("hrnn_init_output")
        distinct = None
        if precomputed:
            (distinct,) = chunk_distinct(cand[None], item[None], valid[None], N_ITEMS)
        args = (item, h, c, cand, valid, None, None, distinct, distinct_loss_and_grad(loss))
        step = forward(core, loss_and_grad(loss), *args)
        backward(core, step[2])
        runs.append(dense_grads(core))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
