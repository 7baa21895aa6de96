#!/usr/bin/env python3
"""Evaluate retrieval with the paper's protocol: mAP@k, precision@k,
precision within Hamming radius 2 and precision-recall curves, for the
Hamming ranking (coarse) and the coarse-to-fine fc7 re-ranking (fine).

    python python/evaluate.py --database db/cifar10_train_48.lmdb \
        --queries db/cifar10_test_48.lmdb --out-dir runs/eval_48

Each of --database and --queries is either
  * a .npz file with arrays `codes` (uint8, numpy.packbits of the latent
    bits), `labels` (int), `bits` and, for the fine ranking, `fc7`; or
  * a feature database folder made by extract.py (its fc7 is read through
    the store's memory map, and a database's search index is the one
    retrieve.py caches beside it).
The fine ranking is HashIndex.search, the search retrieve.py runs, with the
same defaults: re-ranked by the database's PCA store when it has one
(compress.py), the best --exact-top again by fc7; --rerank fc7|pca chooses.
An image is relevant to a query when their labels are equal.
--out-dir receives figures.json, precision_at_k.png and precision_recall.png.
"""
import dataclasses
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from dlbhc import cli
from dlbhc.errors import UserError
from dlbhc.progress import Progress
from dlbhc.search import metrics
from dlbhc.search.codes import code_bytes


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--database", required=True, help="database features (.npz or feature db)")
    p.add_argument("--queries", required=True, help="query features (.npz or feature db)")
    p.add_argument("--out-dir", help="write figures.json and the PNG plots here")
    p.add_argument("--no-fine", action="store_true",
                   help="skip the fc7 re-ranking (Hamming ranking only)")
    # The search's options, as retrieve.py spells them; --k and
    # --min-candidates are this script's earlier spellings, still accepted.
    cli.add_search_arguments(p, top_k=metrics.EVALUATION_TOP_K,
                             top_k_help="mAP@k and P@k cut-off, the fine ranking's k",
                             aliases={"top_k": ["--k"], "candidates": ["--min-candidates"]})
    cli.add_rerank_arguments(p)
    p.add_argument("--radius", type=cli.non_negative_int, default=2,
                   help="Hamming radius of the precision-within-radius figure (default 2)")
    args = p.parse_args(argv)
    args.search = cli.search_params(p, args)
    return args


def load_features(path, with_fc7=True, with_index=False, rerank="auto", exact_top=None):
    """{codes, labels, bits, fc7 (or None), index (or None), reduced (or
    None)} from a .npz file or a feature database (fc7 as its memory map;
    with_index: the search index retrieve.py caches beside a database,
    built if missing, and its fine stage as `rerank` and `exact_top` ask)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        return _load_store(path, with_fc7, with_index, rerank, exact_top)
    if path.suffix == ".npz":
        if with_index and rerank == "pca":
            raise UserError(f"--rerank pca needs a feature database with a PCA store "
                            f"(compress.py), not the .npz file {path}")
        return _load_npz(path, with_fc7)
    raise UserError(f"{path}: expected a .npz file or a feature database folder")


def _load_npz(path, with_fc7):
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("codes", "labels", "bits") if name not in data]
            if missing:
                raise UserError(f"{path} lacks the array(s) {', '.join(missing)} "
                                f"(needs codes, labels, bits and optionally fc7)")
            fc7 = data["fc7"] if with_fc7 and "fc7" in data else None
            return {"codes": data["codes"], "labels": data["labels"],
                    "bits": int(data["bits"]), "fc7": fc7, "index": None, "reduced": None}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path}: {err}") from err


def _load_store(path, with_fc7, with_index, rerank, exact_top):
    from dlbhc.serving.retrieval import Retriever
    from dlbhc.store.database import FeatureStore
    reduced = None
    if with_index:
        retriever = Retriever(path, rerank=rerank, exact_top=exact_top)
        store, index, reduced = retriever.store, retriever.index, retriever.reduced
    else:
        store, index = FeatureStore.open(path), None
    try:
        if store.count == 0:
            raise UserError(f"{path} holds no images")
        if store.removed_count:
            # Removed images are not evaluated: the live rows only (their
            # fc7 read into memory; compact a large database first).
            live = store.live_rows()
            if reduced is not None:
                reduced = dataclasses.replace(reduced, rows=np.asarray(reduced.rows[live]))
            return {"codes": store.codes()[live], "labels": store.labels()[live],
                    "bits": store.bits, "index": None, "reduced": reduced,
                    "fc7": np.asarray(store.fc7_rows()[live]) if with_fc7 else None}
        return {"codes": store.codes(), "labels": store.labels(), "bits": store.bits,
                "fc7": store.fc7_rows() if with_fc7 else None, "index": index,
                "reduced": reduced}
    finally:
        store.close()


def check_pair(db, queries, db_path, q_path):
    if db["bits"] != queries["bits"]:
        raise UserError(f"{db_path} has {db['bits']}-bit codes, {q_path} {queries['bits']}-bit")
    for feats, where in ((db, db_path), (queries, q_path)):
        if len(feats["codes"]) == 0:
            raise UserError(f"{where} holds no images")
        if feats["codes"].ndim != 2 or feats["codes"].shape[1] != code_bytes(feats["bits"]):
            raise UserError(f"{where}: codes of shape {feats['codes'].shape} are not "
                            f"packed {feats['bits']}-bit codes")
        if len(feats["labels"]) != len(feats["codes"]):
            raise UserError(f"{where}: {len(feats['labels'])} labels for "
                            f"{len(feats['codes'])} codes")
    if np.any(np.asarray(queries["labels"]) < 0):
        raise UserError(f"{q_path}: some queries have no label (-1): evaluation needs "
                        "labelled queries")


def main(argv=None):
    args = parse_args(argv)
    db = load_features(args.database, with_fc7=not args.no_fine, with_index=not args.no_fine,
                       rerank=args.rerank, exact_top=args.exact_top)
    queries = load_features(args.queries, with_fc7=not args.no_fine)
    check_pair(db, queries, args.database, args.queries)
    fine = not args.no_fine and db["fc7"] is not None and queries["fc7"] is not None
    if not args.no_fine and not fine:
        print("no fc7 in the inputs: evaluating the Hamming ranking only", file=sys.stderr)

    progress = Progress(len(queries["codes"]), label="evaluating", unit="query", interval=5)
    try:
        results = metrics.evaluate(
            db["codes"], db["labels"], queries["codes"], queries["labels"],
            db_fc7=db["fc7"] if fine else None, q_fc7=queries["fc7"] if fine else None,
            params=args.search, bits=db["bits"], radius=args.radius, progress=progress,
            index=db["index"], reduced=db["reduced"])
    except ValueError as err:
        raise UserError(str(err)) from err
    progress.close()
    results["database"] = str(args.database)
    results["queries"] = str(args.queries)

    print(metrics.format_table(results))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.json").write_text(json.dumps(results, indent=1))
        metrics.plot_precision_at_k(results, out / "precision_at_k.png")
        metrics.plot_precision_recall(results, out / "precision_recall.png")
        print(f"figures and plots written to {out}/")
    return 0


if __name__ == "__main__":
    cli.run(main)
