"""HRNN state rules (docs/design.md §2) checked on the real module."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch

from hrnn_lit.data.batching import PlanDataset, build_plan
from hrnn_lit.data.datamodule import SessionDataModule
from hrnn_lit.data.synthetic import generate_events
from hrnn_lit.evaluation.loop import starts_at as chunk_starts
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.api import Starts
from tests.helpers import steps_for


def starts(ss: torch.Tensor, us: torch.Tensor) -> Starts:
    return Starts(ss, us, (ss & ~us).nonzero().view(-1))


def unroll(m: RecurrentRecommender, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's own start/step over a chunk: h [T, B, H] and c [T, B, U] after each
    step (the plain replay, every row)."""
    state = m.net.initial_state(batch.input.shape[1], torch.device("cpu"))
    hs, cs = [], []
    for t in range(batch.input.shape[0]):
        if batch.any_start[t]:
            state = m.net.start(state, chunk_starts(batch, t))
        state = m.net.step(batch.input[t], state)
        hs.append(state[0])
        cs.append(state[1])
    return torch.stack(hs), torch.stack(cs)


def make_model(propagation="init", **kw) -> RecurrentRecommender:
    torch.manual_seed(0)
    m = RecurrentRecommender(
        n_items=50, hidden_size=8, user_hidden_size=6, user_propagation=propagation, **kw
    )
    return m.eval()


def chunk_for(sessions_per_user: list[list[list[int]]], batch_size: int) -> dict:
    """One chunk holding the whole plan for users given as lists of sessions of items."""
    steps = steps_for(sessions_per_user)
    plan = build_plan(steps.user, batch_size)
    return PlanDataset(steps, plan, steps_per_batch=plan.shape[0])[0]


USER_A = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
USER_B = [[10, 11, 12], [13, 14, 15]]


def test_first_session_starts_from_zero_state():
    m = make_model()
    h = torch.randn(3, 8)
    c = torch.randn(3, 6)
    ss = torch.tensor([True, True, False])
    us = torch.tensor([True, False, False])
    h2, c2 = m.net.start((h, c), starts(ss, us))
    assert (h2[0] == 0).all() and (c2[0] == 0).all()  # new user: both reset
    assert not torch.equal(c2[1], c[1])  # session start: user GRU updated ...
    assert torch.allclose(h2[1], torch.tanh(m.net.w_init(c2[1])))  # ... and h from c
    assert torch.equal(h2[2], h[2]) and torch.equal(c2[2], c[2])  # mid-session: untouched


def test_user_state_changes_only_at_session_starts():
    for propagation in ("init", "all"):
        m = make_model(propagation)
        batch = chunk_for([USER_A, USER_B], batch_size=1)
        with torch.no_grad():
            _, cs = unroll(m, batch)
        ss = batch.session_start[:, 0]
        c = cs[:, 0]
        changed = (c[1:] != c[:-1]).any(dim=1)
        assert torch.equal(changed, ss[1:]), propagation
        # and c is exactly zero during a user's first session
        first_session = torch.tensor(
            [True, True, False, False, False, False, True, True, False, False]
        )
        assert first_session.numel() == c.shape[0]
        assert (c[first_session] == 0).all()


def test_no_state_leaks_between_users_in_a_slot():
    for propagation in ("none", "init", "all"):
        m = make_model(propagation, user_to_output=propagation != "none")
        both = chunk_for([USER_A, USER_B], batch_size=1)  # B follows A in the one slot
        alone = chunk_for([USER_B], batch_size=1)
        with torch.no_grad():
            h_both, c_both = unroll(m, both)
            h_alone, c_alone = unroll(m, alone)
        n_b = h_alone.shape[0]
        assert torch.allclose(h_both[-n_b:], h_alone, atol=0, rtol=0), propagation
        assert torch.equal(c_both[-n_b:], c_alone), propagation


def test_session_rnn_resets_at_every_session():
    m = make_model("none")
    # the same session replayed after different histories gives the same states
    x = chunk_for([[[1, 2, 3], [7, 8, 9]]], batch_size=1)
    y = chunk_for([[[4, 5], [6, 5, 4, 3], [7, 8, 9]]], batch_size=1)
    with torch.no_grad():
        hx, _ = unroll(m, x)
        hy, _ = unroll(m, y)
    assert torch.equal(hx[-2:], hy[-2:])
    mh = make_model("init")
    with torch.no_grad():
        hx, _ = unroll(mh, x)
        hy, _ = unroll(mh, y)
    assert not torch.allclose(hx[-2:], hy[-2:]), "HRNN's session start depends on history"


