"""The paper's head fitted again on the trained net's own features: a step
of every run that learns its features (recipe.Recipe.run, fast.FastRecipe),
just before the fine stage is chosen.

The latent layer (InnerProduct + Sigmoid) and the classifier after it are
learned together with the rest of the net: on augmented images, with
BatchNorm in training mode, while the features under them still move. The
codes users search are computed from the final net's features of plain
images. Fitted again on exactly those (a sample of the training images
through the trained deploy net, one view each), the same two layers give
codes that rank better at the same accuracy: on CIFAR-10 at 48 bits the
fast recipe's codes went from 0.8556 to 0.8651 coarse mAP@1000, the
checked-in small net's (make demo) from 0.6185 to 0.6502
(docs/benchmarks.md). Nothing else in the net changes, so fc7 is the same.

fit_head is the fit, numpy only: Adam on the batch-mean softmax
cross-entropy with label smoothing over the sigmoid latent, the features
standardised, the standardisation folded into the latent layer's weights
afterwards so the net computes exactly the fitted head.

refit_head is the run's step: the fit, then both heads' coarse mAP on the
held-out images querying a sample of the training images (the fine stage's
protocol: k scaled by the sample's share, search.choice.sampled_top_k). The
new head replaces the old in the weights file only when it ranks strictly
better there, so the step never makes a run's codes worse where it can be
measured; with too few held-out images it changes nothing.
"""
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import BadImage
from ..nets.caffe_env import import_caffe
from ..nets.model import HashNet
from ..nets.protos import read_prototxt
from ..report import get_logger
from ..search.choice import MIN_CHOICE_QUERIES, sampled_top_k
from ..search.codes import pack_codes
from ..search.metrics import EVALUATION_TOP_K, evaluate
from ..search.params import SearchParams
from ..search.pca import sample_ids
from .finestage import DATABASE_SAMPLE, labelled, labelled_features
from .prototxt import CLASSIFIER_LAYER, latent_layer_name

log = get_logger(__name__)

# Training images the head is fitted on (a seeded sample): on CIFAR-10
# (benchmarks/bench_head_refit.py, three seeds) all 50,000 fitted the small
# net's head better than 10,000 (coarse mAP@1000 0.650-0.654 against
# 0.639-0.646) and the fast net's as well (0.8647-0.8684 against
# 0.8641-0.8669); one forward each: 70 s with the small net.
FIT_SAMPLE = 50000
# Held-out images that judge the two heads (the first of a seeded sample).
CHECK_QUERIES = 5000
# The fit: Adam steps on batches of FIT_BATCH, the learning rate, the
# label smoothing (0.2, as the fast recipe's loss: 0 fitted both nets'
# codes worse, by 0.003 and 0.007; 0.1 and 0.3 tied with it) and the
# initial weights' scale.
FIT_STEPS = 1000
FIT_BATCH = 500
FIT_LR = 1e-3
FIT_SMOOTHING = 0.2
INIT_SCALE = 0.1
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
RECORD_FILE = "head_refit.json"


@dataclass
class Head:
    """The latent InnerProduct and the classifier, in Caffe's layout:
    latent_weights (bits, D), latent_bias (bits,), classifier_weights
    (K, bits), classifier_bias (K,)."""
    latent_weights: np.ndarray
    latent_bias: np.ndarray
    classifier_weights: np.ndarray
    classifier_bias: np.ndarray

    def latent(self, fc7):
        """The Sigmoid's output for fc7 rows (n, D), as the net computes it."""
        z = np.asarray(fc7, dtype=np.float64) @ self.latent_weights.T + self.latent_bias
        return sigmoid(z).astype(np.float32)

    def classes(self, fc7):
        return np.argmax(self.latent(fc7) @ self.classifier_weights.T + self.classifier_bias,
                         axis=1)


