#!/usr/bin/env python3
"""What does refitting the head give, and which settings? (a benchmark, not a test)

For each run folder with the two databases the benchmarks build
(db_train.lmdb: the training images, the database; db_test.lmdb: the
held-out ones, the queries), the head (latent InnerProduct + Sigmoid, then
the classifier) is fitted again by training.headfit.fit_head on the stored
fc7 of a seeded sample of the training images, and the codes it gives every
image are ranked by Hamming distance: coarse mAP@1000 of all queries against
the whole database (metrics.evaluate, the search users run), beside the
stored codes' (the run's own head). Settings varied one at a time from
headfit's defaults: the sample size (with three seeds each), the label
smoothing.

The stored fc7 are what extraction stored: with a fast run's test-time
views averaged. train.py's refit fits single views of the training images
(a sixth of the forwards); on runs/fast10_airbench both fitted to the same
coarse mAP within 0.002 (docs/benchmarks.md). The test accuracy of each
refitted classifier is printed beside it.

    .venv/bin/python benchmarks/bench_head_refit.py runs/fast10_airbench/fast_hash48 \\
        --json runs/fast10_airbench/head_refit_bench.json
"""
import sys
import time
from pathlib import Path

import numpy as np

from bench_stage_choice import over_runs, stored
from dlbhc.errors import run_main
from dlbhc.search.pca import sample_ids
from dlbhc.training import headfit
from dlbhc.training.headfit import coarse_map, fit_head

K = 1000


def settings():
    """(label, sample size, fit_head keywords): three seeds at 10,000 and at
    headfit's sample size, 20,000, then the label smoothing varied."""
    base = dict(smoothing=headfit.FIT_SMOOTHING, seed=0)
    rows = [(f"sample {n}, seed {s}", n, dict(base, seed=s))
            for n in (10000, headfit.FIT_SAMPLE) for s in (0, 1, 2)]
    rows.append(("sample 20000, seed 0", 20000, base))
    rows += [(f"smoothing {e}", headfit.FIT_SAMPLE, dict(base, smoothing=e))
             for e in (0.0, 0.1, 0.3)]
    return rows


def bench(run):
    run = Path(run)
    (_, db_labels, db_fc7, db_latent), bits = stored(run / "db_train.lmdb")
    (_, q_labels, q_fc7, q_latent), _ = stored(run / "db_test.lmdb")
    classes = int(max(db_labels.max(), q_labels.max())) + 1
    row = {"run": str(run), "bits": bits, "database": len(db_labels), "queries": len(q_labels),
           "stored": coarse_map(db_latent, db_labels, q_latent, q_labels, K), "refits": []}
    print(f"{run}: {len(q_labels)} queries x {len(db_labels)}, {bits} bits: stored codes "
          f"coarse mAP@{K} {row['stored']:.4f}", flush=True)
    for label, size, kw in settings():
        started = time.monotonic()
        ids = sample_ids(len(db_labels), size, kw["seed"])
        head = fit_head(db_fc7[ids], db_labels[ids], bits, classes, **kw)
        fit_seconds = time.monotonic() - started
        score = coarse_map(head.latent(db_fc7), db_labels, head.latent(q_fc7), q_labels, K)
        accuracy = float((head.classes(q_fc7) == q_labels).mean())
        row["refits"].append({"setting": label, "sample": len(ids), **kw, "coarse": score,
                              "accuracy": accuracy, "fit_seconds": round(fit_seconds, 1)})
        print(f"    {label:22s} coarse {score:.4f} ({score - row['stored']:+.4f}), accuracy "
              f"{accuracy:.4f}, fit {fit_seconds:.1f} s", flush=True)
    return row


def main(argv=None):
    over_runs(__doc__, bench, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
