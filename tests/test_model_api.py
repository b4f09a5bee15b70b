"""The model API and its engines: autograd through every built-in network (C kernels on)
against float64, the manual engine against the autograd engine over a whole epoch, and a
user's own network trained from outside the repository."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from hrnn_lit.data.datamodule import SessionDataModule
from hrnn_lit.data.synthetic import generate_events
from hrnn_lit.errors import ConfigError
from hrnn_lit.models.module import RecurrentRecommender
from hrnn_lit.nets.api import Starts
from hrnn_lit.nets.attention_hrnn import AttentionHRNN
from hrnn_lit.nets.recurrent import RecurrentCore
from hrnn_lit.ops import native
from hrnn_lit.ops.losses import LOSSES
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "session_rnn": dict(user_propagation="none", user_hidden_size=0),
    "rnn_concat": dict(user_propagation="none", user_hidden_size=0, reset_at="user"),
    "hrnn_init": dict(user_propagation="init"),
    "hrnn_all": dict(user_propagation="all"),
    "hrnn_init_output": dict(user_propagation="init", user_to_output=True),
    "hrnn_all_output_tanh": dict(user_propagation="all", user_to_output=True, final_act="tanh"),
}


def _step_grads(net, state, starts, item, cand, valid, loss) -> dict[str, torch.Tensor]:
    """Gradients of one training step run through the model API with autograd."""
    net.zero_grad(set_to_none=True)
    state = net.step(item, net.start(state, starts))
    value = LOSSES[loss](net.score(state, cand), valid)
    (value * valid.sum() / valid.numel()).backward()
    return {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).double()
        for n, p in net.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss", ["top1", "cross-entropy"])
def test_autograd_through_the_c_kernels_gives_the_float64_gradients(variant, loss, monkeypatch):
    """CPU float32 with the native GRU kernel on: every parameter the step uses gets the
    gradient of the same step in float64 (torch ops), to float32 rounding."""
    calls = []
    real = native.gru_forward
    monkeypatch.setattr(native, "gru_forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    n_items, B, H, U = 40, 6, 8, 5
    net = RecurrentCore(n_items, hidden_size=H, **{"user_hidden_size": U, **VARIANTS[variant]})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(net).double()
    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(B, H, generator=g), torch.randn(B, net.user_hidden_size, generator=g)
    session = torch.tensor([False, True, False, True, True, False])
    user = torch.tensor([False, False, False, True, False, False])
    starts = Starts(session, user, (session & ~user).nonzero().view(-1))
    item, cand = torch.tensor([3, 3, 7, 0, 12, 5]), torch.tensor([5, 9, 5, 0, 1, 2, 9, 30])
    valid = torch.tensor([True, True, True, False, True, True])
    got = _step_grads(net, (h, c), starts, item, cand, valid, loss)
    want = _step_grads(ref, (h.double(), c.double()), starts, item, cand, valid, loss)
    assert sorted(got) == sorted(want)
    expected = {"item_in.weight", "bias_in", "w_h.weight", "w_h.bias", "out_w.weight"}
    if net.hierarchical:
        expected |= {"user_gru.weight_ih", "user_gru.weight_hh", "w_init.weight"}
    assert expected <= set(got), "every parameter the step uses gets a gradient"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-6, msg=name)
    if native.load() is not None:
        assert calls, "the C kernel ran on the autograd path"


def _dm(n_users: int = 40) -> SessionDataModule:
    dm = SessionDataModule(
        source=functools.partial(
            generate_events, seed=0, n_users=n_users, n_items=400, n_topics=10, n_groups=6
        ),
        name="engines", preprocess=dict(min_item_support=1, min_session_len=2,
        min_user_sessions=2, max_user_sessions=None), batch_size=8, eval_batch_size=16,
        steps_per_batch=16, fit_split="train", seed=0,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def _fit_model(dm, model, trainer=None):
    trainer = trainer or pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        precision="64-true", max_epochs=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return model


def _fit_and_test(dm, precision: str, reference_eval: bool = False, **kw) -> tuple[dict, dict]:
    torch.manual_seed(0)
    if "net" not in kw:  # the built-in network's sizes
        kw = {"hidden_size": 8, "user_hidden_size": 6, **kw}
    model = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts, ks=[5, 20], **kw)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        precision=precision, max_epochs=1,
    )  # fmt: skip
    _fit_model(dm, model, trainer)
    if reference_eval:  # the network's own score over the catalogue, not the fast path
        model.eval_loop.fast = False
    trainer.test(model, datamodule=dm, verbose=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, model.eval_metrics["test"]


CASES = [(v, "top1", {}) for v in ("session_rnn", "rnn_concat", "hrnn_init", "hrnn_all")]
CASES += [("hrnn_all_output_tanh", loss, {}) for loss in LOSSES]
CASES += [("hrnn_init", "bpr-max", dict(n_sample=16, dropout_user=0.2, dropout_init=0.2,
                                         dropout_session=0.2, momentum=0.3))]  # fmt: skip
@pytest.mark.parametrize("variant,loss,extra", CASES)
def test_fused_path_equals_the_plain_reference_over_an_epoch(variant, loss, extra):
    """One epoch of training and a test pass, in float64 (float32 training amplifies
    rounding through Adagrad's first steps): the one path with its fused ops
    (``engine=auto``: ``ops.sampled_loss``, hand-written loss gradients) and its fast
    evaluation ends with the weights and metrics of the plain reference (``engine=autograd``:
    the network's ``score`` and the loss in torch ops, the reference evaluation), with the
    same dropout draws in the same order."""
    dm = _dm()
    kw = dict(loss=loss, **VARIANTS[variant], **extra)
    w_fused, m_fused = _fit_and_test(dm, "64-true", engine="auto", **kw)
    w_plain, m_plain = _fit_and_test(dm, "64-true", engine="autograd", reference_eval=True, **kw)
    assert w_fused.keys() == w_plain.keys()
    for k in w_fused:
        torch.testing.assert_close(w_fused[k], w_plain[k], rtol=1e-8, atol=1e-10, msg=k)
    assert m_fused.keys() == m_plain.keys()
    for k in m_fused:
        assert m_fused[k] == pytest.approx(m_plain[k], abs=1e-12), k
    assert m_fused["test/n_events"] > 100


def test_engine_choice_and_one_line_errors():
    dm_items = 50
    assert RecurrentRecommender(n_items=dm_items).fused  # auto, scores with score_factors
    assert not RecurrentRecommender(n_items=dm_items, engine="autograd").fused
    net = {"_target_": "hrnn_lit.nets.attention_hrnn.AttentionHRNN", "hidden_size": 8}
    assert RecurrentRecommender(n_items=dm_items, net=net).fused  # it has score_factors
    history = {"_target_": "hrnn_lit.nets.history.HistoryHRNN", "hidden_size": 8}
    assert not RecurrentRecommender(n_items=dm_items, net=history).fused  # score() only
    with pytest.raises(ConfigError, match="model.engine=manual: the hand-written update"):
        RecurrentRecommender(n_items=dm_items, engine="manual")
    with pytest.raises(ConfigError, match="model.cuda_graph=true: the captured CUDA-graph step"):
        RecurrentRecommender(n_items=dm_items, cuda_graph=True)
    with pytest.raises(ConfigError, match="model.net .*nope"):
        RecurrentRecommender(n_items=dm_items, net={**net, "nope": 1})
    with pytest.raises(ConfigError, match="lacks initial_state, start, step, score"):
        RecurrentRecommender(n_items=dm_items, net={"_target_": "torch.nn.Identity"})


class _OwnStep(RecurrentCore):
    """A subclass that overrides ``step``: its input item never enters the GRU."""

    def step(self, items, state):
        return super().step(torch.zeros_like(items), state)


def test_a_subclass_overriding_step_trains_by_its_own_rule():
    """The loop calls the network's own ``step``: a subclass's rule is the one trained (the
    input table of a network that ignores its input items gets gradient at item 0 only)."""
    dm = _dm()
    kw = dict(hidden_size=8, user_hidden_size=6, user_propagation="none", loss="top1")
    net = {"_target_": f"{__name__}._OwnStep", **kw}
    net.pop("loss")
    _, m_own = _fit_and_test(dm, "64-true", net=net)
    own = RecurrentRecommender(n_items=dm.n_items, item_counts=dm.item_counts, net=net)
    torch.manual_seed(0)
    before = copy.deepcopy(own.net.item_in.weight.detach())
    own = _fit_model(dm, own)
    moved = (own.net.item_in.weight.detach() != before).any(1).nonzero().view(-1).tolist()
    assert moved == [0]
    _, m_builtin = _fit_and_test(dm, "64-true", **kw)
    assert m_own != m_builtin


def test_attention_memory_files_sessions_and_forgets_users():
    torch.manual_seed(0)
    net = AttentionHRNN(n_items=30, hidden_size=4, memory=2).eval()
    state = net.initial_state(2, torch.device("cpu"))

    def start(session, user):
        s, u = torch.tensor(session), torch.tensor(user)
        return net.start(state, Starts(s, u, (s & ~u).nonzero().view(-1)))

    state = net.step(torch.tensor([1, 2]), start([True, True], [True, True]))
    assert state[2].tolist() == [0, 0] and (state[0] != 0).any()
    for n in (1, 2, 2):  # the memory fills up to its size
        h_before = state[0]
        state = net.step(torch.tensor([3, 4]), start([True, False], [False, False]))
        assert state[2].tolist() == [n, 0]
        assert torch.equal(state[1][0, 0], h_before[0])  # the last session filed first
    state = start([True, True], [True, False])
    assert state[2].tolist() == [0, 1] and (state[1][0] == 0).all()  # a new user forgets
    assert (state[0][0] == 0).all()


def _tiny(model_keys: bool) -> list[str]:
    return [o for o in TINY if model_keys or not o.startswith("model.")]


def _run_cli(args: list[str], cwd: Path, env_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{env_path}{os.pathsep}{REPO}", "WANDB_MODE": "disabled"}
    out = cwd / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hrnn_lit", *args, *_tiny(False), "logger=none",
         "callbacks=none", f"hydra.run.dir={out}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_a_users_model_from_outside_the_repo_trains_through_searchpath_and_target(tmp_path):
    """The example's file copied into a user's own package and config dir: selected by a
    yaml on hydra.searchpath, or by model.net._target_, it trains and evaluates."""
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(REPO / "hrnn_lit/nets/attention_hrnn.py", pkg / "attn.py")
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    yaml = (REPO / "conf/model/attention_hrnn.yaml").read_text()
    yaml = yaml.replace(
        "hrnn_lit.nets.attention_hrnn.AttentionHRNN", "mymodels.attn.AttentionHRNN"
    )
    (conf / "my_attention.yaml").write_text(yaml.replace("name: attention_hrnn", "name: mine"))
    res = _run_cli(
        [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "model=my_attention",
         "model.net.hidden_size=16"], tmp_path, tmp_path,
    )  # fmt: skip
    assert res["model"] == "mine" and res["engine"] == "fused"  # it has score_factors
    assert 0 < res["test/recall@20"] <= 1 and res["perf/train_events_per_s"] > 0
    res = _run_cli(
        ["model=attention_hrnn", "model.net._target_=mymodels.attn.AttentionHRNN",
         "model.net.hidden_size=16"], tmp_path, tmp_path,
    )  # fmt: skip
    assert res["engine"] == "fused" and 0 < res["test/recall@20"] <= 1


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else len(text)]


def _blocks(section: str, lang: str) -> list[str]:
    parts = section.split(f"```{lang}\n")[1:]
    return [p.split("```", 1)[0] for p in parts]


def test_readme_add_your_own_model_works_as_written(tmp_path):
    """The README's section, followed literally in a fresh directory: its Python block as
    my_pkg/my_net.py, its yaml as my_conf/model/my_net.yaml, and each of its commands (with
    tiny sizes appended) trains and evaluates that network with the autograd engine."""
    section = _section((REPO / "README.md").read_text(), "## Add your own model")
    (code,), (yaml,), (commands,) = (_blocks(section, k) for k in ("python", "yaml", "bash"))
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "my_net.py").write_text(code)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "my_net.yaml").write_text(yaml)
    lines = [c for c in commands.splitlines() if c.strip()]
    assert len(lines) >= 2
    for i, line in enumerate(lines):
        out = tmp_path / f"run{i}"
        tiny = " ".join(_tiny(False) + ["logger=none", "callbacks=none", f"hydra.run.dir={out}"])
        env = {**os.environ, "WANDB_MODE": "disabled"}
        proc = subprocess.run(
            f"{line} {tiny}".replace("python -m", f"{sys.executable} -m"),
            shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        res = json.loads((out / "results.json").read_text())
        assert res["engine"] == "autograd" and 0 < res["test/recall@20"] <= 1, line
        cfg = (out / "config.yaml").read_text()
        assert "my_pkg.my_net.MyNet" in cfg, line


def test_a_custom_network_trains_data_parallel_and_resumes(tmp_path):
    """The example network through the real CLI path: 2 gloo processes (gradients averaged
    over ranks), then a resumed run from its checkpoint."""
    from hydra import compose, initialize_config_dir

    from hrnn_lit.run import run

    def cfg(out, *extra):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose("config", overrides=[
                f"paths.output_dir={out}", *_tiny(False), "logger=none",
                "model=attention_hrnn", "model.net.hidden_size=16", *extra,
            ])  # fmt: skip

    res = run(cfg(tmp_path / "ddp", "trainer=ddp", "callbacks=none"))
    assert res["world_size"] == 2 and res["engine"] == "fused"
    assert 0 < res["test/recall@20"] <= 1
    assert not torch.distributed.is_initialized()
    first = run(cfg(tmp_path / "one"))
    ckpt = tmp_path / "one" / "checkpoints" / "last.ckpt"
    again = run(cfg(tmp_path / "test", "mode=test", f"ckpt_path={ckpt}"))
    assert again["test/recall@20"] == pytest.approx(first["test/recall@20"], abs=1e-12)
