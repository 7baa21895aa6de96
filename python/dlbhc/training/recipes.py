"""`make train`: the project's training recipes, each a recipe.Recipe.

    CheckedInRecipe   a checked-in CIFAR-10 net (prototxt/<net>_hash<bits>_*)
                      as it is: `train()`, train.py without --data
    SmallNetRecipe    the small net from scratch on a user's collection
    BackboneRecipe    an ImageNet backbone fine-tuned on a user's collection
                      (`train_collection()`, train.py --data)

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

A collection's run folder (runs/<net>_hash<bits>_<collection>/) holds its
lists and class names, run prototxts (classifier sized to the classes), the
data (cached frozen features for a backbone on the CPU; image LMDBs and mean
for the small net or with a GPU), the final weights and their preprocessing
record.
"""
import os
import re
import shutil
import time
from pathlib import Path

from ..datasets.collection import (DEFAULT_TEST_FRACTION, has_labels, load_collection,
                                   write_run_lists)
from ..datasets.datum import compute_mean, convert_imageset, pad_imageset
from ..errors import UserError
from ..nets.backbones import DEFAULT_BACKBONE, backbone_names, convert, mean_bgr, read_spec
from ..nets.caffe_env import PROJECT_ROOT
from ..nets.model import Preprocessing
from ..nets.protos import read_prototxt
from ..nets.records import CLASSES_FILE, read_class_names
from ..report import get_logger
from . import frozen
from .fast import FAST_NET, train_fast
from .caffe_train import latest_solverstate, link_final_weights
from .prototxt import (PROTOTXT_DIR, Phases, data_files, deploy_input_size, move_data_files,
                       project_path, set_data_layers, set_input, set_num_classes, write_net)
from .recipe import Recipe, run_folder, train_val_preprocessing
from .solver import run_name, schedule, solver_path, write_solver

log = get_logger(__name__)

# Default split of the CPU recipe: everything below block 14's output (blob
# b14, stride 32: 192 channels) is frozen and cached; block 15, the head,
# fc7, the latent layer and the classifier are fine-tuned. Splitting lower
# (b10) made the trained part 3-4x slower per image on the 2-core machine
# (forward + backward), more than its cached features saved (docs/benchmarks.md).
DEFAULT_SPLIT = "b14"
SMALL_NET = "cifar"


# ---- the checked-in CIFAR-10 nets --------------------------------------------------

def check_data(train_val, data_dir=None):
    """Refuse early when the LMDBs or mean files the net reads are missing
    (`data_dir`: the --data-dir they were moved to, for the message)."""
    for path in data_files(read_prototxt(train_val, "NetParameter")):
        if not project_path(path).exists():
            hint = (f"--data-dir {data_dir} must hold the files the checked-in "
                    "train_val reads, under the same names" if data_dir is not None else
                    "run `make data` (small net) or `make data-alexnet` (AlexNet) first")
            raise UserError(f"{train_val.name} reads {path}, which does not exist: {hint}")


def derived_train_val(train_val, run_dir, data_dir):
    """Write run_dir/train_val.prototxt: `train_val` with every Data layer's
    `source` and `mean_file` moved to the same file name under `data_dir`.
    Returns its path."""
    net = move_data_files(read_prototxt(train_val, "NetParameter"), data_dir)
    return write_net(net, run_dir / "train_val.prototxt",
                     f"{train_val.name} reading its data from {os.path.abspath(data_dir)} "
                     "(python/train.py --data-dir)")