def test_user_to_output_adds_user_term_to_scores():
    m = make_model("init", user_to_output=True)
    torch.nn.init.normal_(m.net.out_u.weight)
    h, c = torch.randn(3, 8), torch.randn(3, 6)
    items = torch.tensor([4, 0, 7, 7])
    expected = (
        h @ m.net.out_w.weight[items].T
        + m.net.out_b.weight[items].T
        + c @ m.net.out_u.weight[items].T
    )
    torch.testing.assert_close(m.net.score((h, c), items), expected)
    full = m.net.score((h, c))
    torch.testing.assert_close(full[:, items], expected)
    plain = make_model("init")
    plain.net.load_state_dict(
        {k: v for k, v in m.net.state_dict().items() if not k.startswith("out_u")}
    )
    torch.testing.assert_close(
        m.net.score((h, c), items) - plain.net.score((h, c), items),
        c @ m.net.out_u.weight[items].T,
    )


def gru_reference(core, item, h, c_gates=None):
    gi = core.item_in.weight[item] + core.bias_in
    gh = h @ core.w_h.weight.T + core.w_h.bias
    H = h.shape[1]
    r_in, z_in = gi[:, :H] + gh[:, :H], gi[:, H : 2 * H] + gh[:, H : 2 * H]
    if c_gates is not None:
        r_in, z_in = r_in + c_gates[:, :H], z_in + c_gates[:, H:]
    r, z = torch.sigmoid(r_in), torch.sigmoid(z_in)
    n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
    return (1 - z) * n + z * h


def test_all_adds_user_state_to_reset_and_update_gates_only():
    item = torch.tensor([1, 5, 9])
    h, c = torch.randn(3, 8), torch.randn(3, 6)
    m_all = make_model("all")
    with torch.no_grad():
        got = m_all.net.step(item, (h, c))[0]
        want = gru_reference(m_all.net, item, h, c @ m_all.net.w_c.weight.T)
    torch.testing.assert_close(got, want)
    m_init = make_model("init")
    with torch.no_grad():
        torch.testing.assert_close(
            m_init.net.step(item, (h, c))[0], gru_reference(m_init.net, item, h)
        )
        # init: the step itself ignores c
        step = m_init.net.step
        assert torch.equal(step(item, (h, c))[0], step(item, (h, -c))[0])


def test_rnn_concat_keeps_state_across_sessions_of_a_user():
    m = make_model("none", reset_at="user")
    x = chunk_for([[[1, 2, 3], [7, 8, 9]]], batch_size=1)
    y = chunk_for([[[4, 5], [7, 8, 9]]], batch_size=1)
    with torch.no_grad():
        hx, _ = unroll(m, x)
        hy, _ = unroll(m, y)
    assert not torch.allclose(hx[-2:], hy[-2:]), "earlier sessions shape the state"
    both = chunk_for([[[1, 2, 3]], [[7, 8, 9]]], batch_size=1)  # two users in one slot
    alone = chunk_for([[[7, 8, 9]]], batch_size=1)
    with torch.no_grad():
        assert torch.equal(unroll(m, both)[0][-2:], unroll(m, alone)[0])


def test_session_start_rule_equals_the_dense_rule():
    """The start rule runs the user GRU on the known users' next sessions only; every row
    equals the rule written densely over all rows."""
    for propagation in ("init", "all"):
        m = make_model(propagation)
        h, c = torch.randn(5, 8), torch.randn(5, 6)
        ss = torch.tensor([True, True, False, True, False])
        us = torch.tensor([True, False, False, False, False])
        with torch.no_grad():
            got = m.net.start((h, c), starts(ss, us))
            c_next = m.net.user_gru(h, c)  # torch's GRU cell
            c_want = torch.where(us[:, None], 0.0, torch.where(ss[:, None], c_next, c))
            h0 = torch.tanh(m.net.w_init(c_want))
            h_want = torch.where(us[:, None], 0.0, torch.where(ss[:, None], h0, h))
        torch.testing.assert_close(got[0], h_want)
        torch.testing.assert_close(got[1], c_want)


class _CountSteps(pl.Callback):
    """Counts optimizer steps as Lightning's per-step hook sees them, and the updates."""

    def __init__(self):
        self.hooks = self.updates = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.hooks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.updates += int(batch.input.shape[0])  # one update per time step


def _small_dm() -> SessionDataModule:
    dm = SessionDataModule(
        source=functools.partial(
            generate_events, seed=0, n_users=60, n_items=400, n_topics=10, n_groups=6
        ),
        name="lean-step", preprocess=dict(min_item_support=1, min_session_len=2,
        min_user_sessions=2, max_user_sessions=None), batch_size=8, eval_batch_size=8,
        steps_per_batch=16, fit_split="train", seed=0,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def _trainer(precision: str = "32-true", **kw) -> pl.Trainer:
    return pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        precision=precision, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_every_update_is_a_lightning_optimizer_step(precision):
    """Each time step's update goes through Lightning's optimizer step: trainer.global_step
    equals the number of updates and the per-step hook sees each one."""
    dm = _small_dm()
    model = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts)
    counter = _CountSteps()
    trainer = _trainer(precision, max_epochs=2, callbacks=[counter])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == counter.updates == counter.hooks > 200


