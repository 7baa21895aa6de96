"""Frozen lower layers: computed once, cached, joined with the trained top.

The CPU recipe fine-tunes only the upper layers of an ImageNet backbone. The
layers below a split blob never change, so their output is computed once per
image (and once for its mirror image: the flip augmentation) and cached in a
Caffe Datum LMDB of float features; `caffe train` then runs only the upper
layers, reading that LMDB through an ordinary Data layer.

    split_layers     a net's layers below and above the split blob
    frozen_net       the deploy net cut after the split (features to cache)
    fold_batchnorm   BatchNorm + Scale folded into the convolution before
                     them (nets.fold; the forward is ~1.4x faster, the
                     result equal to float rounding)
    top_net          a train_val whose layers below the split are replaced by
                     Data layers reading cached features
    cache_features   images -> frozen net -> feature LMDB (workers, progress,
                     skipped images reported, built in .partial and renamed)
    compute_features images -> frozen net -> features in memory (the same
                     workers; the unsupervised recipe's pooled features)
    merge_weights    the full deploy net's caffemodel: the backbone's frozen
                     layers, the trained top layers
"""
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from ..datasets.datum import LmdbWriter, float_datum_bytes
from ..errors import UserError
from ..files import replace_dir
from ..images import BadImage, write_skipped_list
from ..nets.caffe_env import import_caffe, set_blas_threads
from ..nets.fold import fold_batchnorm  # noqa: F401 (the recipes' name for it)
from ..nets.model import BatchTransformer, ImagePreparer
from ..nets.protos import caffe_pb2, layer_param_shapes, parse_caffemodel, read_prototxt
from ..progress import Progress
from ..report import get_logger
from .prototxt import data_layer_pair

log = get_logger(__name__)

COMPLETE_FILE = "complete.json"
# Processes computing features (each runs the frozen net with one BLAS
# thread): one per core of the 2-core machine the CPU recipe was tuned on.
# (extraction's workers are another pool, above this room, with its own
# default.)
FEATURE_WORKERS = 2


# ---- cutting nets ------------------------------------------------------------------

def split_layers(net, split):
    """(layers up to the last one writing blob `split`, the layers after).
    A UserError when no layer writes it, or when an upper layer reads a blob
    of the lower part other than the split (the cut would lose it)."""
    layers = list(net.layer)
    writers = [i for i, layer in enumerate(layers) if split in layer.top]
    if not writers:
        tops = [t for layer in layers for t in layer.top]
        raise UserError(f"the net has no blob {split!r} to split at; blobs: "
                        f"{', '.join(dict.fromkeys(tops))}")
    cut = writers[-1] + 1
    lower, upper = layers[:cut], layers[cut:]
    lower_blobs = {t for layer in lower for t in layer.top} - {split}
    for layer in upper:
        for bottom in layer.bottom:
            if bottom in lower_blobs and bottom not in ("label",):
                raise UserError(f"layer {layer.name} reads {bottom}, below the split at "
                                f"{split}: choose a split blob every upper layer starts from")
    return lower, upper


def frozen_net(deploy, split):
    """NetParameter: the deploy net's layers up to the split blob."""
    net = read_prototxt(deploy, "NetParameter") if not hasattr(deploy, "layer") else deploy
    lower, _ = split_layers(net, split)
    out = caffe_pb2().NetParameter(name=f"{net.name}_frozen_{split}")
    out.layer.extend(lower)
    return out


def top_net(train_val, split, train_source, test_source, train_batch, test_batch):
    """A train_val NetParameter whose layers below `split` are replaced by two
    Data layers (TRAIN, TEST) reading cached features into blob `split` (and
    `label`). Those features carry no transform: no mean, crop or mirror."""
    net = read_prototxt(train_val, "NetParameter") if not hasattr(train_val, "layer") \
        else train_val
    _, upper = split_layers(net, split)
    out = caffe_pb2().NetParameter(name=f"{net.name}_above_{split}")
    for layer in data_layer_pair((train_source, test_source), (train_batch, test_batch),
                                 mirror=False, name="features", tops=(split, "label")):
        layer.add_to(out)
    out.layer.extend(upper)
    return out


