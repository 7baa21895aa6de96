"""The fast from-scratch recipe for small images (`--net fast`).

The net is prototxt/fast_hash<bits>_{train,deploy}.prototxt (airbench's
layout, see prototxt/generate.py). Caffe's solver lacks three things the
recipe needs, so pycaffe drives the training and sgd.py does the update:
a warm-up-then-decay learning rate, weight averaging, and batches augmented
in memory (augment.py: alternating flips, translation) instead of an LMDB
rewritten every epoch. Everything else is Caffe's: the layers, BatchNorm in
both phases, and label smoothing, which is InfogainLoss over the softmax
with H = (1 - eps) I + eps / K (smoothing_matrix), a stock layer.

A run (FastRecipe.run) in runs/<name>/:
    data/          the training and test images at 32x32, uint8 (a cache;
                   made once from the image lists, as extract.py prepares
                   images: squash-resize, RGB)
    train.prototxt, deploy.prototxt   the nets sized for the run's classes
    checkpoints/   the state after each epoch (weights, momentum, average),
                   so an interrupted run resumes at its last whole epoch
                   and ends with the same weights (the batches of every
                   epoch are seeded by (seed, epoch))
    <name>.caffemodel, preprocessing.json, train_summary.json,
    train_curve.csv (step, epoch, lr, loss, seconds)
"""
import csv
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..images import BadImage
from ..nets.caffe_env import import_caffe, set_blas_threads
from ..nets.model import BatchTransformer, ImagePreparer, Preprocessing, write_preprocessing_record
from ..nets.protos import read_prototxt
from ..progress import Progress
from ..report import get_logger
from .augment import AugmentedBatches
from .fast_schedule import FastSchedule, accuracy_key, choose_kept, choose_shift
from .prototxt import PROTOTXT_DIR, set_num_classes, write_net
from .recipe import SUMMARY_FILE, Recipe, closing_steps
from .sgd import NesterovSGD, WeightAverage, load_net_arrays, net_arrays, triangle_lr
from .whitening import whitening_filters, whitening_sample

log = get_logger(__name__)

FAST_NET = "fast"
FAST_SIZE = 32
CHECKPOINT_DIR = "checkpoints"
CURVE_FILE = "train_curve.csv"
TEST_CURVE_FILE = "test_curve.csv"
# the augmented batches BatchNorm's statistics are re-measured on: an
# epoch number of their own, past any schedule's
BATCHNORM_EPOCH = 1 << 20


def smoothing_matrix(num_classes, eps):
    """InfogainLoss's H for label smoothing: row y is the smoothed target of
    class y, (1 - eps) on y plus eps / K everywhere."""
    return ((1.0 - eps) * np.eye(num_classes) + eps / num_classes).astype(np.float32)


