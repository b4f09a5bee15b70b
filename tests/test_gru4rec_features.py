"""The official GRU4Rec code's accuracy options on the built-in network (docs/design.md §11):
final activations, tied and separate input embeddings, input and hidden-state dropout and
the logQ correction, each against a hand-computed or autograd reference, and the manual
engine against the autograd engine over an epoch with all of them on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hrnn_lit.config import validate_rnn
from hrnn_lit.errors import ConfigError
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.recurrent import RecurrentCore, activation, activation_derivative
from tests.test_model_api import _dm, _fit_and_test


@pytest.mark.parametrize(
    "name,x,y",
    [
        ("elu-0.5", [-1.0, 0.0, 2.0], [0.5 * (math.exp(-1) - 1), 0.0, 2.0]),
        ("elu-1", [-3.0, 1.5], [math.exp(-3) - 1, 1.5]),
        ("leaky-0.1", [-2.0, 0.0, 3.0], [-0.2, 0.0, 3.0]),
        ("selu-2-3", [-1.0, 0.5], [2 * 3 * (math.exp(-1) - 1), 1.0]),
        ("tanh", [0.5], [math.tanh(0.5)]),
    ],
)
def test_final_activations_as_the_official_code_defines_them(name, x, y):
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = activation(name)(x)
    torch.testing.assert_close(out, torch.tensor(y, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), x)  # the derivative from y equals autograd's
    d = activation_derivative(name, out.detach())
    torch.testing.assert_close(d if d is not None else torch.ones_like(grad), grad)


def test_parametric_activations_are_left_out_of_the_catalogue_scores():
    """Strictly increasing: ranking the catalogue before them gives the same order, without
    the ties of saturated scores (the official code's evaluation leaves its elu out too)."""
    torch.manual_seed(0)
    core = RecurrentCore(30, hidden_size=4, user_propagation="none", final_act="elu-0.5")
    state = core.step(torch.tensor([1, 2]), core.initial_state(2, torch.device("cpu")))
    h = state[0]
    raw = h @ core.out_w.weight.T + core.out_b.weight.T
    torch.testing.assert_close(core.score(state), raw)
    torch.testing.assert_close(
        core.score(state, torch.tensor([3, 4])), activation("elu-0.5")(raw[:, 3:5])
    )


def _gru_reference(core: RecurrentCore, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """torch's GRUCell with the core's weights on input embeddings x [B, E]."""
    cell = torch.nn.GRUCell(x.shape[1], h.shape[1]).double()
    with torch.no_grad():
        cell.weight_ih.copy_(core.w_in.weight)
        cell.bias_ih.copy_(core.bias_in)
        cell.weight_hh.copy_(core.w_h.weight)
        cell.bias_hh.copy_(core.w_h.bias)
    return cell(x, h)


@pytest.mark.parametrize("mode", ["constrained", "embedding"])
def test_input_embeddings_feed_a_plain_gru(mode):
    """Tied: the input item's embedding is its row of the output matrix out_w (H units);
    separate: its row of ``embed`` (E units); one-hot's ``item_in`` does not exist then."""
    torch.manual_seed(0)
    kw = dict(constrained_embedding=True) if mode == "constrained" else dict(embedding=3)
    core = RecurrentCore(20, hidden_size=4, user_propagation="none", **kw).double().eval()
    assert not hasattr(core, "item_in")
    item, h = torch.tensor([3, 7, 3]), torch.randn(3, 4, dtype=torch.float64)
    table = core.out_w.weight if mode == "constrained" else core.embed.weight
    assert table.shape[1] == (4 if mode == "constrained" else 3)
    got = core.step(item, (h, h[:, :0]))[0]
    torch.testing.assert_close(got, _gru_reference(core, table[item], h))
    # tied: the output matrix's rows get gradients as inputs and as outputs
    core.train()
    s = core.score((core.step(item, (h, h[:, :0]))[0], h[:, :0]), torch.tensor([5]))
    s.sum().backward()
    rows = core.out_w.weight.grad.coalesce().indices()[0].tolist()
    assert rows == ([3, 5, 7] if mode == "constrained" else [5])


def test_hidden_dropout_is_carried_and_session_dropout_only_scored():
    torch.manual_seed(0)
    item, n = torch.arange(8), 30
    hidden = RecurrentCore(n, hidden_size=64, user_propagation="none", dropout_hidden=0.5)
    h1 = hidden.step(item, (torch.zeros(8, 64), torch.zeros(8, 0)))[0]
    assert 0.3 < (h1 == 0).double().mean() < 0.7  # the carried state has dropped units
    scored = RecurrentCore(n, hidden_size=64, user_propagation="none", dropout_session=0.5)
    h2 = scored.step(item, (torch.zeros(8, 64), torch.zeros(8, 0)))[0]
    assert (h2 == 0).sum() == 0  # carried whole; dropped where scored
    s = scored.score((h2, h2[:, :0]), torch.tensor([1]))
    assert not torch.equal(s, h2 @ scored.out_w.weight[[1]].T + scored.out_b.weight[[1]].T)
    hidden.eval()  # no dropout in evaluation
    assert (hidden.step(item, (torch.zeros(8, 64), torch.zeros(8, 0)))[0] == 0).sum() == 0


def test_one_hot_input_dropout_drops_whole_items():
    """One-hot input: ``dropout_embed`` drops a slot's input item (its one-hot vector), so a
    dropped slot steps from the input bias alone and a kept one from its row scaled by 2."""
    torch.manual_seed(0)
    core = RecurrentCore(30, hidden_size=4, user_propagation="none", dropout_embed=0.5).double()
    with torch.no_grad():
        core.bias_in.normal_()
    item = torch.arange(16)
    torch.manual_seed(1)
    gi = core.input_projection(item)
    rows = core.item_in.weight[item]
    dropped = torch.isclose(gi, core.bias_in.expand_as(gi)).all(1)
    kept = torch.isclose(gi, 2 * rows + core.bias_in).all(1)
    assert bool((dropped ^ kept).all()) and 2 <= int(dropped.sum()) <= 14


def test_logq_bias_of_targets_and_samples():
    """As the official code: in-batch columns get logq * log(count), sampled columns
    logq * log(count ** alpha) (the drawing weights, unnormalised)."""
    counts = np.array([1, 4, 9, 100])
    m = RecurrentRecommender(n_items=4, item_counts=counts, logq=0.8, sample_alpha=0.5)
    bias = m.sampler.logq_bias(torch.tensor([[1, 3, 2, 2, 0]]), 2, torch.float32)
    want = [0.8 * math.log(4), 0.8 * math.log(100), 0.4 * math.log(9), 0.4 * math.log(9), 0.0]
    torch.testing.assert_close(bias, torch.tensor([want]))
    assert (
        RecurrentRecommender(n_items=4, item_counts=counts).sampler.logq_bias(
            torch.tensor([[1, 2]]), 1, torch.float32
        )
        is None
    )


FEATURES = [
    ("session_rnn", dict(user_propagation="none", user_hidden_size=0, loss="cross-entropy",
                         constrained_embedding=True, logq=1.0, final_act="elu-0.5")),
    ("session_rnn", dict(user_propagation="none", user_hidden_size=0, loss="bpr-max",
                         embedding=6, logq=0.5, final_act="elu-1", momentum=0.2)),
    ("hrnn_init", dict(user_propagation="init", loss="cross-entropy", constrained_embedding=True,
                       logq=1.0, user_to_output=True)),
    ("rnn_concat", dict(user_propagation="none", user_hidden_size=0, reset_at="user",
                        loss="top1", logq=0.3, final_act="leaky-0.2")),
]  # fmt: skip


@pytest.mark.parametrize("name,kw", FEATURES, ids=[f"{n}-{k['loss']}" for n, k in FEATURES])
def test_fused_path_equals_the_plain_reference_with_the_features_on(name, kw):
    """One epoch in float64 with popularity samples, logQ, an input embedding and both
    dropouts: the one path with its fused ops (and its fast evaluation) ends with the
    weights and metrics of the plain reference (``engine=autograd``: the network's score,
    the loss in torch ops, the reference evaluation)."""
    dm = _dm()
    kw = dict(n_sample=16, sample_alpha=0.5, dropout_embed=0.2, dropout_hidden=0.2, **kw)
    w_manual, m_manual = _fit_and_test(dm, "64-true", engine="auto", **kw)
    w_auto, m_auto = _fit_and_test(dm, "64-true", engine="autograd", reference_eval=True, **kw)
    assert w_manual.keys() == w_auto.keys()
    for k in w_manual:
        torch.testing.assert_close(w_manual[k], w_auto[k], rtol=1e-8, atol=1e-10, msg=k)
    for k in m_manual:
        assert m_manual[k] == pytest.approx(m_auto[k], abs=1e-12), k
    assert m_manual["test/n_events"] > 100


def _model(**kw):
    base = dict(hidden_size=8, user_propagation="none", reset_at="session", final_act="linear",
                user_to_session_act="tanh", dropout_session=0.0, dropout_user=0.0,
                dropout_init=0.0)  # fmt: skip
    return OmegaConf.create({"model": {**base, **kw}})


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(final_act="elu"), "model.final_act must be one of"),
        (dict(final_act="elu-x"), "model.final_act 'elu-x': the parameters must be numbers"),
        (dict(final_act="leaky--1"), "model.final_act must be one of"),
        (dict(constrained_embedding=True, embedding=8), "set model.embedding=0"),
        (dict(constrained_embedding="yes"), "model.constrained_embedding must be true or false"),
        (dict(embedding=-1), "model.embedding must be an integer >= 0"),
        (dict(logq=-0.5), "model.logq must be a number >= 0.0"),
        (dict(dropout_hidden=1.0), "model.dropout_hidden must be a number in"),
    ],
)
def test_config_errors_name_the_key(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        validate_rnn(_model(**kw))
    validate_rnn(_model(final_act="selu-1.05-1.67", embedding=16, logq=1.0, dropout_embed=0.3))


def test_tied_embedding_trains_data_parallel(tmp_path):
    """Two gloo processes: the tied item matrix's step gradient holds output and input rows
    (up to 2 B + S), all averaged across the ranks."""
    from hrnn_lit.run import run
    from tests.conftest import compose_cfg

    over = ["logger=none", "callbacks=none", "model=gru4rec_xe", "model.n_sample=8",
            "trainer=ddp"]  # fmt: skip
    results = run(compose_cfg(over, tmp_path))
    assert results["world_size"] == 2 and 0 < results["test/recall@20"] <= 1
