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

from ..nets.caffe_env import PROJECT_ROOT, caffe_tool
from ..errors import UserError
from ..progress import format_seconds
from ..nets.protos import caffe_pb2, read_prototxt

ITER_RE = re.compile(r"Iteration (\d+).*?, loss = ([-+0-9.eE]+|nan)")
TEST_RE = re.compile(r"Test net output #\d+: (\w+) = ([-+0-9.eE]+|nan)")


def run_name(net, bits):
    return f"{net}_hash{bits}"


PROTOTXT_DIR = PROJECT_ROOT / "prototxt"


def solver_path(net, bits):
    path = PROTOTXT_DIR / f"{run_name(net, bits)}_solver.prototxt"
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


def set_data_layers(net, sources, batch_sizes, mean_bgr, crop=None):
    """Point a train_val NetParameter's Data layers at (train, test)
    `sources` with (train, test) `batch_sizes` and the per-channel
    `mean_bgr`; with `crop`, random crops of that size, mirrored in
    training.  Returns net (changed in place)."""
    train_phase = caffe_pb2().TRAIN
    for layer in net.layer:
        if layer.type != "Data":
            continue
        is_train = any(r.phase == train_phase for r in layer.include)
        layer.data_param.source = str(sources[0 if is_train else 1])
        layer.data_param.batch_size = batch_sizes[0 if is_train else 1]
        if crop is not None:
            layer.transform_param.crop_size = crop
            layer.transform_param.mirror = is_train
        del layer.transform_param.mean_value[:]
        layer.transform_param.mean_value.extend(mean_bgr)
    return net


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



def run_caffe_train(solver_file, max_iter, run_dir, args, gpu, log, failed_hint=lambda: ""):
    """`caffe train -solver SOLVER -sigint_effect snapshot ARGS [-gpu N]`
    with progress on `log` and Caffe's log in run_dir/train.log: (the
    command, _run_and_watch's summary).  A failed run raises UserError
    (failed_hint() is appended to its message)."""
    cmd = [str(caffe_tool("caffe")), "train", "-solver", str(solver_file),
           "-sigint_effect", "snapshot"] + list(args)
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    print("running: " + " ".join(cmd), file=log)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    summary = _run_and_watch(cmd, env, run_dir / "train.log", max_iter, log)
    if summary["returncode"] != 0:
        raise UserError(f"caffe train failed (exit {summary['returncode']}); see "
                        f"{run_dir / 'train.log'}" + failed_hint())
    return cmd, summary


