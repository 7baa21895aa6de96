#!/usr/bin/env python3
"""Codes without labels: ITQ against LSH and PCA-sign (a benchmark, not a test).

The backbone's pooled features (EfficientNet-Lite0's fc7: 1280 values, the
frozen net with BatchNorm folded, exactly what the unsupervised recipe fits
on) of a database and a query set; each hash (search.itq: ITQ, PCA-sign,
LSH; seeded) is fitted on the database's features alone, labels used only
to evaluate. For 12, 48 and 128 bits, mAP@1000 (metrics.evaluate, the
project's search): the Hamming ranking (coarse), and coarse-to-fine (the
default candidates, 2 x 1000, re-ranked by the pooled features' L2); the
same candidates re-ranked by the latent activations (the sigmoid of the
projection: what the net's latent layer stores), the queries' latent
against the database's code bits, and the Hamming order with the latent as
tie-break (search.choice's "latent", "asymmetric" and "none"); and the exact
L2 ranking over the same features (every image a candidate).

    # CIFAR-10: a seeded subset (10,000 database + 1,000 queries, 160 px)
    .venv/bin/python benchmarks/bench_unsupervised.py cifar --database 10000 --queries 1000 --size 160
    .venv/bin/python benchmarks/bench_unsupervised.py cifar --full --size 128   # all 50,000 + 10,000
    # the photo set (make photos): the held-out split of train.py (10% of each class)
    .venv/bin/python benchmarks/bench_unsupervised.py photos --data data/photos/gcompris-categorization

Features are computed once and kept in --cache (default data/features/).
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dlbhc.datasets.collection import load_collection
from dlbhc.errors import run_main
from dlbhc.images import list_images
from dlbhc.nets.backbones import DEFAULT_BACKBONE
from dlbhc.search.choice import LATENT_STAGES, stage_rows
from dlbhc.search.codes import pack_codes
from dlbhc.search.itq import FITTERS
from dlbhc.search.metrics import evaluate
from dlbhc.search.params import SearchParams
from dlbhc.training.unsupervised import UnsupervisedRecipe

ROOT = Path(__file__).resolve().parents[1]
BITS = (12, 48, 128)
K = 1000


def sample(items, n, seed):
    if n is None or n >= len(items):
        return list(items)
    return random.Random(seed).sample(list(items), n)


def pooled(items, size, workers, cache, tag):
    """(features, labels) of the readable items, cached in cache/tag.npz."""
    path = Path(cache) / f"{tag}.npz"
    if path.exists():
        data = np.load(path)
        return data["features"], data["labels"]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = UnsupervisedRecipe(DEFAULT_BACKBONE, 48, items, Path(tmp), "bench", size=size,
                                    resize=size, workers=workers)
        started = time.monotonic()
        features, kept, _ = recipe.pooled_features(Path(tmp))
        print(f"{tag}: {len(kept)} images in {time.monotonic() - started:.0f} s")
    labels = np.array([items[i].label for i in kept])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=features, labels=labels)
    return features, labels


def latent_of(hash_, x):
    return (1.0 / (1.0 + np.exp(-hash_.project(x)))).astype(np.float32)


def run(db, db_labels, q, q_labels, seed):
    """{method: {bits: {coarse, fine}}} and the exact L2 mAP@K."""
    figures = {}
    for name, fit in FITTERS.items():
        for bits in BITS:
            hash_ = fit(db, bits, seed=seed) if name != "pca-sign" else fit(db, bits)
            # the latent activations the net stores: the sigmoid of the projection
            db_latent, q_latent = (latent_of(hash_, x) for x in (db, q))
            stages = {stage: (stage_rows(stage, db_latent), q_latent) for stage in LATENT_STAGES}
            result = evaluate(pack_codes(hash_.codes(db)), db_labels, pack_codes(hash_.codes(q)),
                              q_labels, db_fc7=db, q_fc7=q, params=SearchParams(top_k=K),
                              bits=bits, fine_stages=stages)
            row = {"coarse": round(result["coarse"]["map_at_k"], 4),
                   "fine": round(result["fine"]["map_at_k"], 4)}
            row.update({stage: round(result["fine_stages"][stage]["map_at_k"], 4)
                        for stage in LATENT_STAGES})
            figures.setdefault(name, {})[bits] = row
            print(f"{name:8s} {bits:3d} bits: coarse {row['coarse']:.4f}  coarse-to-fine "
                  f"(pooled L2) {row['fine']:.4f}  latent re-rank {row['latent']:.4f}  "
                  f"latent to codes {row['asymmetric']:.4f}  "
                  f"Hamming + latent tie-break {row['none']:.4f}", flush=True)
    # every image a candidate: the fine stage ranks the whole database by L2
    exact = evaluate(pack_codes(np.zeros((len(db), 8), bool)), db_labels,
                     pack_codes(np.zeros((len(q), 8), bool)), q_labels, db_fc7=db, q_fc7=q,
                     params=SearchParams(top_k=K, candidates=len(db)), bits=8)
    figures["exact_l2"] = round(exact["fine"]["map_at_k"], 4)
    print(f"exact L2 over the pooled features: {figures['exact_l2']:.4f}")
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", choices=["cifar", "photos"])
    p.add_argument("--data", help="photos: the photo folder (make photos); cifar: data/cifar10")
    p.add_argument("--database", type=int, default=10000, help="CIFAR-10 database images")
    p.add_argument("--queries", type=int, default=1000, help="CIFAR-10 queries")
    p.add_argument("--full", action="store_true", help="all of CIFAR-10: 50,000 database + 10,000 queries")
    p.add_argument("--size", type=int, default=224, help="backbone input side (x32)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / "data" / "features"))
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    if args.set == "cifar":
        folder = Path(args.data or ROOT / "data" / "cifar10")
        n_db, n_q = (None, None) if args.full else (args.database, args.queries)
        size = args.size
        db_items = sample(list_images(folder / "train.txt").items, n_db, args.seed)
        q_items = sample(list_images(folder / "test.txt").items, n_q, args.seed + 1)
        tag = f"bench_unsup_cifar_{size}_s{args.seed}"
        db, db_labels = pooled(db_items, size, args.workers, args.cache,
                               f"{tag}_db{len(db_items)}")
        q, q_labels = pooled(q_items, size, args.workers, args.cache, f"{tag}_q{len(q_items)}")
    else:
        if not args.data:
            p.error("photos: pass --data FOLDER (make photos)")
        size = args.size
        coll = load_collection(args.data)
        db, db_labels = pooled(coll.train, size, args.workers, args.cache,
                               f"bench_unsup_photos_{size}_db{len(coll.train)}")
        q, q_labels = pooled(coll.test, size, args.workers, args.cache,
                             f"bench_unsup_photos_{size}_q{len(coll.test)}")
    print(f"{args.set}: {len(db)} database, {len(q)} queries, {size} px, "
          f"{db.shape[1]} pooled features; mAP@{K}")
    figures = run(db, db_labels, q, q_labels, args.seed)
    figures.update(set=args.set, database=len(db), queries=len(q), size=size)
    itq, lsh = figures["itq"][48], figures["lsh"][48]
    print(f"bars at 48 bits: ITQ coarse {itq['coarse']:.4f} vs LSH {lsh['coarse']:.4f} "
          f"(+{itq['coarse'] - lsh['coarse']:.4f}, bar +0.05); ITQ coarse-to-fine "
          f"{itq['fine']:.4f} vs exact L2 {figures['exact_l2']:.4f} "
          f"({itq['fine'] - figures['exact_l2']:+.4f}, bar within 0.02)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(run_main(main))
