"""`make train`: run `caffe train` on a hashing net with progress and a summary.

The checked-in solver is the recipe; a run gets its own copy under
runs/<net>_hash<bits>/ with only what the command line changed (max_iter,
with the learning-rate steps scaled alike; CPU/GPU; snapshot folder). The
exact `caffe train` command is printed and logged, so a run can be repeated
with Caffe alone.

The checked-in train_val prototxts read their LMDBs (and AlexNet's mean
file) from data/cifar10/ in the project. With `data_dir` (train.py
--data-dir DIR) the run folder also gets its own train_val.prototxt, whose
Data layers read the same file names from DIR instead (`source` and
`mean_file` rewritten), and the run's solver.prototxt points at that copy;
without it the solver's net is the checked-in train_val, as before.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .caffe_env import PROJECT_ROOT, caffe_tool
from .errors import UserError
from .progress import format_seconds
from .protos import caffe_pb2, read_prototxt

ITER_RE = re.compile(r"Iteration (\d+).*?, loss = ([-+0-9.eE]+|nan)")
TEST_RE = re.compile(r"Test net output #\d+: (\w+) = ([-+0-9.eE]+|nan)")


def run_name(net, bits):
    return f"{net}_hash{bits}"


def solver_path(net, bits):
    path = PROJECT_ROOT / "prototxt" / f"{run_name(net, bits)}_solver.prototxt"
    if not path.exists():
        known = sorted(p.name.replace("_solver.prototxt", "")
                       for p in (PROJECT_ROOT / "prototxt").glob("*_solver.prototxt"))
        raise UserError(f"no solver {path.name}; available: {', '.join(known)}")
    return path


def derived_solver(net, bits, run_dir, max_iter=None, gpu=False, data_dir=None):
    """Write runs/<name>/solver.prototxt and return (path, SolverParameter).

    With `data_dir`, also runs/<name>/train_val.prototxt reading its data
    from there (derived_train_val), and the solver's net is that copy.
    """
    from google.protobuf import text_format
    solver = read_prototxt(solver_path(net, bits), "SolverParameter")
    if max_iter:
        scale_schedule(solver, max_iter)
    modes = caffe_pb2().SolverParameter
    solver.solver_mode = modes.GPU if gpu else modes.CPU
    name = run_name(net, bits)
    # Absolute paths: caffe runs in the project root, whatever the caller's
    # working folder.
    run_dir = Path(os.path.abspath(run_dir))
    (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    solver.snapshot_prefix = str(run_dir / "snapshots" / name)
    solver.net = str(PROJECT_ROOT / solver.net) if not os.path.isabs(solver.net) else solver.net
    if data_dir is not None:
        solver.net = str(derived_train_val(Path(solver.net), run_dir, data_dir))
    check_data(Path(solver.net), data_dir)
    out = run_dir / "solver.prototxt"
    out.write_text(f"# derived from prototxt/{name}_solver.prototxt by python/train.py\n"
                   + text_format.MessageToString(solver))
    return out, solver


def scale_schedule(solver, max_iter):
    """Set max_iter, scaling the learning-rate steps, tests and snapshots alike."""
    scale = max_iter / solver.max_iter
    if solver.lr_policy == "step":
        solver.stepsize = max(1, int(round(solver.stepsize * scale)))
    if solver.lr_policy == "multistep":
        steps = [max(1, int(round(s * scale))) for s in solver.stepvalue]
        del solver.stepvalue[:]
        solver.stepvalue.extend(steps)
    if solver.test_interval:
        # Caffe tests every test_interval iterations: keep about as many
        # tests, one of them at the last iteration, so the run reports
        # its final accuracy.
        tests = max(1, round(max_iter / solver.test_interval))
        solver.test_interval = max_iter // tests if max_iter % tests == 0 else max_iter
    solver.max_iter = max_iter
    solver.snapshot = min(solver.snapshot, max_iter) if solver.snapshot else max_iter


def derived_train_val(train_val, run_dir, data_dir):
    """Write run_dir/train_val.prototxt: `train_val` with every Data layer's
    `source` and `mean_file` moved to the same file name under `data_dir`.
    Returns its path."""
    from google.protobuf import text_format
    data_dir = Path(os.path.abspath(data_dir))
    net = read_prototxt(train_val, "NetParameter")
    for layer in net.layer:
        if layer.type != "Data":
            continue
        if layer.data_param.source:
            layer.data_param.source = str(data_dir / Path(layer.data_param.source).name)
        if layer.transform_param.mean_file:
            layer.transform_param.mean_file = str(
                data_dir / Path(layer.transform_param.mean_file).name)
    out = run_dir / "train_val.prototxt"
    out.write_text(f"# {train_val.name} reading its data from {data_dir} "
                   "(python/train.py --data-dir)\n" + text_format.MessageToString(net))
    return out


def check_data(train_val, data_dir=None):
    """Refuse early when the LMDBs or mean files the net reads are missing
    (`data_dir`: the --data-dir they were moved to, for the message)."""
    net = read_prototxt(train_val, "NetParameter")
    for layer in net.layer:
        if layer.type != "Data":
            continue
        for path in (layer.data_param.source, layer.transform_param.mean_file):
            if path and not (PROJECT_ROOT / path).exists() and not Path(path).exists():
                hint = (f"--data-dir {data_dir} must hold the files the checked-in "
                        "train_val reads, under the same names" if data_dir is not None else
                        "run `make data` (small net) or `make data-alexnet` (AlexNet) first")
                raise UserError(f"{train_val.name} reads {path}, which does not exist: {hint}")


def latest_solverstate(run_dir):
    states = sorted((run_dir / "snapshots").glob("*.solverstate"),
                    key=lambda p: int(re.search(r"_iter_(\d+)", p.name).group(1)))
    return states[-1] if states else None


def train(net="cifar", bits=48, weights=None, max_iter=None, gpu=None, resume=None,
          runs_dir=None, data_dir=None, log=sys.stderr):
    """Run `caffe train` for <net>_hash<bits> in runs_dir/<net>_hash<bits>/
    (default runs/), reading the training data from data_dir when given (see
    the module docstring); returns the summary also written to
    train_summary.json."""
    name = run_name(net, bits)
    run_dir = Path(os.path.abspath(Path(runs_dir or PROJECT_ROOT / "runs") / name))
    run_dir.mkdir(parents=True, exist_ok=True)
    solver_file, solver = derived_solver(net, bits, run_dir, max_iter, gpu is not None,
                                         data_dir)
    cmd = [str(caffe_tool("caffe")), "train", "-solver", str(solver_file),
           "-sigint_effect", "snapshot"]
    # caffe runs in the project root: paths the user gave are made absolute
    # here, where they were meant relative to the caller's folder.
    if resume:
        state = latest_solverstate(run_dir) if resume == "auto" else Path(os.path.abspath(resume))
        if state is None or not Path(state).exists():
            raise UserError(f"nothing to resume from in {run_dir / 'snapshots'}" if resume == "auto"
                            else f"solver state {resume} does not exist")
        cmd += ["-snapshot", str(state)]
    elif weights:
        if not Path(weights).exists():
            raise UserError(f"weights {weights} do not exist (for bvlc_alexnet: `make weights`)")
        cmd += ["-weights", os.path.abspath(weights)]
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    print("running: " + " ".join(cmd), file=log)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    summary = _run_and_watch(cmd, env, run_dir / "train.log", solver.max_iter, log)
    final = run_dir / "snapshots" / f"{name}_iter_{solver.max_iter}.caffemodel"
    if summary["returncode"] != 0:
        raise UserError(f"caffe train failed (exit {summary['returncode']}); see {run_dir / 'train.log'}"
                        + ("; resume with `make train ... RESUME=auto`"
                           if latest_solverstate(run_dir) else ""))
    if final.exists():
        link = run_dir / f"{name}.caffemodel"
        link.unlink(missing_ok=True)
        link.symlink_to(final.relative_to(run_dir))
        summary["weights"] = str(link)
    summary.update(net=name, max_iter=solver.max_iter, command=cmd)
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_and_watch(cmd, env, log_path, max_iter, log):
    start = time.monotonic()
    first_iter = None
    last = {"iter": 0, "loss": None}
    tests = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1, cwd=PROJECT_ROOT)
    try:
        with open(log_path, "w", buffering=1) as logfile:  # line-buffered: tail -f works
            logfile.write("# " + " ".join(cmd) + "\n")
            for line in proc.stdout:
                logfile.write(line)
                m = ITER_RE.search(line)
                if m:
                    it = int(m.group(1))
                    if first_iter is None:
                        first_iter = (it, time.monotonic())
                    last.update(iter=it, loss=float(m.group(2)))
                    done_iters = it - first_iter[0]
                    elapsed = time.monotonic() - first_iter[1]
                    rate = done_iters / elapsed if elapsed > 0 and done_iters else 0
                    eta = format_seconds((max_iter - it) / rate) if rate else "--:--"
                    print(f"train iter {it}/{max_iter} loss {last['loss']:.4f} "
                          f"{rate:.2f} it/s ETA {eta}", file=log, flush=True)
                m = TEST_RE.search(line)
                if m:
                    tests[m.group(1)] = float(m.group(2))
                    print(f"test  iter {last['iter']}: {m.group(1)} = {m.group(2)}",
                          file=log, flush=True)
                if "Check failed" in line or "Error" in line:
                    print(line.rstrip(), file=log)
        proc.wait()
    except KeyboardInterrupt:
        # caffe snapshots on SIGINT (-sigint_effect snapshot); let it finish that
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    seconds = time.monotonic() - start
    iters = last["iter"] - (first_iter[0] if first_iter else 0)
    return {"returncode": proc.returncode, "seconds": round(seconds, 1),
            "iterations": last["iter"], "final_loss": last["loss"], "test": tests,
            "seconds_per_iter": round(seconds / iters, 4) if iters else None}