def param_layer_names(net):
    """Names of the layers with learnable blobs (convolutions, scales, ...)."""
    kinds = {"Convolution", "InnerProduct", "Scale", "BatchNorm", "Deconvolution", "Bias",
             "PReLU"}
    return [layer.name for layer in net.layer if layer.type in kinds]


# ---- folding BatchNorm -------------------------------------------------------------

def net_with_params(net_param, params, folder, name):
    """Write `name`.prototxt and `name`.caffemodel into folder from a
    NetParameter and {layer: [arrays]}; returns their paths."""
    caffe = import_caffe()
    folder = Path(folder)
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(str(net_param))
    net = caffe.Net(str(prototxt), caffe.TEST)
    for layer, blobs in params.items():
        for target, value in zip(net.params[layer], blobs):
            target.data[...] = value.reshape(target.data.shape)
    weights = folder / f"{name}.caffemodel"
    net.save(str(weights))
    return prototxt, weights


def net_params(deploy, weights):
    """{layer: [arrays]} of a deploy net with its weights."""
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


# ---- caching features ----------------------------------------------------------------

def cache_key(weights_sha1, split, prep, flips, items):
    """A digest of what the cached features depend on: the backbone's weights,
    the split, the preprocessing, flips, and every image (path, size, mtime,
    label) - linear in the number of images."""
    digest = hashlib.sha1(json.dumps([weights_sha1, split, prep.as_dict(), bool(flips)]).encode())
    for it in items:
        try:
            st = os.stat(it.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{Path(it.path).resolve()}\t{int(it.label)}\t{stamp}\n".encode())
    return digest.hexdigest()[:16]


_WORKER = {}


def _init_worker(prototxt, weights, prep):
    set_blas_threads(1)
    caffe = import_caffe()
    caffe.set_mode_cpu()
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    _WORKER.update(net=net, prepare=ImagePreparer(prep), transform=BatchTransformer(prep),
                   output=net.outputs[0])


def _features(chunk, flips):
    """In a worker: decode a chunk of (index, path, label), run the frozen net
    on the images (and their mirror images) -> [(index, label, feature,
    flipped feature | None, reason | None)]."""
    prepare, net = _WORKER["prepare"], _WORKER["net"]
    crops, results = [], []
    for index, path, label in chunk:
        try:
            crops.append(prepare(path))
            results.append([index, label, None, None, None])
        except BadImage as err:
            results.append([index, label, None, None, f"{path}\t{err.reason}"])
    good = [r for r in results if r[4] is None]
    if good:
        batch = np.stack(crops)
        views = [batch, batch[:, :, ::-1]] if flips else [batch]
        outputs = []
        for view in views:
            data = net.blobs["data"]
            if data.data.shape[0] != len(view):
                data.reshape(len(view), *data.data.shape[1:])
                net.reshape()
            _WORKER["transform"](np.ascontiguousarray(view), out=data.data)
            net.forward()
            outputs.append(net.blobs[_WORKER["output"]].data.copy())
        for j, r in enumerate(good):
            r[2] = outputs[0][j]
            r[3] = outputs[1][j] if flips else None
    return results


def _features_star(args):
    return _features(*args)


def cache_features(items, prototxt, weights, prep, out, flips=False, seed=1,
                   workers=FEATURE_WORKERS, batch_size=25, label="features"):
    """Feature LMDB `out` of the frozen net (prototxt + weights) over items
    (ImageItems), prepared with `prep` (model.Preprocessing). With flips,
    every image also gives its mirror image's features. Record order is
    what Caffe's Data layer reads: images in a seeded shuffled order, then
    (with flips) all mirror images in another one. Keeps nothing when
    interrupted (built in out.partial). Returns a summary dict (also
    written to out/complete.json); skipped images are in out.skipped.tsv.
    """
    out = Path(out)
    done = out / COMPLETE_FILE
    if done.exists():
        return json.loads(done.read_text())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n = len(items)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    position = {image: slot for slot, image in enumerate(order)}
    mirror_order = list(range(n))
    rng.shuffle(mirror_order)
    mirror_position = {image: n + slot for slot, image in enumerate(mirror_order)}
    todo = [(i, str(it.path), int(it.label)) for i, it in enumerate(items)]
    chunks = [(todo[i:i + batch_size], flips) for i in range(0, n, batch_size)]
    start = time.monotonic()
    writer = LmdbWriter(partial, 1 << 30)
    skipped, shape, stored = [], None, 0
    progress = Progress(n, label=label, interval=5)
    try:
        with mp.get_context("fork").Pool(max(1, workers), initializer=_init_worker,
                                         initargs=(prototxt, weights, prep)) as pool:
            for results in pool.imap(_features_star, chunks):
                pairs = []
                for index, lab, feature, mirrored, reason in results:
                    if reason is not None:
                        path, why = reason.split("\t", 1)
                        skipped.append((path, why))
                        log.warning("skipped %s: %s", path, why)
                        continue
                    shape = feature.shape
                    pairs.append((b"%010d" % position[index], float_datum_bytes(feature, lab)))
                    if mirrored is not None:
                        pairs.append((b"%010d" % mirror_position[index],
                                      float_datum_bytes(mirrored, lab)))
                    stored += 1
                writer.put_batch(pairs)
                progress.update(len(results))
        progress.close()
    except BaseException:
        writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    writer.close()
    if stored == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"none of the {n} images could be read (see the messages above)")
    summary = {"images": stored, "records": stored * (2 if flips else 1),
               "skipped": len(skipped), "shape": list(shape), "flips": bool(flips),
               "preprocessing": prep.as_dict(), "seconds": round(time.monotonic() - start, 1),
               "images_per_second": round(n / max(time.monotonic() - start, 1e-9), 2)}
    (partial / COMPLETE_FILE).write_text(json.dumps(summary, indent=2))
    replace_dir(partial, out)
    write_skipped_list(out, skipped, "the feature cache")
    return summary


