"""The last step of every training run (recipe.Recipe.run): the fine stage
chosen for the new model on its held-out images, recorded in the run folder
(rerank.json, nets.records) for `--rerank auto`.

The held-out images (the run's test list) and a seeded sample of at most
DATABASE_SAMPLE training images go through the trained deploy net (fc7,
latent, codes: what extract.py stores), then search.choice measures every
candidate fine stage through metrics.evaluate, the search users run, the
held-out images querying the training sample at a k shrunk by the
sample's share (search.choice.sampled_top_k), and applies its rule (never
below the coarse ranking).  Measured for the held-out images under load:
76 img/s with the small net, 39 img/s with the backbone at 96 px
(docs/benchmarks.md), so CIFAR-10's 10,000 + 5,000 take ~3 and ~6 min.
"""
from pathlib import Path

import numpy as np

from ..images import BadImage, list_images
from ..nets.model import HashNet
from ..nets.records import write_rerank_record
from ..progress import Progress
from ..report import get_logger
from ..search.choice import measure_fine_stages
from ..search.pca import sample_ids

log = get_logger(__name__)

# Held-out images through the net at a time.
BATCH = 50
# Training images the held-out ones query when the stage is chosen (a
# seeded sample: CIFAR-10's 50,000 would cost minutes with the backbone).
DATABASE_SAMPLE = 5000


def labelled_features(net, items, label):
    """(codes, labels, fc7, latent) of labelled `items` through `net`, BATCH
    at a time, with a progress line: measure_fine_stages's order."""
    paths = [str(it.path) for it in items]
    progress = Progress(len(paths), label=label)
    parts = []
    for lo in range(0, len(paths), BATCH):
        parts.append(net.features_of_paths(paths[lo:lo + BATCH]))
        progress.update(len(parts[-1][0]))
    progress.close()
    fc7, latent, codes = (np.concatenate(column) for column in zip(*parts))
    return codes, np.array([it.label for it in items], dtype=np.int64), fc7, latent


def database_sample(items, size=DATABASE_SAMPLE, seed=0):
    """At most `size` of `items`, a seeded sample kept in list order."""
    return [items[i] for i in sample_ids(len(items), size, seed)]


def labelled(image_list):
    return [it for it in list_images(image_list).items if it.label >= 0]


def record_fine_stage(run_dir, deploy, weights, held_out, gpu=None, database=None):
    """Measure the fine stages of the model (deploy, weights) on the
    labelled image list `held_out`, querying a sample of the labelled list
    `database` (the training images; without it, or with fewer than 4, the
    held-out images split in two), and write run_dir/rerank.json; returns
    the record, or None (with a log line saying why) when the list cannot
    be measured (then `--rerank auto` keeps re-ranking by fc7)."""
    items = labelled(held_out)
    if len(items) < 4:
        log.info("fine stage not measured: %s has %d labelled images (4 needed); "
                 "searches re-rank by fc7", held_out, len(items))
        return None
    training = labelled(database) if database is not None and Path(database).is_file() else []
    base = database_sample(training) if len(training) >= 4 else []
    log.info("choosing the fine stage on %d held-out images (%s)%s", len(items), held_out,
             f" against {len(base)} training images ({database})" if base else "")
    net = HashNet(deploy, weights, gpu=gpu)
    try:
        held = labelled_features(net, items, "held-out images through the net")
        against = labelled_features(net, base, "training images through the net") \
            if base else None
    except BadImage as err:
        log.warning("fine stage not measured: image %s: %s; searches re-rank by "
                    "fc7", err.path, err.reason)
        return None
    record = measure_fine_stages(*held, net.bits, database=against,
                                 database_size=len(training) if base else None)
    record.update(held_out=str(held_out), weights=str(weights))
    if base:
        record.update(database_list=str(database))
    path = write_rerank_record(run_dir, record)
    scores = ", ".join(f"{name} {value:.4f}" for name, value in record["map_at_k"].items())
    log.info("fine stage: %s (held-out mAP@%d, %d queries against %d: coarse %.4f, %s%s) -> %s",
             record["choice"], record["k"], record["queries"], record["database"],
             record["coarse"], scores,
             "" if record.get("measured", True) else f"; {record['reason']}", path)
    return record
