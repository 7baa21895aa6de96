"""python/train.py and its library part: the derived solver (and train_val
with --data-dir), data checks, resume, and a real short run of `caffe train`."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dlbhc.errors import UserError
from dlbhc.nets.protos import read_prototxt
from dlbhc.training import caffe_log, caffe_train, solver as solvers
from dlbhc.training import recipes as training
from dlbhc.training.prototxt import Phases, data_layer_pair, data_layers, set_data_layers
from helpers import PROTOTXT, ROOT, TRAIN, learnable_images, run_script, write_training_data


@pytest.fixture
def no_data_check(monkeypatch):
    monkeypatch.setattr(training, "check_data", lambda train_val, data_dir=None: None)


@pytest.mark.caffe
@pytest.mark.parametrize("net,bits", [("cifar", 48), ("alexnet", 48), ("alexnet", 128)])
def test_derived_solver_scales_the_schedule(no_data_check, tmp_path, net, bits):
    original = read_prototxt(solvers.solver_path(net, bits), "SolverParameter")
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
    assert read_prototxt(path, "SolverParameter").max_iter == solver.max_iter


def test_unknown_net_lists_the_available_ones():
    with pytest.raises(UserError, match="cifar_hash48"):
        solvers.solver_path("cifar", 7)


@pytest.mark.caffe
def test_missing_training_data_names_the_make_target(tmp_path):
    train_val = tmp_path / "train_val.prototxt"
    train_val.write_text('layer { name: "data" type: "Data" top: "data" top: "label"\n'
                         f'  data_param {{ source: "{tmp_path}/nowhere_lmdb" batch_size: 2 }} }}\n')
    with pytest.raises(UserError, match="make data"):
        training.check_data(train_val)


def test_resume_auto_takes_the_latest_snapshot(tmp_path):
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    assert caffe_train.latest_solverstate(tmp_path) is None
    for it in (1000, 5000, 200):
        (snaps / f"cifar_hash48_iter_{it}.solverstate").write_bytes(b"")
    assert caffe_train.latest_solverstate(tmp_path).name == "cifar_hash48_iter_5000.solverstate"


def test_log_lines_are_parsed():
    m = caffe_log.ITER_RE.search("I1127 solver.cpp:218] Iteration 850 (1.88 iter/s, 26.6s/50 iters), "
                                "loss = 1.1694")
    assert m and (m.group(1), m.group(2)) == ("850", "1.1694")
    t = caffe_log.TEST_RE.search("I1127 solver.cpp:418]     Test net output #0: accuracy = 0.8123")
    assert t and (t.group(1), t.group(2)) == ("accuracy", "0.8123")


# The solver's lines of a `caffe train` log (Caffe 1.0, GLOG_logtostderr),
# a 200-iteration run with display 100 and tests at 0 and 200.
CAFFE_LOG = """\
I1127 23:59:58.100000 4242 solver.cpp:57] Solver scaffolding done.
I1127 23:59:58.200000 4242 caffe.cpp:239] Starting Optimization
I1127 23:59:58.200100 4242 solver.cpp:293] Solving cifar_hash12
I1127 23:59:58.200200 4242 solver.cpp:294] Learning Rate Policy: poly
I1127 23:59:58.300000 4242 solver.cpp:351] Iteration 0, Testing net (#0)
I1127 23:59:59.500000 4242 solver.cpp:418]     Test net output #0: accuracy = 0.1
I1127 23:59:59.500100 4242 solver.cpp:418]     Test net output #1: loss = 2.30259 (* 1 = 2.30259 loss)
I1127 23:59:59.700000 4242 solver.cpp:219] Iteration 0 (0 iter/s, 1.4s/100 iters), loss = 2.31
I1127 23:59:59.700100 4242 solver.cpp:238]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I1127 23:59:59.700200 4242 sgd_solver.cpp:105] Iteration 0, lr = 0.1
I1128 00:00:54.700000 4242 solver.cpp:219] Iteration 100 (1.81818 iter/s, 55s/100 iters), loss = 1.65
I1128 00:00:54.700100 4242 solver.cpp:238]     Train net output #0: loss = 1.52 (* 1 = 1.52 loss)
I1128 00:00:54.700200 4242 sgd_solver.cpp:105] Iteration 100, lr = 0.05
I1128 00:01:49.800000 4242 solver.cpp:468] Snapshotting to binary proto file runs/x_iter_200.caffemodel
I1128 00:01:49.900000 4242 solver.cpp:331] Iteration 200, loss = 1.2
I1128 00:01:49.900100 4242 solver.cpp:351] Iteration 200, Testing net (#0)
I1128 00:01:51.100000 4242 solver.cpp:418]     Test net output #0: accuracy = 0.6123
I1128 00:01:51.100100 4242 solver.cpp:418]     Test net output #1: loss = 1.08 (* 1 = 1.08 loss)
I1128 00:01:51.100200 4242 solver.cpp:336] Optimization Done.
"""


def test_the_caffe_log_gives_the_learning_curve(tmp_path):
    """Train and test rows as Caffe's tools/extra/parse_log.py keeps them,
    seconds from the first line (across midnight), and the progress events."""
    log = caffe_log.CaffeLog()
    events = [e for e in map(log.feed, CAFFE_LOG.splitlines(keepends=True)) if e]
    assert events == [("test", 0, "accuracy", "0.1"), ("test", 0, "loss", "2.30259"),
                      ("train", 0, 2.31), ("train", 100, 1.65), ("train", 200, 1.2),
                      ("test", 200, "accuracy", "0.6123"), ("test", 200, "loss", "1.08")]
    assert log.train == [
        {"iteration": 0, "seconds": 1.6, "learning_rate": 0.1, "loss": 2.31},
        {"iteration": 100, "seconds": 56.6, "learning_rate": 0.05, "loss": 1.52}]
    assert log.test == [
        {"iteration": 0, "seconds": 1.4, "learning_rate": None, "accuracy": 0.1,
         "loss": 2.30259},
        {"iteration": 200, "seconds": 113.0, "learning_rate": 0.05, "accuracy": 0.6123,
         "loss": 1.08}]
    files = log.write_csv(tmp_path)
    with open(files["test"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iteration", "seconds", "learning_rate", "accuracy", "loss"]
    assert [(r["iteration"], r["accuracy"]) for r in rows] == [("0", "0.1"), ("200", "0.6123")]
    assert caffe_log.parse_log(CAFFE_LOG.splitlines()).train == log.train


def test_the_learning_curve_of_a_log_whose_glog_writes_the_year():
    """glog 0.7 and later (this project's Caffe build) write the year in the
    prefix (I20261127 23:59:58.1): the curve's seconds are the same as from
    the year-less prefix of Caffe 1.0's logs, across New Year's Eve too."""
    with_year = re.sub(r"^([IWEF])(11)(2[78])", lambda m: m[1] + "2026" + m[2] + m[3],
                       CAFFE_LOG, flags=re.M)
    assert with_year.startswith("I20261127 23:59:58.100000")
    assert caffe_log.parse_log(with_year.splitlines()).train == \
        caffe_log.parse_log(CAFFE_LOG.splitlines()).train
    new_year = with_year.replace("I20261127", "I20261231").replace("I20261128", "I20270101")
    assert [row["seconds"] for row in caffe_log.parse_log(new_year.splitlines()).test] == \
        [1.4, 113.0]


@pytest.mark.caffe
def test_train_script_refuses_options_of_the_other_mode(tmp_path):
    """--weights/--resume/--data-dir are for the checked-in nets, the
    collection's options need --data: named, not silently dropped."""
    out = run_script(TRAIN, ["--data", tmp_path, "--weights", "w.caffemodel",
                             "--data-dir", tmp_path], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--weights, --data-dir do not apply with --data" in out.stderr
    out = run_script(TRAIN, ["--net", "cifar", "--epochs", "3"], check=False)
    assert out.returncode == 2 and "--epochs needs --data" in out.stderr


@pytest.mark.caffe
def test_a_short_schedule_still_ends_with_a_test(no_data_check, tmp_path):
    _, solver = training.derived_solver("cifar", 48, tmp_path, max_iter=1000)
    assert solver.test_interval <= 1000 and 1000 % solver.test_interval == 0


# ---- --data-dir: the run's own train_val ------------------------------------

def without_data_paths(net):
    """The NetParameter with its Data layers' paths cleared (to compare the rest)."""
    net = type(net).FromString(net.SerializeToString())
    for layer in data_layers(net):
        layer.data_param.source = layer.transform_param.mean_file = ""
    return net


@pytest.mark.caffe
@pytest.mark.parametrize("net,bits", [("cifar", 12), ("alexnet", 48)])
def test_data_dir_gives_the_run_its_own_train_val(tmp_path, net, bits):
    checked_in = read_prototxt(PROTOTXT / f"{net}_hash{bits}_train_val.prototxt")
    data_dir = tmp_path / "data"
    names = set()
    for layer in data_layers(checked_in):
        for path in (layer.data_param.source, layer.transform_param.mean_file):
            if path:
                names.add(Path(path).name)
                (data_dir / Path(path).name).mkdir(parents=True, exist_ok=True)
    assert names
    run_dir = tmp_path / "run"
    path, solver = training.derived_solver(net, bits, run_dir, max_iter=10, data_dir=data_dir)
    assert solver.net == str(run_dir / "train_val.prototxt")
    assert read_prototxt(path, "SolverParameter").net == solver.net
    derived = read_prototxt(solver.net)
    rewritten = {p for layer in data_layers(derived)
                 for p in (layer.data_param.source, layer.transform_param.mean_file) if p}
    assert rewritten == {str(data_dir / name) for name in names}
    assert without_data_paths(derived) == without_data_paths(checked_in)
    # a folder without the files is refused, naming the file and --data-dir
    with pytest.raises(UserError, match="--data-dir"):
        training.derived_solver(net, bits, tmp_path / "run2", data_dir=tmp_path / "empty")


@pytest.mark.caffe
def test_without_data_dir_the_solver_uses_the_checked_in_train_val(no_data_check, tmp_path):
    _, solver = training.derived_solver("cifar", 12, tmp_path, max_iter=10)
    assert solver.net == str(ROOT / "prototxt" / "cifar_hash12_train_val.prototxt")
    assert not (tmp_path / "train_val.prototxt").exists()


@pytest.mark.caffe
def test_train_script_refuses_a_data_dir_without_the_data(tmp_path):
    out = run_script(TRAIN, ["--net", "cifar", "--bits", "12", "--max-iter", "2",
                             "--data-dir", tmp_path / "empty", "--runs-dir", tmp_path / "runs"],
                     check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cifar10_train_32pad4_lmdb" in out.stderr and "--data-dir" in out.stderr


def test_one_data_layer_spec_for_the_checked_in_files_and_the_runs(caffe):
    """The checked-in Data layers (generate.py renders DataLayer.fields())
    are what DataLayer.add_to builds for a run; set_data_layers rewrites
    them per phase."""
    checked_in = read_prototxt(PROTOTXT / "cifar_hash12_train_val.prototxt")
    train, test = data_layers(checked_in)
    built = caffe.proto.caffe_pb2.NetParameter()
    for layer in data_layer_pair((train.data_param.source, test.data_param.source), (100, 100),
                                 crop_size=32, mean_value=tuple(train.transform_param.mean_value)):
        layer.add_to(built)
    assert list(built.layer) == [train, test]
    set_data_layers(checked_in, source=Phases("a_lmdb", "b_lmdb"), batch_size=Phases(7, 9),
                    mean_value=(1, 2, 3))
    assert [(layer.data_param.source, layer.data_param.batch_size,
             layer.transform_param.mirror, list(layer.transform_param.mean_value))
            for layer in data_layers(checked_in)] == [("a_lmdb", 7, True, [1, 2, 3]),
                                                      ("b_lmdb", 9, False, [1, 2, 3])]


# ---- python/train.py for real: a few iterations on tiny generated data -------

@pytest.mark.slow
def test_train_script_runs_caffe_train_on_a_data_dir(caffe, tmp_path):
    """`python/train.py --data-dir` trains the small 12-bit net for a few
    iterations on LMDBs written here (40x40 padded training images, 32x32
    test images, as `make data` writes them) and leaves a usable run folder."""
    rng = np.random.default_rng(0)
    train_images, train_labels = learnable_images(rng, 60, size=40)
    test_images, test_labels = learnable_images(rng, 20, size=32)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_training_data(caffe, data_dir, (train_images, train_labels),
                        (test_images, test_labels), (3, 32, 32),
                        names=("cifar10_train_32pad4_lmdb", "cifar10_test_32_lmdb",
                               "cifar10_train_32_mean.binaryproto"))
    runs = tmp_path / "runs"
    iters = 3
    out = run_script(TRAIN, ["--net", "cifar", "--bits", "12", "--max-iter", iters,
                             "--data-dir", data_dir, "--runs-dir", runs], timeout=600)
    run_dir = runs / "cifar_hash12"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["returncode"] == 0 and summary["net"] == "cifar_hash12"
    assert summary["max_iter"] == iters and summary["seconds"] > 0
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["test"]["accuracy"] <= 1
    command = summary["command"]
    assert command[1:3] == ["train", "-solver"] and command[3] == str(run_dir / "solver.prototxt")
    # the command is printed and heads the log; the data came from --data-dir
    log = (run_dir / "train.log").read_text()
    assert log.splitlines()[0] == "# " + " ".join(command)
    assert "running: " + " ".join(command) in out.stderr
    assert str(data_dir / "cifar10_train_32pad4_lmdb") in log
    assert str(data_dir / "cifar10_test_32_lmdb") in log
    # progress lines on stderr, the summary line on stdout
    assert f"train iter 0/{iters} loss " in out.stderr and " it/s ETA " in out.stderr
    assert "test  iter" in out.stderr and "accuracy = " in out.stderr
    assert "trained cifar_hash12: " in out.stdout
    # the learning curve, from the log, beside it
    with open(run_dir / "train_curve.csv") as f:
        train_rows = list(csv.DictReader(f))
    with open(run_dir / "test_curve.csv") as f:
        test_rows = list(csv.DictReader(f))
    assert summary["curve"]["train"] == str(run_dir / "train_curve.csv")
    assert train_rows and train_rows[0]["iteration"] == "0" and float(train_rows[0]["loss"]) > 0
    assert float(train_rows[0]["learning_rate"]) > 0
    assert test_rows[-1]["iteration"] == str(iters)
    assert float(test_rows[-1]["accuracy"]) == summary["test"]["accuracy"]
    # the final weights: a link to the last snapshot, loadable with the deploy net
    weights = Path(summary["weights"])
    assert weights == run_dir / "cifar_hash12.caffemodel"
    assert weights.resolve() == run_dir / "snapshots" / f"cifar_hash12_iter_{iters}.caffemodel"
    net = caffe.Net(str(PROTOTXT / "cifar_hash12_deploy.prototxt"), caffe.TEST,
                    weights=str(weights))
    net.blobs["data"].reshape(2, 3, 32, 32)
    net.blobs["data"].data[...] = test_images[:2].astype(np.float32) - 120
    net.forward()
    latent = net.blobs["latent"].data
    assert latent.shape == (2, 12) and np.all((latent > 0) & (latent < 1))
    assert (run_dir / "snapshots" / f"cifar_hash12_iter_{iters}.solverstate").exists()
    # the model's preprocessing, recorded for extract.py: the train_val's
    # mean_value and the test LMDB's image size
    record = json.loads((run_dir / "preprocessing.json").read_text())
    mean_values = [layer.transform_param.mean_value for layer in data_layers(
        read_prototxt(PROTOTXT / "cifar_hash12_train_val.prototxt"))][1]
    assert record["mean_bgr"] == pytest.approx(list(mean_values), abs=1e-3)
    assert (record["resize"], record["crop"], record["channel_order"]) == (32, 32, "BGR")


def test_a_failed_caffe_train_names_its_log_and_the_hint(caffe, tmp_path):
    with pytest.raises(UserError, match=r"caffe train failed \(exit -?\d+\); see .*train\.log"
                                        r"; resume with it"):
        caffe_train.run_caffe_train(tmp_path / "no_such_solver.prototxt", 10, tmp_path, [], None,
                                    failed_hint=lambda: "; resume with it")
    assert "no_such_solver" in (tmp_path / "train.log").read_text()