def compute_features(items, prototxt, weights, prep, workers=FEATURE_WORKERS, batch_size=25,
                     label="features"):
    """The frozen net's output for each readable image of items, in memory
    and in input order: (features (n, D) float32, indices of the items they
    belong to, skipped [(path, reason)]). The same workers as
    cache_features; unreadable images are reported and skipped."""
    todo = [(i, str(it.path), int(it.label)) for i, it in enumerate(items)]
    chunks = [(todo[i:i + batch_size], False) for i in range(0, len(todo), batch_size)]
    features, kept, skipped = [], [], []
    progress = Progress(len(todo), label=label, interval=5)
    with mp.get_context("fork").Pool(max(1, workers), initializer=_init_worker,
                                     initargs=(prototxt, weights, prep)) as pool:
        for results in pool.imap(_features_star, chunks):
            for index, _, feature, _, reason in results:
                if reason is not None:
                    path, why = reason.split("\t", 1)
                    skipped.append((path, why))
                    log.warning("skipped %s: %s", path, why)
                else:
                    features.append(feature.ravel())
                    kept.append(index)
            progress.update(len(results))
    progress.close()
    if not features:
        raise UserError(f"none of the {len(items)} images could be read (see the messages above)")
    return np.stack(features).astype(np.float32), np.array(kept), skipped


# ---- joining the trained top with the backbone -------------------------------------

def merge_weights(deploy, sources, out):
    """Write `out`: the deploy net's weights copied by layer name from each of
    `sources` in turn (later ones win): the backbone, then the trained top.
    A UserError when a layer of the net got no weights from any of them."""
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    filled = set()
    for source in sources:
        trained = parse_caffemodel(Path(source).read_bytes(), str(source))
        shapes = layer_param_shapes(trained)
        for name in net.params:
            if name in shapes:
                filled.add(name)
        net.copy_from(str(source))
    missing = [name for name in net.params if name not in filled]
    if missing:
        raise UserError(f"no weights for {', '.join(missing[:5])} in {', '.join(map(str, sources))}")
    tmp = Path(out).with_name(Path(out).name + ".partial")
    net.save(str(tmp))
    os.replace(tmp, out)
    return Path(out)