def derived_solver(net, bits, run_dir, max_iter=None, gpu=None, data_dir=None):
    """Write runs/<name>/solver.prototxt and return (path, SolverParameter).

    With `data_dir`, also runs/<name>/train_val.prototxt reading its data
    from there (derived_train_val), and the solver's net is that copy."""
    run_dir = Path(os.path.abspath(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    template = solver_path(net, bits)
    train_val = project_path(read_prototxt(template, "SolverParameter").net)
    if data_dir is not None:
        train_val = derived_train_val(train_val, run_dir, data_dir)
    check_data(train_val, data_dir)
    return write_solver(template, run_dir, run_name(net, bits), gpu=gpu, net=train_val,
                        max_iter=max_iter)


class CheckedInRecipe(Recipe):
    """A checked-in net and solver, as they are (see the module docstring):
    from -weights (AlexNet: ImageNet's), a solver state (resume) or scratch."""

    def __init__(self, net, bits, weights=None, max_iter=None, gpu=None, resume=None,
                 runs_dir=None, data_dir=None):
        self.net, self.bits, self.weights, self.max_iter = net, bits, weights, max_iter
        self.gpu, self.resume, self.data_dir = gpu, resume, data_dir
        self.name = run_name(net, bits)
        self.run_dir = run_folder(runs_dir, self.name)
        self.prep_note = None

    def prepare_data(self):
        return None     # made by `make data`; checked by derived_solver

    def write_prototxts(self):
        return derived_solver(self.net, self.bits, self.run_dir, self.max_iter, self.gpu,
                              self.data_dir)

    def weights_args(self):
        # caffe runs in the project root: paths the user gave are made
        # absolute here, where they were meant relative to the caller's folder.
        if self.resume:
            state = (latest_solverstate(self.run_dir) if self.resume == "auto"
                     else Path(os.path.abspath(self.resume)))
            if state is None or not Path(state).exists():
                raise UserError(f"nothing to resume from in {self.run_dir / 'snapshots'}"
                                if self.resume == "auto"
                                else f"solver state {self.resume} does not exist")
            return ["-snapshot", str(state)]
        if self.weights:
            if not Path(self.weights).exists():
                raise UserError(f"weights {self.weights} do not exist (for bvlc_alexnet: "
                                "`make weights`)")
            return ["-weights", os.path.abspath(self.weights)]
        return []

    def failed_hint(self):
        return ("; resume with `make train ... RESUME=auto`"
                if latest_solverstate(self.run_dir) else "")

    def final_weights(self, snapshot):
        return link_final_weights(self.run_dir, self.name, snapshot) if snapshot.exists() else None

    def held_out(self):
        """CIFAR-10's test list (and its class names, copied into the run
        folder), when the data folder has them, and its training list."""
        folder = cifar_folder(self.data_dir)
        test_list, train_list = folder / "test.txt", folder / "train.txt"
        if not test_list.is_file():
            return None
        copy_class_names(folder, self.run_dir)
        return PROTOTXT_DIR / f"{self.name}_deploy.prototxt", test_list, train_list

    def preprocessing(self, solver):
        # the model's preprocessing, so extract.py and retrieve.py need no --mean
        self.prep_note = (f"from {Path(solver.net).name}'s TEST Data layer (mean) and LMDB "
                          "(image size)")
        return train_val_preprocessing(solver.net, deploy_input_size(
            PROTOTXT_DIR / f"{self.name}_deploy.prototxt"))


def cifar_folder(data_dir=None):
    """The CIFAR-10 folder the checked-in nets and the fast recipe read:
    `make data`'s data/cifar10, or --data-dir."""
    return Path(data_dir) if data_dir else PROJECT_ROOT / "data" / "cifar10"


def copy_class_names(folder, run_dir):
    """folder's classes.txt (the answers' class names) into the run folder."""
    if (Path(folder) / CLASSES_FILE).is_file():
        shutil.copyfile(Path(folder) / CLASSES_FILE, Path(run_dir) / CLASSES_FILE)


def train(net="cifar", bits=48, weights=None, max_iter=None, gpu=None, resume=None,
          runs_dir=None, data_dir=None, epochs=None):
    """Run `caffe train` for <net>_hash<bits> in runs_dir/<net>_hash<bits>/
    (default runs/), data from data_dir when given (module docstring); returns
    the summary (train_summary.json). The fast net (FAST_NET) trains with its
    own recipe (fast.py) on CIFAR-10's image lists in data_dir (data/cifar10)."""
    if net == FAST_NET:
        return train_fast_cifar(bits, max_iter, resume, runs_dir, data_dir, epochs, gpu)
    return CheckedInRecipe(net, bits, weights, max_iter, gpu, resume, runs_dir,
                           data_dir).run()


def train_fast_cifar(bits, max_iter=None, resume=None, runs_dir=None, data_dir=None,
                     epochs=None, gpu=None):
    """The fast recipe on CIFAR-10 (`make data`'s train.txt and test.txt)."""
    if gpu is not None:
        raise UserError("the fast recipe trains on the CPU (pycaffe steps the net): leave out --gpu")
    folder = cifar_folder(data_dir)
    lists = [folder / "train.txt", folder / "test.txt"]
    missing = [str(path) for path in lists if not path.exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} missing: run `make data` first (CIFAR-10's "
                        "image folders and lists)")
    coll = load_collection(*lists)
    name = run_name(FAST_NET, bits)
    run_dir = run_folder(runs_dir, name)
    copy_class_names(folder, run_dir)
    classes = read_class_names(run_dir) or coll.classes
    commands = usage_commands(run_dir, run_dir / f"{name}.caffemodel", *lists)
    return train_fast(coll.train, coll.test, classes, bits, run_dir, name, epochs=epochs,
                      max_iter=max_iter, resume=resume, commands=commands, held_out=lists[1],
                      database=lists[0])


# ---- a user's own collection -------------------------------------------------------

def collection_name(source):
    """A run-name suffix from a folder or list file name."""
    stem = Path(os.path.abspath(source)).name
    stem = Path(stem).stem if Path(source).is_file() else stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "collection"


class CollectionRecipe(Recipe):
    """What both collection recipes share: the collection, the run folder,
    the schedule options and the summary."""

    def __init__(self, net, bits, coll, run_dir, name, gpu, seed, epochs=None, max_iter=None,
                 batch_size=None, base_lr=None):
        self.net, self.bits, self.coll, self.run_dir, self.name = net, bits, coll, run_dir, name
        self.gpu, self.seed = gpu, seed
        self.epochs, self.max_iter, self.batch_size, self.base_lr = \
            epochs, max_iter, batch_size, base_lr
        self.template_deploy = PROTOTXT_DIR / f"{run_name(net, bits)}_deploy.prototxt"
        self.template_train_val = PROTOTXT_DIR / f"{run_name(net, bits)}_train_val.prototxt"

    def write_run_solver(self, train_val, batch, test_batch):
        """The run's solver for `train_val`: epochs (or max_iter) over the
        training records, the whole test set tested at the end."""
        return write_solver(solver_path(self.net, self.bits), self.run_dir, self.name,
                            gpu=self.gpu, net=train_val,
                            max_iter=schedule(self.records, batch, self.epochs, self.max_iter),
                            test_iter=-(-self.test_records // test_batch),
                            base_lr=self.base_lr, note="python/train.py --data")

    def preprocessing(self, solver):
        return self.prep

    def held_out(self):
        return self.deploy, self.run_dir / "test.txt", self.run_dir / "train.txt"

    def summary_extra(self):
        train_list, test_list = self.run_dir / "train.txt", self.run_dir / "test.txt"
        return dict(deploy=str(self.run_dir / "deploy.prototxt"), classes=self.coll.classes,
                    train_images=len(self.coll.train), test_images=len(self.coll.test),
                    recipe=self.describe(),
                    commands=usage_commands(self.run_dir, self.final, train_list, test_list))


class BackboneRecipe(CollectionRecipe):
    """An ImageNet backbone fine-tuned on the collection. CPU: the layers
    below `split` frozen and cached (with mirror images), the rest trained
    on the cache. GPU (or split "none"): the whole net trained on image
    LMDBs, random crops and mirroring."""
    head_fit_sample = 10000    # the closing refit: 39 img/s at 96 px, so not all (headfit.py)
    def __init__(self, net, bits, coll, run_dir, name, gpu, seed, size=None, resize=None,
                 split=DEFAULT_SPLIT, flips=True, workers=frozen.FEATURE_WORKERS,
                 cache_dir=None, **schedule_options):
        super().__init__(net, bits, coll, run_dir, name, gpu, seed, **schedule_options)
        self.workers, self.flips = workers, flips
        # nothing frozen: with a GPU, or asked for (--split none)
        self.split = None if gpu is not None or split in (None, "none") else split
        spec = read_spec(net)
        # convert() returns only a file with the readme's pinned sha1.
        self.backbone, self.backbone_sha1 = convert(net), spec["sha1"]
        if not self.template_deploy.exists():
            raise UserError(f"no {self.template_deploy.name}: {net} comes with "
                            f"{', '.join(p.name for p in PROTOTXT_DIR.glob(net + '_hash*_deploy*'))}")
        size = int(size or deploy_input_size(self.template_deploy))
        if size % 32:
            raise UserError(f"--size {size}: the backbone takes sides that are multiples of 32 "
                            "(its SAME padding is exact on even sizes at every stride-2 layer)")
        resize = int(resize or round(size * 8 / 7))
        if resize < size:
            raise UserError(f"--resize {resize} is smaller than --size {size}")
        self.prep = Preprocessing(resize=resize, crop=size, mean_bgr=mean_bgr(spec))
        self.prep_note = (f"{net} input: squash-resize {resize}, centre crop {size}, BGR minus "
                          "the ImageNet model's mean")
        self.cache_root = Path(cache_dir or PROJECT_ROOT / "data" / "features")
        self.deploy = write_net(
            set_num_classes(set_input(read_prototxt(self.template_deploy), size, 10),
                            coll.num_classes),
            run_dir / "deploy.prototxt",
            f"{self.name}: {self.template_deploy.name} with {coll.num_classes} classes and "
            f"{size}x{size} input (python/train.py --data)")

    def prepare_data(self):
        started = time.monotonic()
        if self.split is None:
            self._image_lmdbs()
        else:
            self._cached_features()
        return time.monotonic() - started

    def _cached_features(self):
        key = frozen.cache_key(self.backbone_sha1, self.split, self.prep, self.flips,
                               self.coll.train + self.coll.test)
        folder = self.cache_root / f"{self.net}_{self.split}_{self.prep.crop}_{key}"
        folder.mkdir(parents=True, exist_ok=True)
        if all((folder / part / frozen.COMPLETE_FILE).exists()
               for part in ("train_lmdb", "test_lmdb")):
            # Both caches are complete (a run with other bits, a rerun):
            # cache_features only reads their summaries, no frozen net needed.
            prototxt = weights = None
        else:
            net = frozen.frozen_net(self.deploy, self.split)
            set_input(net, self.prep.crop, 25)
            folded, folded_params = frozen.fold_batchnorm(
                net, frozen.net_params(self.deploy, self.backbone))
            prototxt, weights = frozen.net_with_params(folded, folded_params, folder, "frozen")
        log.info("features below %s (frozen, BatchNorm folded) -> %s", self.split, folder)
        self.train_summary = frozen.cache_features(
            self.coll.train, prototxt, weights, self.prep, folder / "train_lmdb",
            flips=self.flips, seed=self.seed, workers=self.workers,
            label="features (train" + (" + mirror)" if self.flips else ")"))
        self.test_summary = frozen.cache_features(
            self.coll.test, prototxt, weights, self.prep, folder / "test_lmdb", flips=False,
            seed=self.seed, workers=self.workers, label="features (test)")
        self.sources = (folder / "train_lmdb", folder / "test_lmdb")
        self.records = self.train_summary["records"]
        self.test_records = self.test_summary["records"]

    def _image_lmdbs(self):
        folder = self.run_dir / "data"
        folder.mkdir(exist_ok=True)
        train = convert_imageset(self.coll.train, folder / "train_lmdb", self.prep.resize,
                                 shuffle_seed=self.seed, overwrite=True)
        test = convert_imageset(self.coll.test, folder / "test_lmdb", self.prep.resize,
                                overwrite=True)
        self.sources = (train.path, test.path)
        self.records, self.test_records = train.written, test.written

    def write_prototxts(self):
        train_val = set_num_classes(read_prototxt(self.template_train_val), self.coll.num_classes)
        batch = int(self.batch_size or 32)
        test_batch = min(50, self.test_records)
        if self.split is not None:
            net = frozen.top_net(train_val, self.split, self.sources[0], self.sources[1], batch,
                                 test_batch)
            how = (f"layers above {self.split} on cached features of {self.prep.crop}x"
                   f"{self.prep.crop} inputs" + (" and their mirror images" if self.flips else ""))
        else:
            net = set_data_layers(train_val, source=Phases(*self.sources),
                                  batch_size=Phases(batch, test_batch),
                                  mean_value=self.prep.mean_bgr, crop_size=self.prep.crop,
                                  mirror=True)
            how = f"the whole net on {self.prep.resize}px image LMDBs, {self.prep.crop} crops"
        path = write_net(net, self.run_dir / "train_val.prototxt",
                         f"{self.name}: {self.template_train_val.name}, {how}, "
                         f"{self.coll.num_classes} classes (python/train.py --data)")
        return self.write_run_solver(path, batch, test_batch)

    def weights_args(self):
        return ["-weights", str(self.backbone)]

    def final_weights(self, snapshot):
        out = self.run_dir / f"{self.name}.caffemodel"
        out.unlink(missing_ok=True)
        self.final = frozen.merge_weights(self.deploy, [self.backbone, snapshot], out)
        return self.final

    def describe(self):
        return {"backbone": self.net, "split": self.split, "flips": self.flips,
                "preprocessing": self.prep.as_dict(),
                "features": getattr(self, "train_summary", None)}


class SmallNetRecipe(CollectionRecipe):
    """The small net from scratch: 32x32 LMDBs (training images padded by 4
    for the random crops), the collection's own mean."""

    size = 32

    def __init__(self, net, bits, coll, run_dir, name, gpu, seed, **schedule_options):
        super().__init__(net, bits, coll, run_dir, name, gpu, seed, **schedule_options)
        self.deploy = write_net(
            set_num_classes(read_prototxt(self.template_deploy), coll.num_classes),
            run_dir / "deploy.prototxt",
            f"{name}: {self.template_deploy.name} with {coll.num_classes} classes")
        self.prep_note = "small net: squash-resize 32, the collection's per-channel mean"

    def prepare_data(self):
        started = time.monotonic()
        folder = self.run_dir / "data"
        folder.mkdir(exist_ok=True)
        train = convert_imageset(self.coll.train, folder / "train_32_lmdb", self.size,
                                 shuffle_seed=self.seed, overwrite=True)
        test = convert_imageset(self.coll.test, folder / "test_32_lmdb", self.size,
                                overwrite=True)
        mean = compute_mean(train.path, None, folder / "train_32_mean.npy")
        pad_imageset(train.path, folder / "train_32pad4_lmdb", 4, overwrite=True)
        self.prep = Preprocessing(resize=self.size, crop=self.size,
                                  mean_bgr=tuple(float(m) for m in mean.channel_mean))
        self.sources = (folder / "train_32pad4_lmdb", test.path)
        self.records, self.test_records = train.written, test.written
        return time.monotonic() - started

    def write_prototxts(self):
        net = set_num_classes(read_prototxt(self.template_train_val), self.coll.num_classes)
        batch = int(self.batch_size or 100)
        test_batch = min(100, self.test_records)
        set_data_layers(net, source=Phases(*self.sources), batch_size=Phases(batch, test_batch),
                        mean_value=self.prep.mean_bgr)
        path = write_net(net, self.run_dir / "train_val.prototxt",
                         f"{self.name}: {self.template_train_val.name} on the collection's "
                         f"LMDBs, its mean, {self.coll.num_classes} classes "
                         "(python/train.py --data)")
        return self.write_run_solver(path, batch, test_batch)

    def final_weights(self, snapshot):
        self.final = link_final_weights(self.run_dir, self.name, snapshot)
        return self.final

    def describe(self):
        return {"net": self.net, "preprocessing": self.prep.as_dict()}


def train_collection(data, net=DEFAULT_BACKBONE, bits=48, test=None, root=None,
                     runs_dir=None, name=None, size=None, resize=None, split=DEFAULT_SPLIT,
                     epochs=None, max_iter=None, batch_size=None, base_lr=None, flips=True,
                     gpu=None, workers=frozen.FEATURE_WORKERS, cache_dir=None,
                     test_fraction=DEFAULT_TEST_FRACTION, seed=1, unsupervised=False):
    """Train <net>_hash<bits> on a user's collection (folder of class
    subfolders, or `path label` list), everything in runs_dir/<name>/ (see
    the module docstring). Returns the summary (train_summary.json) with the
    commands that extract, retrieve and evaluate with the model. A
    collection without labels, or `unsupervised`, gets ITQ codes instead
    (training.unsupervised)."""
    if unsupervised or not has_labels(data, root=root):
        from .unsupervised import train_unsupervised    # it builds on this module
        if net not in backbone_names():
            raise UserError(f"codes without labels come from a backbone's pooled features "
                            f"({', '.join(backbone_names())}), not {net!r}")
        if not unsupervised:
            log.info("%s has no class subfolders (no labels): building codes without labels "
                     "(ITQ on the backbone's pooled features)", data)
        if test is not None:
            log.info("--test is not used without labels (nothing is held out)")
        if gpu is not None:
            log.info("--gpu is not used without labels: the pooled features run on CPU workers")
        return train_unsupervised(data, net, bits, root=root, runs_dir=runs_dir, name=name,
                                  size=size, resize=resize, workers=workers, seed=seed)
    coll = load_collection(data, test, root=root, test_fraction=test_fraction, seed=seed)
    for note in coll.notes:
        log.info(note)
    name = name or f"{run_name(net, bits)}_{collection_name(data)}"
    run_dir = run_folder(runs_dir, name)
    write_run_lists(run_dir, coll)
    log.info("%d classes (%s%s), %d training and %d test images -> %s", len(coll.classes),
             ", ".join(coll.classes[:8]), ", ..." if len(coll.classes) > 8 else "",
             len(coll.train), len(coll.test), run_dir)
    schedule_options = dict(epochs=epochs, max_iter=max_iter, batch_size=batch_size,
                            base_lr=base_lr)
    if net in backbone_names():
        recipe = BackboneRecipe(net, bits, coll, run_dir, name, gpu, seed, size=size,
                                resize=resize, split=split, flips=flips, workers=workers,
                                cache_dir=cache_dir, **schedule_options)
    elif net == SMALL_NET:
        recipe = SmallNetRecipe(net, bits, coll, run_dir, name, gpu, seed, **schedule_options)
    elif net == FAST_NET:
        if gpu is not None:
            raise UserError("the fast recipe trains on the CPU: leave out --gpu")
        summary = train_fast(coll.train, coll.test, coll.classes, bits, run_dir, name,
                             commands=usage_commands(run_dir, run_dir / f"{name}.caffemodel",
                                                     run_dir / "train.txt",
                                                     run_dir / "test.txt"),
                             held_out=run_dir / "test.txt", database=run_dir / "train.txt",
                             **schedule_options)
        log.info("\nTrained. Build the database, search it and measure it with:\n  %s",
                 "\n  ".join(summary["commands"]))
        return summary
    else:
        raise UserError(f"--data trains a backbone ({', '.join(backbone_names())}), the small "
                        f"net ({SMALL_NET}) or the fast net ({FAST_NET}); {net!r} needs weights that cannot be fetched here")
    summary = recipe.run()
    log.info("\nTrained. Build the database, search it and measure it with:\n  %s",
             "\n  ".join(summary["commands"]))
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
        f"python python/evaluate.py --database {db_train} --queries {db_test} --top-k 1000 "
        f"--out-dir {rel(run_dir / 'evaluation')}",
    ]
