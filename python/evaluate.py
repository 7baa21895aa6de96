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
same defaults: --rerank auto takes the fine stage train.py recorded for the
model (rerank.json beside its weights); a model without that record is
re-ranked by the database's PCA store when it has one (compress.py), else
by fc7, and the script says so.  Every other fine stage the inputs allow
(fc7, latent, pca, none = Hamming order with latent tie-break) is measured
and printed too ("also:" rows).  A .npz input may hold `latent` (float32)
for the latent stages.  An image is relevant to a query when their labels
are equal.
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
from dlbhc.search.choice import LATENT_STAGES
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
        if with_index and rerank not in ("auto", "fc7"):
            raise UserError(f"--rerank {rerank} needs a feature database (its latent rows, "
                            f"its PCA store), not the .npz file {path}")
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
            latent = data["latent"] if with_fc7 and "latent" in data else None
            return {"codes": data["codes"], "labels": data["labels"],
                    "bits": int(data["bits"]), "fc7": fc7, "latent": latent, "index": None,
                    "reduced": None, "stage": "fc7", "stages": {},
                    "note": "a .npz database has no model record: re-ranking by fc7"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path}: {err}") from err


def _load_store(path, with_fc7, with_index, rerank, exact_top):
    from dlbhc.serving.retrieval import Retriever
    from dlbhc.store.database import FeatureStore
    reduced, stage, note, stages = None, "fc7", None, {}
    if with_index:
        retriever = Retriever(path, rerank=rerank, exact_top=exact_top)
        store, index, reduced = retriever.store, retriever.index, retriever.reduced
        stage, note = retriever.stage, retriever.auto_note
        stages = other_stages(retriever, exact_top)
    else:
        store, index = FeatureStore.open(path), None
    try:
        if store.count == 0:
            raise UserError(f"{path} holds no images")
        result = {"bits": store.bits, "reduced": reduced, "stage": stage, "note": note,
                  "stages": stages}
        if store.removed_count:
            # Removed images are not evaluated: the live rows only (their
            # fc7 read into memory; compact a large database first), with
            # an index of their own (metrics builds it).
            live = store.live_rows()
            only_live = lambda r: None if r is None else dataclasses.replace(
                r, rows=r.rows if r.rows is None else np.asarray(
                    r.rows(live) if callable(r.rows) else r.rows[live]))
            result.update(reduced=only_live(reduced), index=None,
                          stages={name: only_live(r) for name, r in stages.items()},
                          codes=store.codes()[live], labels=store.labels()[live],
                          fc7=np.asarray(store.fc7_rows()[live]) if with_fc7 else None,
                          latent=store.latent(live) if with_fc7 else None)
            return result
        result.update(codes=store.codes(), labels=store.labels(), index=index,
                      fc7=store.fc7_rows() if with_fc7 else None,
                      latent=store.latent(np.arange(store.count)) if with_fc7 else None)
        return result
    finally:
        store.close()


def other_stages(retriever, exact_top):
    """{name: rerank.ReducedRows (None: fc7)} of the candidate fine stages
    (search.choice.CANDIDATES) the database offers besides the one chosen."""
    from dlbhc.search.choice import CANDIDATES, stage_rows
    from dlbhc.search.rerank import DEFAULT_EXACT_TOP
    stages = {}
    for name in CANDIDATES:
        if name == retriever.stage or (name == "pca" and retriever.store.pca_record is None):
            continue
        if name == "pca":
            stages[name] = stage_rows(name, projection=retriever.store.projection(),
                                      pca_rows=retriever.store.pca_rows(),
                                      exact_top=DEFAULT_EXACT_TOP if exact_top is None
                                      else exact_top)
        else:
            stages[name] = stage_rows(name, latent=retriever.latent_rows())
    return stages


def fine_stage_inputs(db, queries):
    """The main fine stage's (reduced, query rows) and the others' {name:
    (reduced, query rows)}, leaving out the latent stages when the queries
    (or the database) have no latent rows."""
    def query_rows(reduced):
        return queries["latent"] if reduced is not None and reduced.project is None else None
    has_latent = queries.get("latent") is not None
    others = {name: (reduced, query_rows(reduced)) for name, reduced in db["stages"].items()
              if has_latent or name not in LATENT_STAGES}
    main = db["reduced"]
    if main is not None and main.project is None and main.rows is not None and not has_latent:
        raise UserError(f"the {db['stage']} fine stage needs the queries' latent activations: "
                        "give queries as a feature database (or a .npz with `latent`)")
    return (main, query_rows(main)), others


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

    (main, q_rows), others = fine_stage_inputs(db, queries) if fine else ((None, None), {})
    if fine and Path(args.database).suffix == ".npz":
        print(db["note"], file=sys.stderr)   # (a database's is logged as it opens)
    progress = Progress(len(queries["codes"]), label="evaluating", unit="query", interval=5)
    try:
        results = metrics.evaluate(
            db["codes"], db["labels"], queries["codes"], queries["labels"],
            db_fc7=db["fc7"] if fine else None, q_fc7=queries["fc7"] if fine else None,
            params=args.search, bits=db["bits"], radius=args.radius, progress=progress,
            index=db["index"], reduced=main, q_reduced=q_rows, fine_stages=others)
    except ValueError as err:
        raise UserError(str(err)) from err
    progress.close()
    results["database"] = str(args.database)
    results["queries"] = str(args.queries)
    if fine:
        results["fine"]["stage"], results["rerank_note"] = db["stage"], db["note"]

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