def link_final_weights(run_dir, name, snapshot):
    """run_dir/<name>.caffemodel: a relative link to the final snapshot."""
    link = run_dir / f"{name}.caffemodel"
    link.unlink(missing_ok=True)
    link.symlink_to(snapshot.relative_to(run_dir))
    return link


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
    args = []
    # caffe runs in the project root: paths the user gave are made absolute
    # here, where they were meant relative to the caller's folder.
    if resume:
        state = latest_solverstate(run_dir) if resume == "auto" else Path(os.path.abspath(resume))
        if state is None or not Path(state).exists():
            raise UserError(f"nothing to resume from in {run_dir / 'snapshots'}" if resume == "auto"
                            else f"solver state {resume} does not exist")
        args += ["-snapshot", str(state)]
    elif weights:
        if not Path(weights).exists():
            raise UserError(f"weights {weights} do not exist (for bvlc_alexnet: `make weights`)")
        args += ["-weights", os.path.abspath(weights)]
    cmd, summary = run_caffe_train(
        solver_file, solver.max_iter, run_dir, args, gpu, log,
        failed_hint=lambda: ("; resume with `make train ... RESUME=auto`"
                             if latest_solverstate(run_dir) else ""))
    final = run_dir / "snapshots" / f"{name}_iter_{solver.max_iter}.caffemodel"
    if final.exists():
        summary["weights"] = str(link_final_weights(run_dir, name, final))
    # the model's preprocessing, so extract.py and retrieve.py need no --mean
    from ..nets.model import write_preprocessing_record
    prep = train_val_preprocessing(solver.net, deploy_input_size(
        PROTOTXT_DIR / f"{name}_deploy.prototxt"))
    if prep is not None:
        write_preprocessing_record(run_dir, prep, note=f"from {Path(solver.net).name}'s TEST "
                                   "Data layer (mean) and LMDB (image size)")
    summary.update(net=name, max_iter=solver.max_iter, command=cmd)
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _die_with_parent():
    """In the child before exec: SIGTERM when train.py dies (Linux), so a
    killed train.py (kill -9, a timeout) leaves no caffe training on."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_and_watch(cmd, env, log_path, max_iter, log):
    start = time.monotonic()
    first_iter = None
    last = {"iter": 0, "loss": None}
    tests = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1, cwd=PROJECT_ROOT,
                            preexec_fn=_die_with_parent)
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


# ---- the preprocessing a run's model was trained with ------------------------------

def train_val_preprocessing(train_val, crop):
    """model.Preprocessing of a train_val's TEST-phase Data layer: its mean
    (mean_value, or the per-channel mean of its mean_file) and, for resize,
    the size of the images its LMDB holds (the first record's)."""
    from ..nets.model import Preprocessing, default_resize, load_mean_bgr
    net = read_prototxt(train_val, "NetParameter")
    pb = caffe_pb2()
    data = [layer for layer in net.layer if layer.type == "Data"]
    test = [layer for layer in data
            if any(rule.phase == pb.TEST for rule in layer.include)] or data
    if not test:
        return None
    transform = test[0].transform_param
    if transform.mean_value:
        values = list(transform.mean_value)
        mean = tuple(values * 3 if len(values) == 1 else values)
    elif transform.mean_file:
        mean = load_mean_bgr(_project_path(transform.mean_file))
    else:
        mean = (0.0, 0.0, 0.0)
    resize = _lmdb_image_size(_project_path(test[0].data_param.source)) or default_resize(crop)
    return Preprocessing(resize=int(resize), crop=int(crop), mean_bgr=tuple(mean))


def _project_path(path):
    return Path(path) if os.path.isabs(path) else PROJECT_ROOT / path


def _lmdb_image_size(source):
    """The height of the first Datum in an LMDB (None when unreadable)."""
    try:
        import lmdb
        env = lmdb.open(str(source), readonly=True, lock=False, subdir=True)
    except Exception:  # noqa: BLE001  (no LMDB there: the caller falls back)
        return None
    try:
        with env.begin() as txn:
            for _key, value in txn.cursor():
                datum = caffe_pb2().Datum()
                datum.ParseFromString(value)
                return datum.height
    finally:
        env.close()
    return None


def deploy_input_size(deploy):
    """The side of a deploy net's square input (its Input layer's shape)."""
    net = read_prototxt(deploy, "NetParameter")
    for layer in net.layer:
        if layer.type == "Input":
            return int(layer.input_param.shape[0].dim[-1])
    if net.input_shape:
        return int(net.input_shape[0].dim[-1])
    raise UserError(f"{deploy} has no Input layer: not a deploy net")


# ---- training on a collection ------------------------------------------------------------

# Layer names the run prototxts change (prototxt/generate.py names them).
CLASSIFIER_LAYER = "fc9_classifier"
# Default split of the CPU recipe: everything below block 14's output (blob
# b14, stride 32: 192 channels) is frozen and cached; block 15, the head,
# fc7, the latent layer and the classifier are fine-tuned. Splitting lower
# (b10) made the trained part 3-4x slower per image on the 2-core machine
# (forward + backward), more than its cached features saved (docs/benchmarks.md).
DEFAULT_SPLIT = "b14"
SMALL_NET = "cifar"


def collection_name(source):
    """A run-name suffix from a folder or list file name."""
    stem = Path(os.path.abspath(source)).name
    stem = Path(stem).stem if Path(source).is_file() else stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "collection"


def set_num_classes(net, num_classes):
    """The classifier's num_output in a NetParameter."""
    found = [layer for layer in net.layer if layer.name == CLASSIFIER_LAYER]
    if not found:
        raise UserError(f"{net.name} has no layer {CLASSIFIER_LAYER} to size for the classes")
    found[0].inner_product_param.num_output = int(num_classes)
    return net


def set_input(net, size, batch):
    """The Input layer's shape (batch, 3, size, size) in a deploy NetParameter."""
    for layer in net.layer:
        if layer.type == "Input":
            del layer.input_param.shape[0].dim[:]
            layer.input_param.shape[0].dim.extend([batch, 3, size, size])
            return net
    raise UserError(f"{net.name} has no Input layer")


def write_net(net, path, header):
    from google.protobuf import text_format
    Path(path).write_text("".join(f"# {line}\n" for line in header.splitlines())
                          + text_format.MessageToString(net))
    return Path(path)


def run_solver(template, net_path, run_dir, name, max_iter, test_iter, gpu, test_interval=None,
               base_lr=None, snapshot=None):
    """solver.prototxt in the run folder from a checked-in solver: its net,
    schedule, snapshots and device set for this run."""
    from google.protobuf import text_format
    solver = read_prototxt(template, "SolverParameter")
    solver.net = str(net_path)
    solver.max_iter = int(max_iter)
    solver.test_iter[:] = [int(test_iter)]
    solver.test_interval = int(test_interval or max_iter)
    solver.snapshot = int(snapshot or max_iter)
    solver.display = max(1, min(solver.display, max_iter // 20))
    if base_lr:
        solver.base_lr = float(base_lr)
    modes = caffe_pb2().SolverParameter
    solver.solver_mode = modes.GPU if gpu is not None else modes.CPU
    (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    solver.snapshot_prefix = str(run_dir / "snapshots" / name)
    out = run_dir / "solver.prototxt"
    out.write_text(f"# derived from {Path(template).name} by python/train.py --data\n"
                   + text_format.MessageToString(solver))
    return out, solver


def train_collection(data, net="efficientnet_lite0", bits=48, test=None, root=None,
                     runs_dir=None, name=None, size=None, resize=None, split=DEFAULT_SPLIT,
                     epochs=None, max_iter=None, batch_size=None, base_lr=None, flips=True,
                     gpu=None, workers=2, cache_dir=None, test_fraction=0.1, seed=1,
                     log=sys.stderr):
    """Train <net>_hash<bits> on a user's collection (folder of class
    subfolders, or `path label` list), everything in runs_dir/<name>/:
    lists and class names, run prototxts (classifier sized to the classes),
    data (cached frozen features for a backbone on the CPU; image LMDBs and
    mean for the small net or with a GPU), `caffe train`, the final weights
    and their preprocessing record. Returns the summary (train_summary.json)
    with the commands that extract, retrieve and evaluate with the model."""
    from ..nets.backbones import backbone_names
    from ..datasets.collection import load_collection, write_run_lists
    coll = load_collection(data, test, root=root, test_fraction=test_fraction, seed=seed)
    for note in coll.notes:
        print(note, file=log)
    name = name or f"{run_name(net, bits)}_{collection_name(data)}"
    run_dir = Path(os.path.abspath(Path(runs_dir or PROJECT_ROOT / "runs") / name))
    run_dir.mkdir(parents=True, exist_ok=True)
    train_list, test_list, _ = write_run_lists(run_dir, coll)
    print(f"{len(coll.classes)} classes ({', '.join(coll.classes[:8])}"
          f"{', ...' if len(coll.classes) > 8 else ''}), {len(coll.train)} training and "
          f"{len(coll.test)} test images -> {run_dir}", file=log)
    if net in backbone_names():
        recipe = _BackboneRecipe(net, bits, coll, run_dir, name, size, resize, split, flips,
                                 gpu, workers, cache_dir, seed, log)
    elif net == SMALL_NET:
        recipe = _SmallNetRecipe(net, bits, coll, run_dir, name, gpu, cache_dir, seed, log)
    else:
        raise UserError(f"--data trains a backbone ({', '.join(backbone_names())}) or the small "
                        f"net ({SMALL_NET}); {net!r} needs weights that cannot be fetched here")
    started = time.monotonic()
    data_seconds = recipe.prepare_data()
    solver_file, solver = recipe.write_prototxts(epochs, max_iter, batch_size, base_lr)
    cmd, summary = run_caffe_train(solver_file, solver.max_iter, run_dir,
                                   recipe.weights_args(), gpu, log)
    snapshot = run_dir / "snapshots" / f"{name}_iter_{solver.max_iter}.caffemodel"
    weights = recipe.final_weights(snapshot)
    from ..nets.model import write_preprocessing_record
    write_preprocessing_record(run_dir, recipe.prep, note=recipe.prep_note)
    commands = usage_commands(run_dir, weights, train_list, test_list)
    summary.update(net=name, max_iter=solver.max_iter, command=cmd, weights=str(weights),
                   deploy=str(run_dir / "deploy.prototxt"), classes=coll.classes,
                   train_images=len(coll.train), test_images=len(coll.test),
                   data_seconds=round(data_seconds, 1), train_seconds=summary["seconds"],
                   total_seconds=round(time.monotonic() - started, 1),
                   recipe=recipe.describe(), commands=commands)
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nTrained. Build the database, search it and measure it with:\n  "
          + "\n  ".join(commands), file=log)
    return summary


def usage_commands(run_dir, weights, train_list, test_list):
    """The extract / retrieve / evaluate commands for a trained run (the
    preprocessing comes from the run folder's record: no --mean)."""
    rel = lambda p: os.path.relpath(p, os.getcwd()) if str(p).startswith(os.getcwd()) else str(p)
    deploy = rel(run_dir / "deploy.prototxt")
    db_train, db_test = rel(run_dir / "db_train.lmdb"), rel(run_dir / "db_test.lmdb")
    return [
        f"python python/extract.py {rel(train_list)} --deploy {deploy} --weights {rel(weights)} "
        f"--out {db_train}",
        f"python python/extract.py {rel(test_list)} --deploy {deploy} --weights {rel(weights)} "
        f"--out {db_test}",
        f"python python/retrieve.py QUERY.jpg --db {db_train} --montage results.png",
        f"python python/evaluate.py --database {db_train} --queries {db_test} --k 1000 "
        f"--out-dir {rel(run_dir / 'evaluation')}",
    ]


class _BackboneRecipe:
    """An ImageNet backbone fine-tuned on the collection. CPU: the layers
    below `split` frozen and cached (with mirror images), the rest trained
    on the cache. GPU (or split "none"): the whole net trained on image
    LMDBs, random crops and mirroring."""

    def __init__(self, net, bits, coll, run_dir, name, size, resize, split, flips, gpu,
                 workers, cache_dir, seed, log):
        from ..nets.backbones import convert, mean_bgr, read_spec
        from ..nets.model import Preprocessing
        self.net, self.bits, self.coll, self.run_dir, self.name = net, bits, coll, run_dir, name
        self.gpu, self.workers, self.seed, self.log, self.flips = gpu, workers, seed, log, flips
        # nothing frozen: with a GPU, or asked for (--split none)
        self.split = None if gpu is not None or split in (None, "none") else split
        spec = read_spec(net)
        # convert() returns only a file with the readme's pinned sha1.
        self.backbone, self.backbone_sha1 = convert(net, log=log), spec["sha1"]
        template_deploy = PROTOTXT_DIR / f"{run_name(net, bits)}_deploy.prototxt"
        if not template_deploy.exists():
            raise UserError(f"no {template_deploy.name}: {net} comes with "
                            f"{', '.join(p.name for p in PROTOTXT_DIR.glob(net + '_hash*_deploy*'))}")
        size = int(size or deploy_input_size(template_deploy))
        if size % 32:
            raise UserError(f"--size {size}: the backbone takes sides that are multiples of 32 "
                            "(its SAME padding is exact on even sizes at every stride-2 layer)")
        resize = int(resize or round(size * 8 / 7))
        if resize < size:
            raise UserError(f"--resize {resize} is smaller than --size {size}")
        self.prep = Preprocessing(resize=resize, crop=size, mean_bgr=mean_bgr(spec))
        self.prep_note = (f"{net} input: squash-resize {resize}, centre crop {size}, BGR minus "
                          "the ImageNet model's mean")
        self.template_deploy = template_deploy
        self.template_train_val = PROTOTXT_DIR / f"{run_name(net, bits)}_train_val.prototxt"
        self.template_solver = PROTOTXT_DIR / f"{run_name(net, bits)}_solver.prototxt"
        self.cache_root = Path(cache_dir or PROJECT_ROOT / "data" / "features")
        self.deploy = write_net(
            set_num_classes(set_input(read_prototxt(template_deploy), size, 10),
                            coll.num_classes),
            run_dir / "deploy.prototxt",
            f"{self.name}: {template_deploy.name} with {coll.num_classes} classes and "
            f"{size}x{size} input (python/train.py --data)")

    def prepare_data(self):
        started = time.monotonic()
        if self.split is None:
            self._image_lmdbs()
        else:
            self._cached_features()
        return time.monotonic() - started

    def _cached_features(self):
        from .frozen import COMPLETE_FILE, cache_features, cache_key, fold_batchnorm, \
            frozen_net, net_params, net_with_params
        key = cache_key(self.backbone_sha1, self.split, self.prep, self.flips,
                        self.coll.train + self.coll.test)
        folder = self.cache_root / f"{self.net}_{self.split}_{self.prep.crop}_{key}"
        folder.mkdir(parents=True, exist_ok=True)
        if all((folder / part / COMPLETE_FILE).exists() for part in ("train_lmdb", "test_lmdb")):
            # Both caches are complete (a run with other bits, a rerun):
            # cache_features only reads their summaries, no frozen net needed.
            prototxt = weights = None
        else:
            net = frozen_net(self.deploy, self.split)
            set_input(net, self.prep.crop, 25)
            folded, folded_params = fold_batchnorm(net, net_params(self.deploy, self.backbone))
            prototxt, weights = net_with_params(folded, folded_params, folder, "frozen")
        print(f"features below {self.split} (frozen, BatchNorm folded) -> {folder}",
              file=self.log)
        self.train_summary = cache_features(
            self.coll.train, prototxt, weights, self.prep, folder / "train_lmdb",
            flips=self.flips, seed=self.seed, workers=self.workers, log=self.log,
            label="features (train" + (" + mirror)" if self.flips else ")"))
        self.test_summary = cache_features(
            self.coll.test, prototxt, weights, self.prep, folder / "test_lmdb", flips=False,
            seed=self.seed, workers=self.workers, log=self.log, label="features (test)")
        self.sources = (folder / "train_lmdb", folder / "test_lmdb")
        self.records = self.train_summary["records"]
        self.test_records = self.test_summary["records"]

    def _image_lmdbs(self):
        from ..datasets.datum import convert_imageset
        folder = self.run_dir / "data"
        folder.mkdir(exist_ok=True)
        train = convert_imageset(self.coll.train, folder / "train_lmdb", self.prep.resize,
                                 shuffle_seed=self.seed, overwrite=True, stream=self.log)
        test = convert_imageset(self.coll.test, folder / "test_lmdb", self.prep.resize,
                                overwrite=True, stream=self.log)
        self.sources = (train.path, test.path)
        self.records, self.test_records = train.written, test.written

    def write_prototxts(self, epochs, max_iter, batch_size, base_lr):
        from .frozen import top_net
        train_val = set_num_classes(read_prototxt(self.template_train_val), self.coll.num_classes)
        batch = int(batch_size or 32)
        test_batch = min(50, self.test_records)
        if self.split is not None:
            net = top_net(train_val, self.split, self.sources[0], self.sources[1], batch,
                          test_batch)
            how = (f"layers above {self.split} on cached features of {self.prep.crop}x"
                   f"{self.prep.crop} inputs" + (" and their mirror images" if self.flips else ""))
        else:
            net = set_data_layers(train_val, self.sources, (batch, test_batch),
                                  self.prep.mean_bgr, crop=self.prep.crop)
            how = f"the whole net on {self.prep.resize}px image LMDBs, {self.prep.crop} crops"
        path = write_net(net, self.run_dir / "train_val.prototxt",
                         f"{self.name}: {self.template_train_val.name}, {how}, "
                         f"{self.coll.num_classes} classes (python/train.py --data)")
        max_iter = schedule(self.records, batch, epochs, max_iter)
        return run_solver(self.template_solver, path, self.run_dir, self.name, max_iter,
                          -(-self.test_records // test_batch), self.gpu, base_lr=base_lr)

    def weights_args(self):
        return ["-weights", str(self.backbone)]

    def final_weights(self, snapshot):
        from .frozen import merge_weights
        out = self.run_dir / f"{self.name}.caffemodel"
        out.unlink(missing_ok=True)
        return merge_weights(self.deploy, [self.backbone, snapshot], out)

    def describe(self):
        return {"backbone": self.net, "split": self.split, "flips": self.flips,
                "preprocessing": self.prep.as_dict(),
                "features": getattr(self, "train_summary", None)}


class _SmallNetRecipe:
    """The small net from scratch: 32x32 LMDBs (training images padded by 4
    for the random crops), the collection's own mean."""

    def __init__(self, net, bits, coll, run_dir, name, gpu, cache_dir, seed, log):
        from ..nets.model import Preprocessing
        self.net, self.bits, self.coll, self.run_dir, self.name = net, bits, coll, run_dir, name
        self.gpu, self.seed, self.log = gpu, seed, log
        self.size = 32
        self.template_deploy = PROTOTXT_DIR / f"{run_name(net, bits)}_deploy.prototxt"
        self.deploy = write_net(
            set_num_classes(read_prototxt(self.template_deploy), coll.num_classes),
            run_dir / "deploy.prototxt",
            f"{name}: {self.template_deploy.name} with {coll.num_classes} classes")
        self.Preprocessing = Preprocessing
        self.prep_note = "small net: squash-resize 32, the collection's per-channel mean"

    def prepare_data(self):
        from ..datasets.datum import compute_mean, convert_imageset, pad_imageset
        started = time.monotonic()
        folder = self.run_dir / "data"
        folder.mkdir(exist_ok=True)
        train = convert_imageset(self.coll.train, folder / "train_32_lmdb", self.size,
                                 shuffle_seed=self.seed, overwrite=True, stream=self.log)
        test = convert_imageset(self.coll.test, folder / "test_32_lmdb", self.size,
                                overwrite=True, stream=self.log)
        mean = compute_mean(train.path, None, folder / "train_32_mean.npy", stream=self.log)
        pad_imageset(train.path, folder / "train_32pad4_lmdb", 4, overwrite=True)
        self.prep = self.Preprocessing(resize=self.size, crop=self.size,
                                       mean_bgr=tuple(float(m) for m in mean.channel_mean))
        self.sources = (folder / "train_32pad4_lmdb", test.path)
        self.records, self.test_records = train.written, test.written
        return time.monotonic() - started

    def write_prototxts(self, epochs, max_iter, batch_size, base_lr):
        template = PROTOTXT_DIR / f"{run_name(self.net, self.bits)}_train_val.prototxt"
        net = set_num_classes(read_prototxt(template), self.coll.num_classes)
        batch = int(batch_size or 100)
        test_batch = min(100, self.test_records)
        set_data_layers(net, self.sources, (batch, test_batch), self.prep.mean_bgr)
        path = write_net(net, self.run_dir / "train_val.prototxt",
                         f"{self.name}: {template.name} on the collection's LMDBs, its mean, "
                         f"{self.coll.num_classes} classes (python/train.py --data)")
        max_iter = schedule(self.records, batch, epochs, max_iter)
        return run_solver(solver_path(self.net, self.bits), path, self.run_dir, self.name,
                          max_iter, -(-self.test_records // test_batch), self.gpu,
                          base_lr=base_lr)

    def weights_args(self):
        return []

    def final_weights(self, snapshot):
        return link_final_weights(self.run_dir, self.name, snapshot)

    def describe(self):
        return {"net": self.net, "preprocessing": self.prep.as_dict()}


DEFAULT_EPOCHS = 10


def schedule(records, batch, epochs=None, max_iter=None):
    """max_iter: given, or `epochs` passes over the training records."""
    if max_iter:
        return int(max_iter)
    return max(1, round((epochs or DEFAULT_EPOCHS) * records / batch))
