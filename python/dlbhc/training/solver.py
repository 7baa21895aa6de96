"""A run's solver.prototxt: a checked-in solver adapted to the run.

The checked-in solver is the recipe; a run folder gets its own copy with
only what the run changes: its net (train_val), max_iter (the learning-rate
steps, tests and snapshots scaled alike), CPU or GPU, the snapshot folder,
and for a collection the test set's size (tests and the snapshot at the
last iteration only) and perhaps another base_lr. One writer for every
recipe (write_solver).
"""
import os
from pathlib import Path

from ..errors import UserError
from ..nets.protos import caffe_pb2, read_prototxt
from ..nets.caffe_env import PROJECT_ROOT
from .prototxt import PROTOTXT_DIR, write_net

# Passes over a collection's training records when neither --epochs nor
# --max-iter is given.
DEFAULT_EPOCHS = 10


def run_name(net, bits):
    """<net>_hash<bits>: the checked-in files' stem and the run folder's name."""
    return f"{net}_hash{bits}"


def solver_path(net, bits):
    """prototxt/<net>_hash<bits>_solver.prototxt, or a UserError listing the
    available ones."""
    path = PROTOTXT_DIR / f"{run_name(net, bits)}_solver.prototxt"
    if not path.exists():
        known = sorted(p.name.replace("_solver.prototxt", "")
                       for p in PROTOTXT_DIR.glob("*_solver.prototxt"))
        raise UserError(f"no solver {path.name}; available: {', '.join(known)}")
    return path


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


def write_solver(template, run_dir, name, gpu=None, net=None, max_iter=None, test_iter=None,
                 base_lr=None, note="python/train.py"):
    """run_dir/solver.prototxt from the checked-in solver `template`;
    returns (its path, the SolverParameter).

    net: the train_val the run trains (default: the template's, made
    absolute, since caffe runs in the project root); max_iter: the
    schedule scaled to it (scale_schedule); test_iter: the batches of a
    collection's test set, tested (and snapshotted) at the last iteration
    only, the display at most every 1/20 of the run; base_lr: another
    learning rate; gpu: a device number (GPU mode) or None (CPU)."""
    solver = read_prototxt(template, "SolverParameter")
    if net is not None:
        solver.net = str(net)
    elif not os.path.isabs(solver.net):
        solver.net = str(PROJECT_ROOT / solver.net)
    if max_iter:
        scale_schedule(solver, int(max_iter))
    if test_iter is not None:
        solver.test_iter[:] = [int(test_iter)]
        solver.test_interval = solver.snapshot = solver.max_iter
        solver.display = max(1, min(solver.display, solver.max_iter // 20))
    if base_lr:
        solver.base_lr = float(base_lr)
    modes = caffe_pb2().SolverParameter
    solver.solver_mode = modes.GPU if gpu is not None else modes.CPU
    run_dir = Path(os.path.abspath(run_dir))
    (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    solver.snapshot_prefix = str(run_dir / "snapshots" / name)
    path = write_net(solver, run_dir / "solver.prototxt",
                     f"derived from prototxt/{Path(template).name} by {note}")
    return path, solver


def schedule(records, batch, epochs=None, max_iter=None):
    """max_iter: given, or `epochs` passes over the training records."""
    if max_iter:
        return int(max_iter)
    return max(1, round((epochs or DEFAULT_EPOCHS) * records / batch))
