"""python/train.py's library part: the derived solver, data checks, resume."""
from pathlib import Path

import pytest

from dlbhc import training
from dlbhc.errors import UserError


@pytest.fixture
def no_data_check(monkeypatch):
    monkeypatch.setattr(training, "check_data", lambda train_val: None)


@pytest.mark.parametrize("net,bits", [("cifar", 48), ("alexnet", 48), ("alexnet", 128)])
def test_derived_solver_scales_the_schedule(no_data_check, tmp_path, net, bits):
    original = training.read_solver(training.solver_path(net, bits))
    path, solver = training.derived_solver(net, bits, tmp_path, max_iter=original.max_iter // 10,
                                           gpu=True)
    assert path == tmp_path / "solver.prototxt" and path.exists()
    assert solver.max_iter == original.max_iter // 10
    assert solver.max_iter % solver.test_interval == 0  # a test at the last iteration
    if original.lr_policy == "step":
        assert solver.stepsize == round(original.stepsize / 10)
    if original.lr_policy == "multistep":
        assert list(solver.stepvalue) == [round(s / 10) for s in original.stepvalue]
    assert solver.solver_mode == 1  # GPU
    assert solver.snapshot_prefix == str(tmp_path / "snapshots" / f"{net}_hash{bits}")
    assert Path(solver.net).is_absolute() and Path(solver.net).exists()
    # the written file reads back to the same settings
    assert training.read_solver(path).max_iter == solver.max_iter


def test_unknown_net_lists_the_available_ones():
    with pytest.raises(UserError, match="cifar_hash48"):
        training.solver_path("cifar", 7)


def test_missing_training_data_names_the_make_target(tmp_path):
    train_val = tmp_path / "train_val.prototxt"
    train_val.write_text('layer { name: "data" type: "Data" top: "data" top: "label"\n'
                         f'  data_param {{ source: "{tmp_path}/nowhere_lmdb" batch_size: 2 }} }}\n')
    with pytest.raises(UserError, match="make data"):
        training.check_data(train_val)


def test_resume_auto_takes_the_latest_snapshot(tmp_path):
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    assert training.latest_solverstate(tmp_path) is None
    for it in (1000, 5000, 200):
        (snaps / f"cifar_hash48_iter_{it}.solverstate").write_bytes(b"")
    assert training.latest_solverstate(tmp_path).name == "cifar_hash48_iter_5000.solverstate"


def test_log_lines_are_parsed():
    m = training.ITER_RE.search("I1127 solver.cpp:218] Iteration 850 (1.88 iter/s, 26.6s/50 iters), "
                                "loss = 1.1694")
    assert m and (m.group(1), m.group(2)) == ("850", "1.1694")
    t = training.TEST_RE.search("I1127 solver.cpp:418]     Test net output #0: accuracy = 0.8123")
    assert t and (t.group(1), t.group(2)) == ("accuracy", "0.8123")


def test_a_short_schedule_still_ends_with_a_test(no_data_check, tmp_path):
    _, solver = training.derived_solver("cifar", 48, tmp_path, max_iter=1000)
    assert solver.test_interval <= 1000 and 1000 % solver.test_interval == 0