def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_head(features, labels, bits, num_classes, steps=FIT_STEPS, batch=FIT_BATCH,
             lr=FIT_LR, smoothing=FIT_SMOOTHING, seed=0):
    """The Head that classifies `features` (n, D) as `labels` (0..K-1)
    through a `bits`-wide sigmoid layer (module docstring); seeded."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(x) != len(labels) or not len(x):
        raise ValueError(f"{len(x)} feature rows for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x = (x - mean) / std
    targets = np.full((len(x), num_classes), smoothing / num_classes)
    targets[np.arange(len(x)), labels] += 1.0 - smoothing
    rng = np.random.default_rng(seed)
    params = [rng.normal(0, INIT_SCALE, (x.shape[1], bits)), np.zeros(bits),
              rng.normal(0, INIT_SCALE, (bits, num_classes)), np.zeros(num_classes)]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    (b1, b2), order = ADAM_BETAS, np.zeros(0, dtype=np.int64)
    for t in range(1, steps + 1):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(x))])
        idx, order = order[:batch], order[batch:]
        w1, c1, w2, c2 = params
        h = sigmoid(x[idx] @ w1 + c1)
        dz = (softmax(h @ w2 + c2) - targets[idx]) / len(idx)
        da = (dz @ w2.T) * h * (1.0 - h)
        grads = [x[idx].T @ da, da.sum(axis=0), h.T @ dz, dz.sum(axis=0)]
        for p, m, v, g in zip(params, moments, squares, grads):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + ADAM_EPS)
    w1, c1, w2, c2 = params
    # ((f - mean) / std) w1 + c1 = f (w1 / std) + (c1 - (mean / std) w1)
    folded = w1 / std[:, None]
    return Head(latent_weights=folded.T.astype(np.float32),
                latent_bias=(c1 - mean @ folded).astype(np.float32),
                classifier_weights=w2.T.astype(np.float32),
                classifier_bias=c2.astype(np.float32))


def net_head(caffe_net, latent_layer, classifier_layer=CLASSIFIER_LAYER):
    """The Head a pycaffe net holds."""
    lw, lb = (b.data for b in caffe_net.params[latent_layer])
    cw, cb = (b.data for b in caffe_net.params[classifier_layer])
    return Head(lw.reshape(lb.size, -1).copy(), lb.copy(), cw.reshape(cb.size, -1).copy(),
                cb.copy())


def write_head(deploy, weights, head, out):
    """The weights file `weights` with `head` in its latent and classifier
    layers, written atomically to `out` (a link there is replaced, not its
    target: a run's link to its last snapshot keeps the snapshot as it was)."""
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    net.copy_from(str(weights))
    latent = latent_layer_name(read_prototxt(deploy, "NetParameter"))
    for layer, w, b in ((latent, head.latent_weights, head.latent_bias),
                        (CLASSIFIER_LAYER, head.classifier_weights, head.classifier_bias)):
        blobs = net.params[layer]
        if blobs[0].data.size != w.size or blobs[1].data.size != b.size:
            raise ValueError(f"{layer}: the head has {w.shape}, the net {blobs[0].data.shape}")
        blobs[0].data[...] = w.reshape(blobs[0].data.shape)
        blobs[1].data[...] = b.reshape(blobs[1].data.shape)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    net.save(str(partial))
    os.replace(partial, out)
    return out


def coarse_map(db_latent, db_labels, q_latent, q_labels, k):
    """Coarse (Hamming) mAP@k of the queries' codes against the database's."""
    result = evaluate(pack_codes(db_latent), db_labels, pack_codes(q_latent), q_labels,
                      params=SearchParams(top_k=k))
    return float(result["coarse"]["map_at_k"])


def refit_head(run_dir, deploy, weights, train_list, held_out, gpu=None, seed=0,
               fit_sample=FIT_SAMPLE):
    """The run's step (module docstring): returns the record (also written
    to run_dir/head_refit.json), or None with a log line when it cannot be
    measured (the weights are then left as they were). fit_sample: at most
    this many training images are fitted on."""
    started = time.monotonic()
    training = labelled(train_list) if train_list and Path(train_list).is_file() else []
    queries = labelled(held_out) if held_out and Path(held_out).is_file() else []
    queries = [queries[i] for i in sample_ids(len(queries), CHECK_QUERIES, seed)]
    if len(queries) < MIN_CHOICE_QUERIES or len(training) < 4:
        log.info("head not refitted: %d held-out and %d training images with labels "
                 "(%d and 4 needed to judge it)", len(queries), len(training),
                 MIN_CHOICE_QUERIES)
        return None
    fit_items = [training[i] for i in sample_ids(len(training), fit_sample, seed)]
    net = HashNet(deploy, weights, gpu=gpu, views=False)
    try:
        _, fit_labels, fit_fc7, fit_latent = labelled_features(
            net, fit_items, "training images through the net (head refit)")
        _, q_labels, q_fc7, q_latent = labelled_features(
            net, queries, "held-out images through the net (head refit)")
    except BadImage as err:
        log.warning("head not refitted: image %s: %s", err.path, err.reason)
        return None
    old = net_head(net.net, latent_layer_name(read_prototxt(deploy, "NetParameter")))
    head = fit_head(fit_fc7, fit_labels, net.bits, old.classifier_bias.size, seed=seed)
    against = sample_ids(len(fit_items), DATABASE_SAMPLE, seed)
    k = sampled_top_k(EVALUATION_TOP_K, len(against), len(training))
    before = coarse_map(fit_latent[against], fit_labels[against], q_latent, q_labels, k)
    after = coarse_map(head.latent(fit_fc7[against]), fit_labels[against],
                       head.latent(q_fc7), q_labels, k)
    kept = after > before
    record = dict(
        kept=bool(kept), k=k, queries=len(queries), database=int(len(against)),
        database_size=len(training), fit_images=len(fit_items),
        coarse_before=round(before, 4), coarse_after=round(after, 4),
        accuracy_before=round(float((old.classes(q_fc7) == q_labels).mean()), 4),
        accuracy_after=round(float((head.classes(q_fc7) == q_labels).mean()), 4),
        settings=dict(steps=FIT_STEPS, batch=FIT_BATCH, lr=FIT_LR, smoothing=FIT_SMOOTHING,
                      seed=seed),
        held_out=str(held_out), database_list=str(train_list), weights=str(weights))
    if kept:
        write_head(deploy, weights, head, weights)
    record["seconds"] = round(time.monotonic() - started, 1)
    Path(run_dir, RECORD_FILE).write_text(json.dumps(record, indent=2))
    log.info("head refit on %d training images: held-out coarse mAP@%d %.4f -> %.4f "
             "(accuracy %.4f -> %.4f): %s (%.0f s)", len(fit_items), k, before, after,
             record["accuracy_before"], record["accuracy_after"],
             f"kept, written into {weights}" if kept else "not kept, the weights are unchanged",
             record["seconds"])
    return record
