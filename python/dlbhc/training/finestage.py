"""The last step of every training run (recipe.Recipe.run): the fine stage
chosen for the new model on its held-out images, recorded in the run folder
(rerank.json, nets.records) for `--rerank auto`.

The held-out images (the run's test list) go through the trained deploy net
(fc7, latent, codes: what extract.py stores), then search.choice measures
every candidate fine stage through metrics.evaluate, the search users run,
and applies its rule (never below the coarse ranking).  CIFAR-10's 10,000
test images take ~15 s with the small net; a collection's few hundred a few
seconds with the backbone.
"""
import numpy as np

from ..images import BadImage, list_images
from ..nets.model import HashNet
from ..nets.records import write_rerank_record
from ..progress import Progress
from ..report import get_logger
from ..search.choice import measure_fine_stages

log = get_logger(__name__)

# Held-out images through the net at a time.
BATCH = 50


def held_out_features(net, paths):
    """fc7, latent, codes of `paths` through `net`, BATCH at a time, with a
    progress line."""
    progress = Progress(len(paths), label="held-out images through the net")
    parts = []
    for lo in range(0, len(paths), BATCH):
        parts.append(net.features_of_paths(paths[lo:lo + BATCH]))
        progress.update(len(parts[-1][0]))
    progress.close()
    return [np.concatenate(column) for column in zip(*parts)]


def record_fine_stage(run_dir, deploy, weights, held_out, gpu=None):
    """Measure the fine stages of the model (deploy, weights) on the
    labelled image list `held_out` and write run_dir/rerank.json; returns
    the record, or None (with a log line saying why) when the list cannot
    be measured (then `--rerank auto` keeps re-ranking by fc7)."""
    items = [it for it in list_images(held_out).items if it.label >= 0]
    if len(items) < 4:
        log.info("fine stage not measured: %s has %d labelled images (4 needed); "
                 "searches re-rank by fc7", held_out, len(items))
        return None
    log.info("choosing the fine stage on %d held-out images (%s)", len(items), held_out)
    net = HashNet(deploy, weights, gpu=gpu)
    try:
        fc7, latent, codes = held_out_features(net, [str(it.path) for it in items])
    except BadImage as err:
        log.warning("fine stage not measured: held-out image %s: %s; searches re-rank by "
                    "fc7", err.path, err.reason)
        return None
    labels = np.array([it.label for it in items], dtype=np.int64)
    record = measure_fine_stages(codes, labels, fc7, latent, net.bits)
    record.update(held_out=str(held_out), weights=str(weights))
    path = write_rerank_record(run_dir, record)
    scores = ", ".join(f"{name} {value:.4f}" for name, value in record["map_at_k"].items())
    log.info("fine stage: %s (held-out mAP@%d, %d queries against %d: coarse %.4f, %s%s) -> %s",
             record["choice"], record["k"], record["queries"], record["database"],
             record["coarse"], scores,
             "" if record.get("measured", True) else f"; {record['reason']}", path)
    return record
