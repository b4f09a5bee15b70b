"""The two-thread CPU update of models/overlap.py against the sequential update of
models/update.py + SparseRowOptimizer: same losses, weights and optimiser state after whole
chunks, for every model variant, and the module's choice between the two."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from hrnn_lit.config import validate
from hrnn_lit.errors import ConfigError
from hrnn_lit.models import overlap, update
from hrnn_lit.models.core import RecurrentCore
from hrnn_lit.models.losses import loss_and_grad
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.models.optim import SparseRowOptimizer
from tests.conftest import compose_cfg
from tests.test_graph_step import _trainer, chunks, small_dm
from tests.test_update import VARIANTS


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def run_both(variant, loss="cross-entropy", kind="adagrad", wd=0.0, dropout=0.0,
             dtype=torch.float64, mm_dtype=None, n_chunks=4, n_sample=7):  # fmt: skip
    """(sequential, overlapped) after the same chunks: (losses, params, optimiser states)."""
    dm = small_dm()
    torch.manual_seed(0)
    core = RecurrentCore(
        dm.n_items, hidden_size=6, user_hidden_size=5, dropout_session=dropout,
        dropout_user=dropout, dropout_init=dropout, **VARIANTS[variant],
    ).to(dtype)  # fmt: skip
    with torch.no_grad():  # non-zero output biases and user-to-output weights
        for p in core.parameters():
            p.add_(0.2 * torch.randn_like(p))
    loss_grad = loss_and_grad(loss)
    data = chunks(dm, n_chunks, "cpu")
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, dm.n_items, (b["input"].shape[0], n_sample), generator=gen)
               for b in data]  # fmt: skip
    results = []
    for overlapped in (False, True):
        core_k = copy.deepcopy(core)
        params = list(core_k.parameters())
        opt = SparseRowOptimizer(params, kind=kind, lr=0.05, weight_decay=wd)
        torch.manual_seed(2)  # the dropout masks' draws
        h, c = (x.to(dtype) for x in core_k.initial_state(dm.batch_size, "cpu"))
        losses = []
        for batch, smp in zip(data, samples):
            cand = torch.cat([batch["target"], smp], 1)
            inp, valid = batch["input"], batch["valid"]
            if overlapped:
                out = torch.zeros(inp.shape[0], dtype=dtype)
                h, c = overlap.train_chunk(core_k, loss_grad, opt, batch, cand, h, c, out, mm_dtype)
                losses += list(out)
                continue
            for t in range(inp.shape[0]):  # = RecurrentRecommender._eager_chunk
                h, c, start = update.start_step(core_k, batch, t, h, c)
                for p in params:
                    p.grad = None
                h, lo, cache = update.forward(
                    core_k, loss_grad, inp[t], h, c, cand[t], valid[t], start, mm_dtype
                )
                update.backward(core_k, cache)
                opt.step()
                losses.append(lo)
        states = [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
        results.append((torch.stack(losses) if losses else None, params, states))
    return results


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "loss,kind,wd,dropout",
    [("cross-entropy", "adagrad", 0.0, 0.0), ("top1", "adagrad", 0.01, 0.3),
     ("bpr-max", "adam", 0.0, 0.2)],
)  # fmt: skip
def test_overlapped_update_equals_the_sequential_update(two_threads, variant, loss, kind, wd,
                                                        dropout):  # fmt: skip
    (l_s, p_s, s_s), (l_o, p_o, s_o) = run_both(variant, loss, kind, wd, dropout)
    assert not [t for t in threading.enumerate() if t.name == "hrnn-overlap"]  # one per chunk
    assert len(l_s) == 64 and torch.isfinite(l_s).all()
    torch.testing.assert_close(l_o, l_s, rtol=1e-10, atol=1e-12)
    assert len(s_o) == len(s_s) >= 2 * len(p_s)  # every parameter's optimiser state
    for a, b in zip(p_o + s_o, p_s + s_s):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # every parameter moved: the comparison covers each one
    initial = run_both(variant, loss, kind, wd, dropout, n_chunks=0)[0][1]
    assert all(not torch.equal(a, b) for a, b in zip(p_s, initial))


def test_overlapped_update_with_bfloat16_products(two_threads):
    """bf16-mixed's products cast ds once for both threads: the same values."""
    args = dict(dtype=torch.float32, mm_dtype=torch.bfloat16)
    (l_s, p_s, s_s), (l_o, p_o, s_o) = run_both("hrnn_init_output", **args)
    torch.testing.assert_close(l_o, l_s, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_o + s_o, p_s + s_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_worker_error_reaches_the_caller_with_nothing_left_running(two_threads, monkeypatch):
    calls = []

    def failing(core, cache):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("output side failed")
        return real(core, cache)

    real = update.output_gradients
    monkeypatch.setattr(update, "output_gradients", failing)
    with pytest.raises(FloatingPointError, match="output side failed"):
        run_both("session_rnn", n_chunks=1)
    assert torch.get_num_threads() == 2  # restored
    assert not [t for t in threading.enumerate() if t.name == "hrnn-overlap"]  # joined
    worker = overlap.Worker()
    with pytest.raises(RuntimeError, match="was not waited for"):
        worker.submit(lambda: None)
        worker.submit(lambda: None)
    worker.close()
    assert not worker._thread.is_alive()


def test_overlap_blocker_names_the_reason(two_threads):
    cpu = torch.device("cpu")
    assert overlap.overlap_blocker(cpu, 1, 0.0) is None
    assert "CPU only" in overlap.overlap_blocker(torch.device("cuda"), 1, 0.0)
    assert "one process" in overlap.overlap_blocker(cpu, 2, 0.0)
    assert "no clipping" in overlap.overlap_blocker(cpu, 1, 1.0)
    torch.set_num_threads(1)
    assert "2 or more torch threads" in overlap.overlap_blocker(cpu, 1, 0.0)


def _fit(monkeypatch, **kw):
    chunks_run = []
    real = overlap.train_chunk
    monkeypatch.setattr(
        overlap, "train_chunk", lambda *a, **k: chunks_run.append(1) or real(*a, **k)
    )
    dm = small_dm()
    torch.manual_seed(0)
    model = RecurrentRecommender(
        n_items=dm.n_items, item_counts=dm.item_counts, hidden_size=8, user_hidden_size=8,
        loss="cross-entropy", n_sample=16, dropout_user=0.1, dropout_init=0.1, **kw,
    )  # fmt: skip
    trainer = _trainer(max_epochs=2, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return model, trainer, len(chunks_run)


def test_module_overlaps_on_cpu_and_trains_like_the_sequential_path(two_threads, monkeypatch):
    seq, t_s, n_s = _fit(monkeypatch, cpu_overlap=False)
    ovl, t_o, n_o = _fit(monkeypatch, cpu_overlap=True)
    assert n_s == 0 and n_o == t_o.num_training_batches * 2
    assert t_o.global_step == t_s.global_step > 100  # every update counted
    loss_s = float(t_s.callback_metrics["train/loss_epoch"])
    assert float(t_o.callback_metrics["train/loss_epoch"]) == pytest.approx(loss_s, rel=1e-4)
    for a, b in zip(ovl.parameters(), seq.parameters()):  # float32, thread counts differ
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_module_auto_runs_both_ways_and_trains_like_the_sequential_path(two_threads,
                                                                       monkeypatch):  # fmt: skip
    chosen = []
    real_init = overlap.Chooser.__init__

    def init(self, *a, **k):
        real_init(self, *a, probe_every=3)
        chosen.append(self)

    monkeypatch.setattr(overlap.Chooser, "__init__", init)
    seq, t_s, _ = _fit(monkeypatch, cpu_overlap=False)
    auto, t_a, n_a = _fit(monkeypatch)  # cpu_overlap="auto", the default
    n_chunks = t_a.num_training_batches * 2
    assert len(chosen) == 1 and chosen[0].chunks[True] == n_a
    assert 0 < n_a < n_chunks and chosen[0].chunks[False] == n_chunks - n_a
    assert t_a.global_step == t_s.global_step
    for a, b in zip(auto.parameters(), seq.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_chooser_picks_the_faster_way_and_probes_the_other():
    ch = overlap.Chooser(window=3, probe_every=4)
    picks = []

    def run(n, seconds):  # seconds per step of (sequential, overlapped)
        for _ in range(n):
            way = ch.next()
            picks.append(way)
            ch.record(way, seconds[way])

    T, F = True, False
    run(3, {F: 1.0, T: 2.0})  # warm-up (untimed), then one chunk each way
    assert picks == [T, F, T]
    run(9, {F: 1.0, T: 2.0})  # sequential faster: it runs, the overlap is probed every 4th
    assert picks[3:] == [F, T, F, F, F, T, F, F, F]
    # the machine got busy: the sequential chunks slow down, and once the median of the
    # last 3 says so the overlap runs, the sequential way probed every 4th
    run(12, {F: 3.0, T: 2.0})
    assert picks[12:] == [T, F, F, T, F, T, T, T, F, T, T, T]
    assert ch.chunks[True] + ch.chunks[False] == 24
    assert ch.overlap_share() == ch.chunks[True] / 24


def test_module_steps_sequentially_where_the_overlap_cannot_run(two_threads, monkeypatch):
    assert _fit(monkeypatch, clip_grad_norm=5.0, cpu_overlap=True)[2] == 0
    torch.set_num_threads(1)
    assert _fit(monkeypatch, cpu_overlap=True)[2] == 0


@pytest.mark.parametrize("value", ["true", "false", "auto"])
def test_config_accepts_cpu_overlap(tmp_path, value):
    validate(compose_cfg([f"model.cpu_overlap={value}"], tmp_path))


def test_config_check_of_cpu_overlap(tmp_path):
    with pytest.raises(ConfigError, match="model.cpu_overlap must be true, false or auto"):
        validate(compose_cfg(["model.cpu_overlap=2"], tmp_path))
