"""data=presplit: given train and test files (the official GRU4Rec code's TSV layout) read as
they are, and one-line errors naming the file, the column or the key for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from hrnn_lit.config import validate
from hrnn_lit.data.presplit import PresplitDataModule, read_presplit
from hrnn_lit.errors import ConfigError, DataError, HrnnError
from hrnn_lit.run import run
from tests.conftest import compose_cfg

TRAIN = """SessionId\tItemId\tTime\tUserId
s2\t10\t200\tu1
s2\t11\t201\tu1
s1\t12\t100\tu1
s1\t10\t101\tu1
s1\t13\t102\tu1
s3\t11\t150\tu2
s4\t14\t300\tu2
"""
TEST = """SessionId\tItemId\tTime\tUserId
t1\t12.0\t400\tu1
t1\t99\t401\tu1
t1\t10\t402\tu1
s3\t11\t500\tu2
s3\t13\t501\tu2
"""


def write(tmp: Path, train: str = TRAIN, test: str = TEST) -> tuple[str, str]:
    (tmp / "train.tsv").write_text(train)
    (tmp / "test.tsv").write_text(test)
    return str(tmp / "train.tsv"), str(tmp / "test.tsv")


def drop_user(text: str) -> str:
    return "".join("\t".join(line.split("\t")[:3]) + "\n" for line in text.splitlines())


def test_files_are_read_as_given(tmp_path):
    """Every train event is kept (a one-event session too); a user's sessions follow their
    first times, test ones after all train ones; ids agree across files (12.0 is 12)."""
    train, test, has_users = read_presplit(*write(tmp_path))
    assert has_users and train.height == 7 and test.height == 5
    assert train.columns == ["user", "item", "ts", "session"]
    u1 = train.filter(train["user"] == "u1")
    assert u1["item"].to_list() == [12, 10, 13, 10, 11]  # s1 (t=100) before s2 (t=200)
    assert u1["session"].to_list() == [0, 0, 0, 2, 2]  # s3 (t=150, u2) numbered between
    assert test["item"].to_list() == [12, 99, 10, 11, 13]
    assert test["session"].min() > train["session"].max()  # s3 of the test file is new


def test_datamodule_removes_only_test_items_unknown_to_train(tmp_path):
    train_path, test_path = write(tmp_path)
    dm = PresplitDataModule(train_path, test_path, batch_size=2, eval_batch_size=4)
    dm.setup("fit")
    assert dm.n_items == 5 and sorted(dm.item_counts.tolist()) == [1, 1, 1, 2, 2]
    assert dm.n_dropped["test"] == 1  # item 99
    # u1's sessions give 2 + 1 steps; u2's one-event sessions none (nothing is filtered)
    assert dm.fit_steps.input.size == 3 and not dm.has_validation
    assert dm.eval_steps["test"].score.sum() == 2  # t1: 12 -> 10 (99 removed); s3: 11 -> 13


def test_without_users_every_session_is_its_own_user(tmp_path):
    train_path, test_path = write(tmp_path, drop_user(TRAIN), drop_user(TEST))
    train, test, has_users = read_presplit(train_path, test_path)
    assert not has_users
    assert train["user"].n_unique() == 4 and test["user"].n_unique() == 2
    assert set(test["user"]).isdisjoint(set(train["user"]))  # test s3 is not train s3
    dm = PresplitDataModule(train_path, test_path, model_name="session_rnn",
                            model_user_propagation="none", model_reset_at="session")  # fmt: skip
    dm.setup("fit")
    assert dm.n_without_history["test"] == 2
    for name, propagation, reset in [
        ("hrnn_init", "init", "session"),
        ("rnn_concat", "none", "user"),
        ("user_pop", None, None),
    ]:
        dm = PresplitDataModule(
            train_path,
            test_path,
            model_name=name,
            model_user_propagation=propagation,
            model_reset_at=reset,
        )
        with pytest.raises(ConfigError, match=f"train.tsv: no user column.*{name}"):
            dm.setup("fit")  # fmt: skip


@pytest.mark.parametrize(
    "train,test,msg",
    [
        (TRAIN.replace("ItemId", "Item"), TEST, r"train.tsv: no column 'ItemId' \(header: "
         r"SessionId, Item, Time, UserId\); set data.item_col"),
        (TRAIN, TEST.replace("Time", "ts"), "test.tsv: no column 'Time'.*data.time_col"),
        ("", TEST, "train.tsv: empty file"),
        ("SessionId\tItemId\tTime\n", TEST, "train.tsv: no events after the header line"),
        (TRAIN, TEST.replace("\t401\t", "\tsoon\t"), "test.tsv: line 3: 'Time' must be a number"),
        (TRAIN.replace("s4\t14", "s4\t "), TEST, "train.tsv: line 8: empty 'ItemId'"),
        (TRAIN, drop_user(TEST), "test.tsv: no column 'UserId', which .*train.tsv has"),
        (TRAIN.replace("s4\t14\t300\tu2", "s1\t14\t300\tu2"), TEST,
         "train.tsv: session 's1' has events of several users"),
        (TRAIN.replace("\t", ","), TEST, "train.tsv: no column 'SessionId'"),
    ],
)  # fmt: skip
def test_bad_files_stop_with_one_line_naming_file_and_column(tmp_path, train, test, msg):
    with pytest.raises(DataError, match=msg) as e:
        read_presplit(*write(tmp_path, train, test))
    assert "\n" not in str(e.value)


def test_missing_paths_and_settings(tmp_path):
    train_path, test_path = write(tmp_path)
    with pytest.raises(DataError, match=r"nope.tsv: file not found \(data.test_path\)"):
        read_presplit(train_path, str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match=r"not a regular file \(data.train_path\)"):
        read_presplit(str(tmp_path), test_path)
    with pytest.raises(ConfigError, match="data.train_path is not set"):
        read_presplit(None, test_path)
    with pytest.raises(ConfigError, match="data.fit_split must be train"):
        PresplitDataModule(train_path, test_path, fit_split="valid_train")
    train, _, _ = read_presplit(
        *write(tmp_path, TRAIN.replace("ItemId", "item"), TEST.replace("ItemId", "item")),
        item_col="item",
    )
    assert train.height == 7


def test_cli_trains_a_session_rnn_and_refuses_a_hrnn_without_users(tmp_path):
    """The command line: the session RNN trains and tests on the files; an HRNN on files
    without users stops with one line before any training."""
    big_train = "SessionId\tItemId\tTime\n" + "".join(
        f"{s}\t{(s * 7 + k) % 30}\t{s * 10 + k}\n" for s in range(200) for k in range(4)
    )
    big_test = "SessionId\tItemId\tTime\n" + "".join(
        f"{s}\t{(s * 5 + k) % 30}\t{5000 + s * 10 + k}\n" for s in range(20) for k in range(3)
    )
    train_path, test_path = write(tmp_path, big_train, big_test)
    data = ["data=presplit", f"data.train_path={train_path}", f"data.test_path={test_path}",
            "data.batch_size=16", "data.steps_per_batch=16"]  # fmt: skip
    cfg = compose_cfg([*data, "model=session_rnn", "model.logq=1.0", "model.n_sample=8",
                       "model.constrained_embedding=true", "model.loss=cross-entropy"],
                      tmp_path / "out")  # fmt: skip
    validate(cfg)
    results = run(cfg)
    assert results["test/n_events"] == 20 * 2 and results["engine"] == "fused"
    cfg = compose_cfg([*data, "model=hrnn_init"], tmp_path / "out2")
    with pytest.raises(HrnnError, match="no user column, so only session models"):
        run(cfg)