def test_optimizer_step_hooks_run_on_every_update():
    """A user's torch.optim step hook (registered at fit start) sees every update, and does
    not change the weights."""
    dm = _small_dm()
    weights, calls = {}, []

    class Hook(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *a: calls.append(1))

    for hooked in (False, True):
        torch.manual_seed(0)
        model = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts)
        trainer = _trainer("32-true", max_epochs=1, callbacks=[Hook()] if hooked else [])
        trainer.fit(model, datamodule=dm)
        weights[hooked] = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(calls) == trainer.global_step > 100
    for k in weights[False]:
        assert torch.equal(weights[False][k], weights[True][k]), k


@pytest.mark.parametrize("name", ["session_rnn", "hrnn_init"])
def test_training_updates_item_tables_natively_with_the_same_weights(monkeypatch, name):
    """CPU training updates the touched rows of its three item tables with the native
    kernel, every update, and ends with the weights of the torch path, bit for bit (the
    native softmax runs in both)."""
    from hrnn_lit.ops import native

    if native.load() is None:
        pytest.skip("no C compiler here")
    dm = _small_dm()
    real, tables = native.adagrad_rows, []
    monkeypatch.setattr(native, "adagrad_rows", lambda p, *a: tables.append(p.shape) or real(p, *a))
    weights = {}
    for path in ("native", "torch"):
        if path == "torch":  # the kernel declines: the optimiser's torch path
            monkeypatch.setattr(native, "adagrad_rows", lambda *a: tables.append(0) and False)
        torch.manual_seed(0)
        model = RecurrentRecommender(
            n_items=dm.n_items, item_counts=dm.item_counts, name=name, hidden_size=16,
            user_hidden_size=16, user_propagation="none" if name == "session_rnn" else "init",
            loss="cross-entropy", n_sample=16, dropout_session=0.1,
        )  # fmt: skip
        trainer = _trainer(max_epochs=1)
        trainer.fit(model, datamodule=dm)
        weights[path] = {k: v.clone() for k, v in model.state_dict().items()}
        if path == "native":
            n = dm.n_items
            assert sorted(set(tables)) == sorted({(n, 1), (n, 16 * 3), (n, 16)})
            assert len(tables) == 3 * trainer.global_step > 100
    assert tables.count(0) == len(tables) // 2  # asked as often, declined
    assert weights["native"].keys() == weights["torch"].keys()
    for k in weights["native"]:
        assert torch.equal(weights["native"][k], weights["torch"][k]), k


def test_bf16_mixed_trains_in_float32_and_evaluates_like_float32():
    """trainer.precision=bf16-mixed: parameters and their optimiser state stay float32,
    training moves the weights like float32 does (not bit-equal: the output products are
    bfloat16), and evaluation ranks on float32 scores (metrics equal to a 32-true test of
    the same weights)."""
    dm = _small_dm()
    models, losses = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        model = RecurrentRecommender(
            n_items=dm.n_items, item_counts=dm.item_counts, loss="cross-entropy", n_sample=16
        )
        trainer = _trainer(precision, max_epochs=2)
        trainer.fit(model, datamodule=dm)
        models[precision] = model
        losses[precision] = float(trainer.callback_metrics["train/loss_epoch"])
    bf16 = models["bf16-mixed"]
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    state = bf16.trainer.optimizers[0].state
    assert all(v.dtype == torch.float32 for st in state.values() for v in st.values())
    # one epoch's trajectory is chaotic (a 1e-6 change of the initial weights moves this
    # loss by ~4%): close to float32's and far below the untrained log(24) = 3.18
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=0.12)
    assert losses["bf16-mixed"] < 2.8
    ref = models["32-true"].net.out_w.weight
    assert not torch.equal(bf16.net.out_w.weight, ref)
    metrics = {}
    for precision in ("32-true", "bf16-mixed"):
        _trainer(precision).test(bf16, datamodule=dm, verbose=False)
        metrics[precision] = dict(bf16.eval_metrics["test"])
    assert metrics["bf16-mixed"] == metrics["32-true"]
    assert metrics["32-true"]["test/recall@20"] > 0


def test_bf16_mixed_on_a_cpu_without_bfloat16_products_warns(monkeypatch):
    from hrnn_lit.models import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)
    dm = _small_dm()
    model = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts)
    with pytest.warns(UserWarning, match="bf16-mixed on a CPU without native bfloat16"):
        _trainer("bf16-mixed", max_epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
