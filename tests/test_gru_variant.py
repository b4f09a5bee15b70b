"""The official GRU4Rec code's one-hot cell and initialisation as options of the built-in
network (``model.gru_variant`` / ``model.gru_init``, docs/parity.md): the cell against a
float64 autograd reference written from its equations, the network's step with it (and
with ``dropout_hidden``), the initialisation's ranges, the config check, and the fused path
against the plain reference over an epoch with the options on."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from hrnn_lit.config import validate_rnn
from hrnn_lit.errors import ConfigError
from hrnn_lit.nets.recurrent import RecurrentCore
from hrnn_lit.ops.gru import gru_cell
from tests.test_model_api import _dm, _fit_and_test


def _reset_before(x_r, x_z, x_n, h, w_r, w_z, w_n, b_r, b_z):
    """The official one-hot cell, written out (the b's: the input side's bias, in x):
    r = s(x_r + h W_r + b_r), z likewise,
    n = tanh(x_n + (r * h) W_n), h' = (1 - z) n + z h (torch's convention; the official
    code's z is 1 - this z, the same cell with the z weights' signs flipped)."""
    r = torch.sigmoid(x_r + h @ w_r.T + b_r)
    z = torch.sigmoid(x_z + h @ w_z.T + b_z)
    n = torch.tanh(x_n + (r * h) @ w_n.T)
    return (1 - z) * n + z * h


def test_reset_before_cell_equals_its_equations_and_gradients():
    g = torch.Generator().manual_seed(0)
    R, K = 5, 4
    x = torch.randn(R, 3 * K, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(R, K, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * K, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * K, generator=g, dtype=torch.float64, requires_grad=True)

    def op(x, h, w, b):
        return gru_cell(x, torch.addmm(b, h, w[: 2 * K].T), h, w_hn=w[2 * K :])

    def ref(x, h, w, b):
        return _reset_before(*x.split(K, 1), h, *w.split(K, 0), *b.split(K))

    torch.testing.assert_close(op(x, h, w, b), ref(x, h, w, b), rtol=1e-12, atol=1e-12)
    dy = torch.randn(R, K, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(op(x, h, w, b), (x, h, w, b), dy)
    want = torch.autograd.grad(ref(x, h, w, b), (x, h, w, b), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(op, (x, h, w, b))
    # and it differs from torch's reset-after cell (same weights, b_hn = 0)
    after = gru_cell(x, torch.addmm(torch.cat([b, b.new_zeros(K)]), h, w.T), h)
    assert (after - ref(x, h, w, b)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["onehot", "constrained", "embedding"])
def test_step_with_the_official_cell(mode):
    """The step's new state from the core's own weights by the equations (evaluation: no
    dropout); in training, ``dropout_hidden`` multiplies that state by a fresh mask of
    0 and 1 / (1 - p) per slot and unit."""
    kw = {"onehot": {}, "constrained": dict(constrained_embedding=True), "embedding":
          dict(embedding=3)}[mode]  # fmt: skip
    torch.manual_seed(1)
    core = RecurrentCore(
        20, hidden_size=6, user_propagation="none", dropout_hidden=0.5, gru_variant="official",
        **kw,
    ).double()  # fmt: skip
    with torch.no_grad():
        core.w_h.bias.normal_()  # unused by this cell: give it a value
    items = torch.tensor([0, 3, 7, 19])
    h = torch.randn(4, 6, dtype=torch.float64)
    x = core.input_projection(items)
    H = 6
    zero = h.new_zeros(H)
    want = _reset_before(*x.split(H, 1), h, *core.w_h.weight.split(H, 0), zero, zero)
    core.eval()
    got, _ = core.step(items, (h, h.new_zeros(4, 0)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    core.train()
    masks = []
    for _ in range(2):
        out, _ = core.step(items, (h, h.new_zeros(4, 0)))
        mask = out / want
        assert set(mask.round(decimals=9).unique().tolist()) <= {0.0, 2.0}
        masks.append(mask)
    assert not torch.equal(masks[0], masks[1])  # drawn afresh each step


def test_official_init_ranges():
    n, H = 500, 10
    torch.manual_seed(0)
    core = RecurrentCore(n, hidden_size=H, user_propagation="none", gru_init="official")
    assert core.item_in.weight.abs().max() <= (6 / (n + H)) ** 0.5
    assert core.item_in.weight.abs().max() > 0.9 * (6 / (n + H)) ** 0.5
    lim = (6 / (2 * H)) ** 0.5
    assert core.w_h.weight.abs().max() <= lim and core.w_h.weight.abs().max() > 0.9 * lim
    assert not core.w_h.bias.any() and not core.bias_in.any() and not core.out_b.weight.any()
    default = RecurrentCore(n, hidden_size=H, user_propagation="none")
    assert default.w_h.weight.abs().max() <= H**-0.5 and default.w_h.bias.any()


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(gru_variant="keras"), "model.gru_variant must be one of"),
        (dict(gru_init="xavier"), "model.gru_init must be one of"),
    ],
)
def test_config_errors(kw, msg):
    base = dict(hidden_size=8, user_propagation="none", reset_at="session", final_act="linear",
                user_to_session_act="tanh")  # fmt: skip
    with pytest.raises(ConfigError, match=msg):
        validate_rnn(OmegaConf.create({"model": {**base, **kw}}))
    validate_rnn(OmegaConf.create({"model": {**base, "gru_variant": "official",
                                             "gru_init": "official"}}))  # fmt: skip
    with pytest.raises(ValueError, match="gru_variant must be one of"):
        RecurrentCore(5, hidden_size=2, user_propagation="none", gru_variant="keras")


@pytest.mark.parametrize("propagation", ["none", "all"])
def test_fused_path_equals_the_plain_reference_with_the_official_cell(propagation):
    """One epoch in float64, one-hot input, the official cell and initialisation and hidden
    dropout (the official ``dropout_p_embed`` of its one-hot model): the fused path ends
    with the weights and metrics of the plain reference (``engine=autograd``)."""
    dm = _dm()
    kw = dict(user_propagation=propagation, loss="cross-entropy", n_sample=16,
              dropout_hidden=0.3, gru_variant="official", gru_init="official")  # fmt: skip
    if propagation == "none":
        kw["user_hidden_size"] = 0
    w_fused, m_fused = _fit_and_test(dm, "64-true", engine="auto", **kw)
    w_auto, m_auto = _fit_and_test(dm, "64-true", engine="autograd", reference_eval=True, **kw)
    for k in w_fused:
        torch.testing.assert_close(w_fused[k], w_auto[k], rtol=1e-8, atol=1e-10, msg=k)
    for k in m_fused:
        assert m_fused[k] == pytest.approx(m_auto[k], abs=1e-12), k


@pytest.mark.parametrize("momentum", [0.0, 0.4])
def test_adagrad_eps_inside_the_square_root(momentum):
    """``adagrad_eps=inside``: lr g / sqrt(acc + eps), on dense weights and on a row-sparse
    table's touched rows (the official code's IndexedAdagradM), with and without momentum;
    the default keeps eps outside."""
    from hrnn_lit.ops.optim import SparseRowOptimizer

    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(3, 4))
    table = torch.nn.Embedding(6, 2, sparse=True)
    start = (dense.detach().clone(), table.weight.detach().clone())
    lr, eps = 0.1, 1e-2  # eps large enough for inside and outside to differ visibly
    opts = {
        inside: SparseRowOptimizer([dense, table.weight], lr=lr, momentum=momentum, eps=eps,
                                   eps_in_sqrt=inside)  # fmt: skip
        for inside in (True, False)
    }
    for inside, opt in opts.items():
        with torch.no_grad():
            dense.copy_(start[0])
            table.weight.copy_(start[1])
        acc_d, acc_t = torch.zeros(3, 4), torch.zeros(6, 2)
        vel_d, vel_t = torch.zeros(3, 4), torch.zeros(6, 2)
        want_d, want_t = start[0].clone(), start[1].clone()
        for step in range(3):
            items = torch.tensor([1, 4, 4]) if step != 1 else torch.tensor([0, 1])
            opt.zero_grad()
            ((dense * dense).sum() * 0.01 * (step + 1) + table(items).pow(3).sum()).backward()
            g_d = dense.grad.clone()
            g_t = table.weight.grad.coalesce()
            rows, g_rows = g_t.indices()[0], g_t.values()
            opt.step()
            acc_d += g_d * g_d
            den = (acc_d + eps).sqrt() if inside else acc_d.sqrt() + eps
            vel_d = momentum * vel_d - lr * g_d / den
            want_d += vel_d if momentum else -lr * g_d / den
            acc_t[rows] += g_rows * g_rows
            den_t = (acc_t[rows] + eps).sqrt() if inside else acc_t[rows].sqrt() + eps
            upd = -lr * g_rows / den_t
            if momentum:
                vel_t[rows] = momentum * vel_t[rows] + upd
                upd = vel_t[rows]
            want_t[rows] += upd
            torch.testing.assert_close(dense.detach(), want_d, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(table.weight.detach(), want_t, rtol=1e-5, atol=1e-6)


def test_adagrad_eps_config():
    from hrnn_lit.models.module import RecurrentRecommender

    with pytest.raises(ConfigError, match="model.adagrad_eps must be one of"):
        RecurrentRecommender(n_items=5, adagrad_eps="middle")
    model = RecurrentRecommender(n_items=5, adagrad_eps="inside", user_propagation="none",
                                 user_hidden_size=0)  # fmt: skip
    assert model.configure_optimizers().param_groups[0]["eps_in_sqrt"]
