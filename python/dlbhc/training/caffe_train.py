"""Running `caffe train`: the command, its log, progress, the final weights.

Caffe's own tool does the training, so a run can be repeated with Caffe
alone: the exact command is logged (and heads run_dir/train.log). While it
runs, its log goes line by line to train.log and through caffe_log.CaffeLog,
which shows the progress (iterations, loss, it/s, ETA; test outputs) on the
report logger and keeps the learning curve, written beside the log as
train_curve.csv and test_curve.csv.
"""
import ctypes
import os
import re
import signal
import subprocess
import time

from ..errors import UserError
from ..nets.caffe_env import PROJECT_ROOT, caffe_tool
from ..progress import format_seconds
from ..report import get_logger
from .caffe_log import CaffeLog

log = get_logger(__name__)


def latest_solverstate(run_dir):
    """The run's latest snapshots/*.solverstate (by iteration), or None."""
    states = sorted((run_dir / "snapshots").glob("*.solverstate"),
                    key=lambda p: int(re.search(r"_iter_(\d+)", p.name).group(1)))
    return states[-1] if states else None


def link_final_weights(run_dir, name, snapshot):
    """run_dir/<name>.caffemodel: a relative link to the final snapshot."""
    link = run_dir / f"{name}.caffemodel"
    link.unlink(missing_ok=True)
    link.symlink_to(snapshot.relative_to(run_dir))
    return link


def run_caffe_train(solver_file, max_iter, run_dir, args, gpu, failed_hint=lambda: ""):
    """`caffe train -solver SOLVER -sigint_effect snapshot ARGS [-gpu N]`
    with progress on the report logger, Caffe's log in run_dir/train.log and
    its curve in run_dir/{train,test}_curve.csv: (the command, a summary:
    returncode, seconds, iterations, final_loss, test, seconds_per_iter,
    curve). A failed run raises UserError (failed_hint() is appended to its
    message)."""
    cmd = [str(caffe_tool("caffe")), "train", "-solver", str(solver_file),
           "-sigint_effect", "snapshot"] + list(args)
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    log.info("running: %s", " ".join(cmd))
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    summary = _run_and_watch(cmd, env, run_dir, max_iter)
    if summary["returncode"] != 0:
        raise UserError(f"caffe train failed (exit {summary['returncode']}); see "
                        f"{run_dir / 'train.log'}" + failed_hint())
    return cmd, summary


def _die_with_parent():
    """In the child before exec: SIGTERM when train.py dies (Linux), so a
    killed train.py (kill -9, a timeout) leaves no caffe training on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Watch:
    """Progress lines from CaffeLog's events: it/s and ETA since the first
    iteration seen (Caffe's start-up is not counted)."""

    def __init__(self, max_iter):
        self.max_iter = max_iter
        self.first = None            # (iteration, monotonic time)
        self.iteration, self.loss = 0, None
        self.tests = {}

    def show(self, event):
        if event[0] == "train":
            _, it, self.loss = event
            now = time.monotonic()
            self.first = self.first or (it, now)
            self.iteration = it
            done, elapsed = it - self.first[0], now - self.first[1]
            rate = done / elapsed if elapsed > 0 and done else 0
            eta = format_seconds((self.max_iter - it) / rate) if rate else "--:--"
            log.info("train iter %d/%d loss %.4f %.2f it/s ETA %s", it, self.max_iter,
                     self.loss, rate, eta)
        else:
            _, it, name, value = event
            self.tests[name] = float(value)
            log.info("test  iter %s: %s = %s", it, name, value)


def _run_and_watch(cmd, env, run_dir, max_iter):
    start = time.monotonic()
    curve, watch = CaffeLog(), _Watch(max_iter)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1, cwd=PROJECT_ROOT,
                            preexec_fn=_die_with_parent)
    try:
        with open(run_dir / "train.log", "w", buffering=1) as logfile:  # tail -f works
            logfile.write("# " + " ".join(cmd) + "\n")
            for line in proc.stdout:
                logfile.write(line)
                event = curve.feed(line)
                if event is not None:
                    watch.show(event)
                if "Check failed" in line or "Error" in line:
                    log.warning(line.rstrip())
        proc.wait()
    except KeyboardInterrupt:
        # caffe snapshots on SIGINT (-sigint_effect snapshot); let it finish that
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    finally:
        files = curve.write_csv(run_dir)
    seconds = time.monotonic() - start
    iters = watch.iteration - (watch.first[0] if watch.first else 0)
    return {"returncode": proc.returncode, "seconds": round(seconds, 1),
            "iterations": watch.iteration, "final_loss": watch.loss, "test": watch.tests,
            "seconds_per_iter": round(seconds / iters, 4) if iters else None,
            "curve": files}
