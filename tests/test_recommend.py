"""Recommending (docs/design.md §12): ``hrnn_lit.Recommender`` and ``mode=recommend``.

The replay test is the contract: observing a test split through the recommender, event by
event, and ranking each next item among its full scores gives the ranks ``mode=test``
gives on the same checkpoint, for a trained network, swapped networks (one that learns per
user from each step's ``api.Context``) and a baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hydra.utils import instantiate

from hrnn_lit import Recommender
from hrnn_lit.errors import ConfigError
from hrnn_lit.evaluation.metrics import metrics_from_ranks, target_ranks
from hrnn_lit.recommend.topk import top_k
from hrnn_lit.run import run
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "hrnn_init": ["model=hrnn_init"],
    "session_rnn": ["model=session_rnn"],
    "user_net": ["model=session_rnn", "model.net={_target_: tests.nets.TiedNet, hidden_size: 8}"],
    "context_net": ["model=session_rnn", "model.net={_target_: tests.nets.ContextNet}"],
    "user_pop": ["model=user_pop"],
    "hrnn_history": ["model=hrnn_history"],  # a state that grows, observe
}


def _clean(overrides: list[str]) -> list[str]:
    """A swapped network takes none of the built-in network's keys."""
    if any(o.startswith("model.net=") for o in overrides):
        return [o for o in overrides if o.startswith(("model=", "model.net="))] + [
            "~model.hidden_size", "~model.user_hidden_size", "~model.user_propagation",
            "~model.dropout_session", "~model.dropout_user", "~model.dropout_init",
            "~model.final_act", "~model.embedding", "~model.constrained_embedding",
            "~model.dropout_embed", "~model.dropout_hidden", "~model.user_to_output",
            "~model.user_to_session_act", "~model.reset_at",
        ]  # fmt: skip
    return overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (checkpoint, results, composed config) of a one-epoch run."""
    out = {}
    for name, overrides in MODELS.items():
        d = tmp_path_factory.mktemp(name)
        cfg = compose_cfg(["logger=none", "trainer.max_epochs=1", *_clean(overrides)], d)
        results = run(cfg)
        out[name] = (d / "checkpoints" / "last.ckpt", results, cfg)
    return out


def replay_ranks(rec: Recommender, cfg) -> torch.Tensor:
    """Ranks of the test split's targets, each before its event is observed."""
    dm = instantiate(cfg.data)
    dm.setup("fit")
    test = dm.splits.test.join(dm._vocab, on="item", how="semi")
    test = test.with_columns(j=pl.int_range(pl.len()).over("user"))
    ranks = []
    for j in range(int(test.get_column("j").max()) + 1):
        ev = test.filter(pl.col("j") == j)
        if j > 0:
            scores = rec.scores(ev.get_column("user").to_list())
            target = torch.from_numpy(rec.items.lookup(ev.get_column("item")))
            ranks.append(target_ranks(scores, target, cfg.eval.ties))
        rec.observe_many(ev, "user", "item", "ts", session_col="session")
    return torch.cat(ranks)


@pytest.mark.parametrize("name", list(MODELS))
def test_replaying_the_test_split_gives_mode_test_metrics(trained, name):
    ckpt, results, cfg = trained[name]
    rec = Recommender.from_checkpoint(ckpt)
    ranks = replay_ranks(rec, cfg)
    assert ranks.numel() == results["test/n_events"]
    metrics = metrics_from_ranks(ranks, list(cfg.eval.ks), prefix="test/")
    for key, value in metrics.items():
        if "recall" in key:
            assert value == results[key], key  # counts of hits: exact
        else:
            assert value == pytest.approx(results[key], rel=1e-12, abs=1e-15), key


def test_the_checkpoint_carries_ids_session_rule_and_users(trained):
    ckpt, _, cfg = trained["hrnn_init"]
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)["hrnn_lit_recommend"]
    assert payload["session_gap"] == cfg.data.preprocess.session_gap
    users = payload["users"]
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert len(payload["items"]) == dm.n_items
    assert sorted(users["users"].tolist()) == sorted(dm.splits.train.get_column("user").unique())
    assert users["history_ptr"][-1] == users["history_items"].numel()