def smoothed_cross_entropy(probabilities, labels, eps):
    """The batch-mean smoothed loss, in numpy (the reference InfogainLoss is
    checked against)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = smoothing_matrix(probabilities.shape[1], eps)[np.asarray(labels, dtype=int)]
    return float(-(targets * np.log(probabilities)).sum(axis=1).mean())


# ---- images ----------------------------------------------------------------

def load_images(items, cache, label):
    """(uint8 (n, 32, 32, 3) RGB, int labels) for ImageItems, prepared as
    extract.py prepares them (squash-resize); cached in `cache` (.npz). An
    unreadable image is skipped with a warning (the run's summary counts it)."""
    cache = Path(cache)
    if cache.exists():
        with np.load(cache) as stored:
            return stored["images"], stored["labels"], int(stored["skipped"])
    prepare = ImagePreparer(Preprocessing(resize=FAST_SIZE, crop=FAST_SIZE, mean_bgr=(0, 0, 0)))
    images = np.empty((len(items), FAST_SIZE, FAST_SIZE, 3), dtype=np.uint8)
    labels, kept, skipped = [], 0, 0
    progress = Progress(len(items), label=label)
    for item in items:
        try:
            images[kept] = prepare(item.path)
        except BadImage as err:
            log.warning("skipped %s: %s", err.path, err.reason)
            skipped += 1
        else:
            labels.append(item.label)
            kept += 1
        progress.update()
    progress.close()
    images, labels = images[:kept], np.asarray(labels, dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, images=images, labels=labels, skipped=skipped)
    os.replace(partial, cache)
    return images, labels, skipped


def bgr_mean(images):
    """Per-channel mean of uint8 RGB images, as B, G, R (Caffe's order)."""
    return tuple(float(m) for m in images.reshape(-1, 3).mean(axis=0)[::-1])


# ---- the nets --------------------------------------------------------------

def run_nets(bits, num_classes, batch_size, run_dir, name):
    """The run's train and deploy prototxts: the checked-in ones with the
    classifier sized for the classes and the training batch size."""
    base = f"{FAST_NET}_hash{bits}"
    template_train = PROTOTXT_DIR / f"{base}_train.prototxt"
    if not template_train.exists():
        raise UserError(f"no {template_train.name}: the fast net comes in "
                        f"{', '.join(sorted(p.name for p in PROTOTXT_DIR.glob('fast_hash*_train*')))}")
    train = set_num_classes(read_prototxt(template_train, "NetParameter"), num_classes)
    for layer in train.layer:
        if layer.type == "Input":
            dims = layer.input_param.shape[0].dim
            if layer.name == "smoothing":
                dims[2] = dims[3] = num_classes
            else:
                dims[0] = batch_size
    deploy = set_num_classes(read_prototxt(PROTOTXT_DIR / f"{base}_deploy.prototxt",
                                           "NetParameter"), num_classes)
    header = f"{name}: {base} with {num_classes} classes (python/train.py --net fast)"
    return (write_net(train, run_dir / "train.prototxt", header),
            write_net(deploy, run_dir / "deploy.prototxt", header))


def copy_params(source, target):
    """Every parameter blob (BatchNorm statistics too) of `target` from the
    layer of the same name in `source`."""
    for name, blobs in target.params.items():
        for i, blob in enumerate(blobs):
            blob.data[...] = source.params[name][i].data


def remeasure_batchnorm(net, batches, feed):
    """BatchNorm's running statistics measured afresh for the net's current
    weights: zeroed, then `batches` TRAIN-phase forwards (Caffe accumulates
    them with the layer's moving_average_fraction)."""
    for name, layer in net.layer_dict.items():
        if layer.type == "BatchNorm":
            for blob in net.params[name]:
                blob.data[...] = 0
    for crops, labels in batches:
        feed(crops, labels)
        net.forward()


def classify(net, images, transform, views=None, batch_size=500):
    """Predicted classes of uint8 images with a TEST-phase deploy net;
    `views` (a Preprocessing's views: mirror, shifted images) averages the
    probabilities of each image's test-time views, as extraction averages
    their features."""
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        prob = 0
        for weight, view in (views(chunk) if views else [(1.0, chunk)]):
            data = net.blobs["data"]
            if data.data.shape[0] != len(view):
                data.reshape(len(view), *data.data.shape[1:])
                net.reshape()
            transform(np.ascontiguousarray(view), out=data.data)
            net.forward()
            prob = prob + weight * net.blobs["prob"].data.reshape(len(view), -1)
        predictions.append(np.argmax(prob, axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=int)


# ---- the recipe ------------------------------------------------------------

class FastRecipe(Recipe):
    """The fast net from scratch on image lists (train/test ImageItems with
    labels 0..K-1), everything in run_dir (see the module docstring)."""

    def __init__(self, bits, train_items, test_items, classes, run_dir, name,
                 schedule=FastSchedule(), resume=False, threads=None, commands=None,
                 held_out=None, database=None):
        self.bits, self.classes = int(bits), list(classes)
        self.train_items, self.test_items = list(train_items), list(test_items)
        self.run_dir, self.name = Path(run_dir), name
        self.schedule, self.resume, self.threads = schedule, resume, threads
        self.commands = commands or []
        self.held_out_list = held_out   # a `path label` list: the fine stage is chosen on it,
        self.database_list = database   # querying (a sample of) this one: the training images
        self.gpu, self.last_loss = None, float("nan")

    # data
    def prepare_data(self):
        started = time.monotonic()
        data = self.run_dir / "data"
        self.train_images, self.train_labels, skipped_train = load_images(
            self.train_items, data / "train_32.npz", "images (train)")
        self.test_images, self.test_labels, skipped_test = load_images(
            self.test_items, data / "test_32.npz", "images (test)")
        self.skipped = skipped_train + skipped_test
        if len(self.train_images) < self.schedule.batch_size:
            raise UserError(f"{len(self.train_images)} readable training images are fewer than "
                            f"one batch ({self.schedule.batch_size}): pass a smaller --batch-size")
        self.mean = bgr_mean(self.train_images)
        return time.monotonic() - started

    def run(self):
        started = time.monotonic()
        load_start = os.getloadavg()
        data_seconds = self.prepare_data()
        s = self.schedule
        caffe = import_caffe()
        caffe.set_mode_cpu()
        if self.threads:
            set_blas_threads(self.threads)
        caffe.set_random_seed(s.seed)
        train_file, deploy_file = run_nets(self.bits, len(self.classes), s.batch_size,
                                           self.run_dir, self.name)
        net = caffe.Net(str(train_file), caffe.TRAIN)
        # the deploy net that classifies test images after each epoch (the curve)
        monitor = caffe.Net(str(deploy_file), caffe.TEST) if s.monitor_images else None
        transform = BatchTransformer(Preprocessing(FAST_SIZE, FAST_SIZE, self.mean))
        net.params["whiten"][0].data[...] = self.whitening(transform)
        net.blobs["smoothing"].data[...] = smoothing_matrix(len(self.classes), s.label_smoothing)
        sgd = NesterovSGD(net, train_file, s.momentum, s.weight_decay)
        total = s.steps(len(self.train_images))
        average = WeightAverage(sgd, s.average_decay, total, s.average_every) \
            if s.average_decay else None
        batches = AugmentedBatches(self.train_images, self.train_labels, s.batch_size,
                                   seed=s.seed, translate=s.translate, flip=s.flip)

        def feed(crops, labels):
            transform(crops, out=net.blobs["data"].data)
            net.blobs["label"].data[...] = labels

        per_epoch = self.steps_per_epoch = batches.batches_per_epoch()
        step, epoch_seconds = self.restore(net, sgd, average)
        train_start = time.monotonic()
        curve_file, curve = self.curve_writer(step)
        progress = Progress(total, label="training", unit="it")
        progress.update(step)
        epoch = step // per_epoch
        while step < total:
            epoch_start = time.monotonic()
            for crops, labels in batches.epoch(epoch):
                if step >= total:
                    break
                lr = triangle_lr(step, total, s.peak_lr_for_batch(), s.warmup_fraction)
                feed(crops, labels)
                sgd.clear_diffs()
                net.forward()
                net.backward()
                sgd.step(lr)
                step += 1
                if average is not None:
                    average.update(step)
                loss = self.last_loss = float(net.blobs["loss"].data)
                if not np.isfinite(loss):
                    raise UserError(f"the training loss became {loss} at step {step}: lower "
                                    "--base-lr")
                curve.writerow([step, f"{step / per_epoch:.3f}", f"{lr:.5f}", f"{loss:.4f}",
                                f"{time.monotonic() - train_start:.1f}"])
                progress.update()
            epoch += 1
            epoch_seconds.append(round(time.monotonic() - epoch_start, 1))
            self.checkpoint(net, sgd, average, step, epoch_seconds)
            self.monitor(net, monitor, transform, step, epoch)
        progress.close()
        curve_file.close()
        train_seconds = time.monotonic() - train_start
        result = self.finish(caffe, net, deploy_file, transform, batches, average, feed)
        if self.held_out_list is not None:
            # the run's last steps, as every recipe's (recipe.Recipe.run)
            result.update(closing_steps(self.run_dir, deploy_file, result["weights"],
                                        self.held_out_list, self.database_list,
                                        fit_sample=self.head_fit_sample))
        summary = dict(
            net=self.name, recipe="fast", bits=self.bits, schedule=asdict(s), steps=total,
            classes=self.classes, train_images=len(self.train_images),
            test_images=len(self.test_images), skipped_images=self.skipped,
            data_seconds=round(data_seconds, 1), train_seconds=round(train_seconds, 1),
            epoch_seconds=epoch_seconds, total_seconds=round(time.monotonic() - started, 1),
            load_average_start=[round(x, 2) for x in load_start],
            load_average_end=[round(x, 2) for x in os.getloadavg()],
            iterations=total, final_loss=round(self.last_loss, 4),
            deploy=str(deploy_file), commands=self.commands, **result)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def whitening(self, transform):
        sample = whitening_sample(self.train_images, seed=self.schedule.seed)
        return whitening_filters(transform(sample), kernel=2)

    # the end of training
    def finish(self, caffe, net, deploy_file, transform, batches, average, feed):
        """Weights -> BatchNorm re-measured -> deploy net saved; test accuracy
        of the final and averaged weights, with and without flip averaging;
        the held-out images choose what the run keeps (choose_kept)."""
        s = self.schedule
        deploy = caffe.Net(str(deploy_file), caffe.TEST)
        bn_batches = lambda: (b for _, b in zip(range(s.bn_batches), batches.epoch(BATCHNORM_EPOCH)))
        accuracies, weights_of = {}, {}
        plain = Preprocessing(FAST_SIZE, FAST_SIZE, self.mean)
        candidates = [("final", None)] + ([("averaged", average)] if average else [])

        def held_out_accuracy(prep):
            predicted = classify(deploy, self.test_images, transform, prep.views)
            return round(float((predicted == self.test_labels).mean()), 4)

        for label, source in candidates:
            if source is not None:
                source.copy_into(net)
            remeasure_batchnorm(net, bn_batches(), feed)
            copy_params(net, deploy)
            weights_of[label] = net_arrays(deploy)
            if len(self.test_images):
                for flip in (False, True):
                    accuracies[accuracy_key(label, flip)] = held_out_accuracy(
                        replace(plain, flip_average=flip))
        kept, flip_average = choose_kept([label for label, _ in candidates], accuracies,
                                         s.flip_average)
        load_net_arrays(deploy, weights_of[kept])
        prep = replace(plain, flip_average=flip_average)
        if s.shift_average and len(self.test_images):
            # the shifted views only for the kept weights: they cost 2x more forwards
            shifted = replace(prep, shift_average=True)
            accuracies[accuracy_key(kept, flip_average, shift=True)] = held_out_accuracy(shifted)
            if choose_shift(accuracies, kept, flip_average):
                prep = shifted
        weights = self.run_dir / f"{self.name}.caffemodel"
        deploy.save(str(weights))
        write_preprocessing_record(self.run_dir, prep, note=(
            "fast net: squash-resize 32, the training images' per-channel mean"
            + ("; features averaged with the mirror image's" if prep.flip_average else "")
            + ("; and with the images shifted one pixel" if prep.shift_average else "")))
        key = accuracy_key(kept, prep.flip_average, prep.shift_average)
        if accuracies:
            log.info("test accuracy: %s (kept: %s weights%s%s)",
                     ", ".join(f"{k} {v:.4f}" for k, v in accuracies.items()), kept,
                     ", flip averaging" if prep.flip_average else "",
                     ", shift averaging" if prep.shift_average else "")
        return dict(weights=str(weights), test_accuracy=accuracies, weights_kept=kept,
                    flip_average=prep.flip_average, shift_average=prep.shift_average,
                    test={"accuracy": accuracies.get(key)})

    # checkpoints and the curves
    def monitor(self, net, monitor, transform, step, epoch):
        """Test accuracy of the current weights (BatchNorm's running averages)
        on monitor_images test images spread over the list (lists are often
        sorted by class), logged and appended to test_curve.csv: a learning
        curve to watch, not a choice of weights."""
        n = min(self.schedule.monitor_images, len(self.test_images))
        if monitor is None or not n:
            return
        chosen = np.linspace(0, len(self.test_images) - 1, n).astype(int)
        images = self.test_images[chosen]
        copy_params(net, monitor)
        accuracy = float((classify(monitor, images, transform)
                          == self.test_labels[chosen]).mean())
        log.info("epoch %d (step %d): test accuracy %.4f on %d images", epoch, step, accuracy,
                 len(images))
        path = self.run_dir / TEST_CURVE_FILE
        new = not path.exists() or step <= self.steps_per_epoch
        with open(path, "w" if new else "a") as f:
            if new:
                f.write("step,epoch,accuracy,images\n")
            f.write(f"{step},{epoch},{accuracy:.4f},{len(images)}\n")

    def checkpoint(self, net, sgd, average, step, epoch_seconds):
        folder = self.run_dir / CHECKPOINT_DIR
        folder.mkdir(exist_ok=True)
        arrays = dict(net_arrays(net), **sgd.state(), **(average.state() if average else {}))
        partial = folder / f"step_{step}.partial.npz"
        np.savez(partial, step=step, epoch_seconds=np.asarray(epoch_seconds), **arrays)
        os.replace(partial, folder / f"step_{step}.npz")
        for old in folder.glob("step_*.npz"):
            if old.name != f"step_{step}.npz":
                old.unlink()

    def restore(self, net, sgd, average):
        """(step, epoch seconds) of the latest checkpoint, loaded into the
        net, momentum and average; (0, []) for a fresh run."""
        folder = self.run_dir / CHECKPOINT_DIR
        found = sorted(folder.glob("step_*[0-9].npz"),
                       key=lambda p: int(p.stem.split("_")[1])) if folder.exists() else []
        if not found:
            return 0, []
        if not self.resume:
            raise UserError(f"{self.run_dir} holds an unfinished or finished run "
                            f"({found[-1].name}): resume it with --resume auto, or delete "
                            f"{folder} to start again")
        with np.load(found[-1]) as stored:
            load_net_arrays(net, stored)
            sgd.load_state(stored)
            if average is not None:
                average.load_state(stored)
            step = int(stored["step"])
            log.info("resuming at step %d from %s", step, found[-1])
            return step, [float(x) for x in stored["epoch_seconds"]]

    def curve_writer(self, step):
        """(open file, csv writer) of train_curve.csv, continued after `step`
        on a resumed run."""
        path = self.run_dir / CURVE_FILE
        rows = []
        if step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if int(r[0]) <= step]
        handle = open(path, "w", newline="", buffering=1)   # line by line: a killed run keeps its rows
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "lr", "loss", "seconds"])
        writer.writerows(rows)
        return handle, writer


def train_fast(train_items, test_items, classes, bits, run_dir, name, epochs=None,
               max_iter=None, batch_size=None, base_lr=None, resume=None, threads=None,
               commands=None, held_out=None, database=None):
    """FastRecipe with the default schedule changed as the command line asks
    (FastSchedule.adapted); returns the run's summary."""
    schedule = FastSchedule().adapted(epochs, max_iter, batch_size, base_lr,
                                      images=len(train_items))
    log.info("fast net from scratch: %g epochs of %d images in batches of %d (peak lr %g), "
             "%d classes -> %s", schedule.epochs, len(train_items), schedule.batch_size,
             schedule.peak_lr_for_batch(), len(classes), run_dir)
    return FastRecipe(bits, train_items, test_items, classes, run_dir, name, schedule,
                      resume=bool(resume), threads=threads, commands=commands,
                      held_out=held_out, database=database).run()
