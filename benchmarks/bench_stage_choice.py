#!/usr/bin/env python3
"""How well does the fine-stage choice predict? (a benchmark, not a test)

For each run folder with the two databases the benchmarks build
(db_train.lmdb: the training images; db_test.lmdb: the held-out ones), the
held-out images are split by position: the odd ones choose, the even ones
judge. Two ways of choosing, both search.choice's rule on
search.choice.measure_fine_stages:

    held-out only     the choosing images split again in two (odd query
                      even), as train.py did before
    against training  the choosing images query a seeded sample of the
                      training images (training.finestage.database_sample)
                      at k scaled by the sample's share of them
                      (search.choice.sampled_top_k), as train.py does now

The judging images then query the whole training database with every
stage (mAP@1000), and each way's choice is read off that row.

    .venv/bin/python benchmarks/bench_stage_choice.py runs/small/*/ \\
        runs/bench/efficientnet_lite0_hash48_cifar10 runs/fast2/fast_hash48
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dlbhc.errors import UserError, run_main
from dlbhc.search.choice import FALLBACK, choose, measure_fine_stages
from dlbhc.store.database import FeatureStore
from dlbhc.training.finestage import database_sample

K = 1000


def stored(path):
    """(codes, labels, fc7, latent), bits of a feature database."""
    if not Path(path).exists():
        raise UserError(f"{path} does not exist: build it with extract.py (see the module "
                        "docstring's runs)")
    store = FeatureStore.open(path)
    try:
        ids = np.arange(store.count)
        return (store.codes(), store.labels(), np.asarray(store.fc7_rows(), np.float32),
                store.latent(ids)), store.bits
    finally:
        store.close()


def rows(arrays, positions):
    return tuple(a[positions] for a in arrays)


def judge(run):
    run = Path(run)
    train, bits = stored(run / "db_train.lmdb")
    held, _ = stored(run / "db_test.lmdb")
    n = len(held[0])
    choosing, judging = rows(held, np.arange(1, n, 2)), rows(held, np.arange(0, n, 2))
    # the positions of the training images train.py's last step would send
    sample = np.array(database_sample(range(len(train[0]))))
    held_only = measure_fine_stages(*choosing, bits, top_k=K)
    against = measure_fine_stages(*choosing, bits, top_k=K, database=rows(train, sample),
                                  database_size=len(train[0]))
    truth = measure_fine_stages(*judging, bits, top_k=K, database=train)
    scores, coarse = truth["map_at_k"], truth["coarse"]
    # the choice by the rule alone (the unmeasured fallback of a small split aside)
    picks = {way: choose(rec["map_at_k"], rec["coarse"])
             for way, rec in (("held-out only", held_only), ("against training", against))}
    row = {"run": run.name, "coarse": coarse, "scores": scores,
           "best": max(scores, key=scores.get),
           "choices": {way: {"stage": stage,
                             "map_at_k": coarse if stage == FALLBACK else scores[stage]}
                       for way, stage in picks.items()},
           "choosing": len(choosing[0]), "judging": len(judging[0]),
           "training_sample": len(sample), "database": len(train[0])}
    print(f"{row['run']}: judging {row['judging']} x {row['database']}: coarse {coarse:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    for way, c in row["choices"].items():
        print(f"    {way:17s} chose {c['stage']:10s} -> {c['map_at_k']:.4f}", flush=True)
    return row


def over_runs(doc, bench, argv=None):
    """The command line of a benchmark over run folders: bench(run) for
    each, a row each, the rows written as JSON with --json."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders with db_train.lmdb and db_test.lmdb")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    table = [bench(run) for run in args.runs]
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


def main(argv=None):
    over_runs(__doc__, judge, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