# ----------------------------------------------------------------- observe, at, exclude
def test_observe_one_by_one_equals_observe_many(trained):
    ckpt = trained["hrnn_init"][0]
    a, b = Recommender.from_checkpoint(ckpt), Recommender.from_checkpoint(ckpt)
    items = a.items.series.to_list()
    rng = np.random.default_rng(0)
    rows = []
    for u, user in enumerate(["new-1", "new-2", a.users.keys[0]]):
        t = 2_000_000_000 + 10_000 * u
        for _i in range(9):
            t += int(rng.choice([60, 600, 4000]))  # some gaps open a new session
            rows.append((user, items[int(rng.integers(len(items)))], t))
    for user, item, t in rows:
        a.observe(user, item, t)
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    b.observe_many(frame.sample(fraction=1.0, shuffle=True, seed=1).sort("timestamp"))
    users = ["new-1", "new-2", a.users.keys[0]]
    # the same rule on batches of other sizes: equal to rounding
    torch.testing.assert_close(a.scores(users), b.scores(users), rtol=1e-5, atol=1e-6)
    ra, rb = a.recommend_many(users, k=7), b.recommend_many(users, k=7)
    assert ra.drop("score").equals(rb.drop("score"))
    for u in users:
        ha, hb = (r.users.history[r.users.rows[u]] for r in (a, b))
        assert np.array_equal(ha, hb)
        assert a.users.session_from[a.users.rows[u]] == b.users.session_from[b.users.rows[u]]


def test_exclude_and_at_on_a_hand_built_history(trained):
    rec = Recommender.from_checkpoint(trained["hrnn_init"][0])
    items = rec.items.series.to_list()
    gap = rec.session_gap
    t = 2_000_000_000
    first, second = items[:3], items[3:5]
    for i, it in enumerate(first):  # session 1
        rec.observe("u", it, t + i)
    for i, it in enumerate(second):  # session 2, after the idle gap
        rec.observe("u", it, t + gap + 100 + i)
    n = len(items)
    for at in ("next", "new_session"):
        scores = rec.scores(["u"], at=at)[0]
        for exclude, dropped in (("none", []), ("session", second), ("history", first + second)):
            if at == "new_session" and exclude == "session":
                dropped = []  # a new session has no items yet
            got = rec.recommend("u", k=n, at=at, exclude=exclude)
            assert [i for i, _ in got] == [
                items[j] for j in sorted(range(n), key=lambda j: (-float(scores[j]), j))
                if items[j] not in dropped
            ], (at, exclude)  # fmt: skip
            assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    # at=next steps the pending item; new_session runs the start rule instead
    assert not torch.equal(rec.scores(["u"], "next"), rec.scores(["u"], "new_session"))


def test_unknown_items_are_skipped_and_unknown_users_start_fresh(trained):
    rec = Recommender.from_checkpoint(trained["hrnn_init"][0])
    fresh = Recommender.from_checkpoint(trained["hrnn_init"][0])
    item = rec.items.series[0]
    frame = pl.DataFrame({"user_id": ["x", "x", "x"], "item_id": [item, -12345, item],
                          "timestamp": [10, 20, 30]})  # fmt: skip
    done = rec.observe_many(frame)
    assert (done.n_events, done.n_unknown_items, done.n_repeated, done.n_new_users) == (3, 1, 1, 1)
    assert not rec.observe("x", "no-such-item", 40)
    fresh.observe("x", item, 10)  # the same, minus what was skipped
    assert torch.equal(rec.scores(["x"]), fresh.scores(["x"]))
    known = rec.users.keys[0]
    new = rec.scores(["nobody"], "new_session")
    assert not torch.equal(rec.scores([known], "new_session"), new)


@pytest.mark.parametrize("distinct", [False, True])  # ties (the exact path) or none
def test_top_k_orders_ties_by_item_index(distinct):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50, 40), generator=g).double()
    if distinct:
        scores = torch.rand(50, 40, generator=g, dtype=torch.float64)
    if not distinct:
        scores[3, :] = 1.0  # all tied
        scores[4, 10:] = float("-inf")  # fewer than k items left
    items, values = top_k(scores, 15)
    for r in range(scores.shape[0]):
        ref = sorted(range(40), key=lambda j: (-float(scores[r, j]), j))
        ref = [j for j in ref if scores[r, j] > float("-inf")][:15]
        assert items[r, : len(ref)].tolist() == ref
        assert (items[r, len(ref) :] == -1).all()
        assert values[r, : len(ref)].tolist() == scores[r, ref].tolist()


# ---------------------------------------------------------------------------- the CLI
def cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrnn_lit", "logger=none", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )  # fmt: skip


def events_file(path: Path, rec: Recommender, n_users: int = 6) -> Path:
    """A few known users' next events, an unknown user and an unknown item."""
    items = rec.items.series.to_list()
    rows = []
    for u in list(rec.users.keys[:n_users]) + ["stranger"]:
        t = 2_100_000_000
        for i in range(4):
            rows.append((u, items[(7 * i + len(rows)) % len(items)], t + 60 * i))
    rows.append(("stranger", "never-seen", 2_100_000_500))
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    frame.with_columns(pl.col("user_id").cast(pl.String)).write_csv(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cli_top_k_equals_the_python_api(trained, tmp_path, fmt):
    ckpt = trained["hrnn_init"][0]
    rec = Recommender.from_checkpoint(ckpt)
    events = events_file(tmp_path / "events.csv", rec)
    out = tmp_path / f"recs.{fmt}"
    p = cli(["mode=recommend", f"ckpt_path={ckpt}", f"recommend.input={events}",
             "recommend.k=5", "recommend.exclude=session", f"recommend.output={out}",
             f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped 1 events with items the model never saw" in p.stdout
    assert "1 users unknown to the model" in p.stdout
    got = pl.read_parquet(out) if fmt == "parquet" else pl.read_csv(out)
    assert got.columns == ["user_id", "rank", "item_id", "score"]
    frame = pl.read_csv(events)
    rec.observe_many(frame)
    users = frame.get_column("user_id").unique(maintain_order=True).to_list()
    assert got.get_column("user_id").unique(maintain_order=True).cast(pl.String).to_list() == [
        str(u) for u in users
    ]
    for u in users:
        mine = rec.recommend(u, k=5, exclude="session")
        theirs = got.filter(pl.col("user_id").cast(pl.String) == str(u))
        assert theirs.get_column("rank").to_list() == [1, 2, 3, 4, 5]
        assert theirs.get_column("item_id").to_list() == [i for i, _ in mine]
        # one user's float32 scores vs a batch's: equal to rounding
        np.testing.assert_allclose(theirs.get_column("score").to_numpy(), [s for _, s in mine],
                                   rtol=1e-6)  # fmt: skip


def test_original_ids_round_trip(tmp_path):
    """Text ids with leading zeros stay text, integer ids stay integers, in and out."""
    from hrnn_lit.data.synthetic import generate_events

    raw = generate_events(n_users=120, n_items=400, n_topics=10, n_groups=6, seed=0)
    raw = raw.with_columns(
        user_id=pl.format("u{}", pl.col("user")),
        item_id=pl.col("item").cast(pl.String).str.zfill(6),  # "000123": a name, not 123
        timestamp=pl.col("ts"),
    ).select("user_id", "item_id", "timestamp")
    path = tmp_path / "events.csv"
    raw.write_csv(path)
    run_dir = tmp_path / "train"
    cfg = compose_cfg(["logger=none", "data=events", f"data.path={path}", "data.cache_dir=null",
                       "trainer.max_epochs=1", "model.hidden_size=8"], run_dir)  # fmt: skip
    run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    rec = Recommender.from_checkpoint(ckpt)
    assert not rec.items.is_int and all(len(i) == 6 for i in rec.items.series.to_list())
    user = raw.get_column("user_id")[0]
    recs = rec.recommend(user, k=3)
    assert all(isinstance(i, str) and len(i) == 6 for i, _ in recs)
    out = tmp_path / "recs.csv"
    tail = raw.filter(pl.col("user_id") == user).tail(2)
    tail.write_csv(tmp_path / "tail.csv")
    p = cli(["mode=recommend", f"ckpt_path={ckpt}", f"recommend.input={tmp_path / 'tail.csv'}",
             "recommend.k=3", f"recommend.output={out}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert p.returncode == 0, p.stderr[-3000:]
    got = pl.read_csv(out, schema_overrides={"item_id": pl.String, "user_id": pl.String})
    assert got.get_column("user_id").to_list() == [user] * 3
    assert all(len(i) == 6 for i in got.get_column("item_id").to_list())
    assert rec.items.index("000123") >= 0 or "000123" not in rec.items.series.to_list()
    assert rec.items.index(123) == -1  # an integer is not the name "000123"


@pytest.mark.parametrize(
    "case",
    ["no_ckpt", "not_ckpt", "no_input", "empty_input", "no_columns", "k0", "bad_out", "bad_at"],
)
def test_bad_input_stops_with_one_line_and_writes_nothing(trained, tmp_path, case):
    ckpt = trained["hrnn_init"][0]
    events = events_file(tmp_path / "events.csv", Recommender.from_checkpoint(ckpt))
    out = tmp_path / "out" / "recs.csv"
    args = {"ckpt": ckpt, "input": events, "k": 5, "output": out, "at": "next"}
    if case == "no_ckpt":
        args["ckpt"] = tmp_path / "missing.ckpt"
    elif case == "not_ckpt":
        (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
        args["ckpt"] = tmp_path / "text.ckpt"
    elif case == "no_input":
        args["input"] = tmp_path / "missing.csv"
    elif case == "empty_input":
        (tmp_path / "empty.csv").write_text("")
        args["input"] = tmp_path / "empty.csv"
    elif case == "no_columns":
        (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
        args["input"] = tmp_path / "cols.csv"
    elif case == "k0":
        args["k"] = 0
    elif case == "bad_out":
        (tmp_path / "afile").write_text("x")
        args["output"] = tmp_path / "afile" / "recs.csv"  # a directory that cannot exist
    elif case == "bad_at":
        args["at"] = "later"
    p = cli(["mode=recommend", f"ckpt_path={args['ckpt']}", f"recommend.input={args['input']}",
             f"recommend.k={args['k']}", f"recommend.output={args['output']}",
             f"recommend.at={args['at']}", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not out.exists() and not list(tmp_path.glob("**/recs.csv"))


def test_recommend_keys_are_checked_in_python_too(trained):
    rec = Recommender.from_checkpoint(trained["session_rnn"][0])
    with pytest.raises(ConfigError, match="recommend.k must be an integer >= 1"):
        rec.recommend("u", k=0)
    with pytest.raises(ConfigError, match="recommend.exclude must be one of"):
        rec.recommend("u", exclude="all")


def test_old_checkpoints_get_one_line(tmp_path):
    old = ROOT / "tests" / "data" / "before_one_path"
    ckpt = sorted(old.glob("*.ckpt"))[0]
    with pytest.raises(ConfigError, match="carries no item ids for recommending"):
        Recommender.from_checkpoint(ckpt)


def test_results_file_is_untouched_by_recommending(trained, tmp_path):
    ckpt, results, _ = trained["user_pop"]
    before = json.dumps(results, sort_keys=True)
    Recommender.from_checkpoint(ckpt).recommend_many([1, 2], k=3)
    assert json.dumps(results, sort_keys=True) == before


def test_cli_takes_other_column_names(trained, tmp_path):
    """The checkpoint's column settings by default; ``data.source.*`` overrides them."""
    ckpt = trained["hrnn_init"][0]
    rec = Recommender.from_checkpoint(ckpt)
    events = pl.read_csv(events_file(tmp_path / "events.csv", rec))
    renamed = tmp_path / "renamed.csv"
    events.rename({"user_id": "uid", "timestamp": "when"}).write_csv(renamed)
    out = tmp_path / "recs.csv"
    p = cli(["mode=recommend", f"ckpt_path={ckpt}", f"recommend.input={renamed}",
             "+data.source.user_col=uid", "+data.source.time_col=when", "recommend.k=3",
             f"recommend.output={out}", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    got = pl.read_csv(out)
    assert got.height == 3 * events.get_column("user_id").n_unique()
    p = cli(["mode=recommend", f"ckpt_path={ckpt}", f"recommend.input={renamed}",
             f"recommend.output={tmp_path / 'no.csv'}", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert p.returncode == 2 and "user_id" in p.stderr and not (tmp_path / "no.csv").exists()


def test_observed_states_equal_the_rules_replayed_event_by_event():
    """Users' stored states after two ``observe_many`` calls (five users sharing two slots,
    one-event sessions between longer ones, a session going on across the calls) equal the
    network's own rules applied one event at a time: a user's first event and every new
    session run the start rules, any other event steps on the item before it."""
    from hrnn_lit.nets import api
    from hrnn_lit.nets.recurrent import RecurrentCore
    from hrnn_lit.recommend.ids import Ids

    torch.manual_seed(0)
    net = RecurrentCore(12, hidden_size=6, user_hidden_size=5).eval()
    rec = Recommender(net, Ids(list(range(100, 112))), 100, dedupe=False, batch_size=2)
    rng = np.random.default_rng(3)
    rows = []
    for u in range(5):
        t = 1_000_000
        for _ in range(int(rng.integers(4, 12))):
            t += int(rng.choice([10, 20, 500]))  # 500: a new session (some of one event)
            rows.append((f"u{u}", 100 + int(rng.integers(12)), t))
    events = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    cut = int(np.median(events.get_column("timestamp")))
    rec.observe_many(events.filter(pl.col("timestamp") <= cut).sort("timestamp"))
    rec.observe_many(events.filter(pl.col("timestamp") > cut).sort("timestamp"))

    one, none = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    with torch.no_grad():
        for u in range(5):
            state, pending, last = net.initial_state(1, torch.device("cpu")), -1, None
            for _, item, t in (r for r in rows if r[0] == f"u{u}"):
                if last is None or t - last > 100:  # the start rules (user start first)
                    user = last is None
                    nxt = torch.tensor([0])[: int(not user)]
                    starts = api.Starts(one, one if user else none, nxt)
                    state = net.start(state, starts)
                else:
                    state = net.step(torch.tensor([pending]), state)
                pending, last = item - 100, t
            r = rec.users.find([f"u{u}"])
            for got, want in zip(rec.users.get(r), state):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert rec.users.pending[r[0]] == pending
