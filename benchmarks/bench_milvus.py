#!/usr/bin/env python3
"""Search on Milvus against the local index (a benchmark, not a test).

    .venv/bin/python benchmarks/bench_milvus.py                    # 1M codes, ~15 min
    .venv/bin/python benchmarks/bench_milvus.py --n 100000 --queries 50
    .venv/bin/python benchmarks/bench_milvus.py --db DB --query-db QDB   # a real database

Synthetic data (default): dlbhc_testing.synthetic's generator (Zipf-sized
clusters of codes, fc7 rows from a pool of 4096, so re-rank ties are common), N
images of --bits bits with --fc7-dim re-rank values, written with the
feature store; or a real database (--db, queries taken from --query-db's
codes and fc7, e.g. CIFAR-10's test set).  A Milvus standalone server (the
PyPI `milvus` package) is started on this machine with its data under
--workdir, the database loaded with index_milvus's loader (BIN_FLAT unless
--index), then the same queries go, one at a time and alternating, through
HashIndex.search (the local index over the store's memory-mapped fc7) and
MilvusIndex.search (coarse stage on Milvus, the candidates' vectors fetched
from it, the same fine stage).  Every answer pair is compared: with an exact
Milvus index they must be equal (ids, distances, candidate counts).  Prints
p50/p99 latencies in ms and writes JSON.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dlbhc.search.index import HashIndex
from dlbhc.search.params import default_min_candidates
from dlbhc.scale.milvus_index import MilvusCollection, load_database
from dlbhc.progress import Progress
from dlbhc.store.database import FeatureStore
from dlbhc_testing.measure import latency_summary
from dlbhc_testing.synthetic import (add_cluster_args, fc7_pool, open_or_write_store,
                                     zipf_clustered_codes)



def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic database size")
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--fc7-dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=1000)
    add_cluster_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", help="a real feature database instead of synthetic data")
    p.add_argument("--query-db", help="queries: codes and fc7 of this database's images")
    p.add_argument("--index", choices=["BIN_FLAT", "BIN_IVF_FLAT"], default="BIN_FLAT")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--workdir", default="/tmp/dlbhc-bench-milvus",
                   help="synthetic store and Milvus data (deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default="out/bench_milvus.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from milvus import MilvusServer, MilvusServerConfig
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    if args.db:
        store = FeatureStore.open(args.db)
        with FeatureStore.open(args.query_db or args.db) as qdb:
            pick = np.sort(rng.choice(qdb.count, min(args.queries, qdb.count), replace=False))
            q_codes, q_fc7 = qdb.code_rows(pick), qdb.fc7(pick)
        what = f"{args.db} ({store.count} images, {store.bits} bits, fc7 {store.fc7_dim})"
    else:
        codes, q_codes = zipf_clustered_codes(args.n, args.queries, args.bits, rng, args.centres,
                                              args.zipf, args.mean_flips)
        pool = fc7_pool(args.fc7_dim, rng)
        store, _ = open_or_write_store(work / "store.lmdb", args.n, args.fc7_dim, args.bits,
                                       codes, pool)
        q_fc7 = pool[rng.integers(0, len(pool), args.queries)]
        what = (f"synthetic N={args.n} ({args.bits} bits, fc7 {args.fc7_dim}, "
                f"{args.centres} Zipf({args.zipf}) clusters)")
    local = HashIndex.build(store.codes(), store.bits)
    server = MilvusServer(MilvusServerConfig(data_dir=str(work / "milvus")))
    started = time.perf_counter()
    server.start()
    figures = {"data": what, "queries": len(q_codes), "k": args.k, "index": args.index,
               "milvus_start_s": round(time.perf_counter() - started, 1),
               "load_avg_before": os.getloadavg()}
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        started = time.perf_counter()
        progress = Progress(store.count, label="milvus load", unit="img", interval=10)
        load_database(store, uri, "bench", index_type=args.index, nlist=args.nlist,
                      nprobe=args.nprobe, replace=True, progress=progress)
        progress.close()
        figures["load_s"] = round(time.perf_counter() - started, 1)
        collection = MilvusCollection(uri, "bench")
        # one warm-up pass each (page cache, Milvus segment caches), checked
        times = {"local": [], "milvus": [], "milvus_coarse": []}
        mismatches = 0
        for i in range(len(q_codes)):
            q, f = q_codes[i:i + 1], q_fc7[i:i + 1]
            for timed in (False, True):
                t = time.perf_counter()
                a = local.search(q, f, store.fc7, args.k)
                t_local = time.perf_counter() - t
                t = time.perf_counter()
                collection.index.coarse_many(q, default_min_candidates(args.k))
                t_coarse = time.perf_counter() - t
                t = time.perf_counter()
                b = collection.index.search(q, f, collection.fc7, args.k)
                t_milvus = time.perf_counter() - t
                if timed:
                    times["local"].append(1000 * t_local)
                    times["milvus"].append(1000 * t_milvus)
                    times["milvus_coarse"].append(1000 * t_coarse)
                elif not (np.array_equal(a.ids, b.ids) and np.array_equal(a.l2, b.l2)
                          and np.array_equal(a.candidates, b.candidates)):
                    mismatches += 1
        collection.close()
        figures.update({name: latency_summary(ms) for name, ms in times.items()})
        figures["answers_equal"] = len(q_codes) - mismatches
        figures["load_avg_after"] = os.getloadavg()
    finally:
        server.stop()
        store.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{what}; top-{args.k}, {len(q_codes)} queries one at a time, Milvus {args.index}")
    print(f"Milvus start {figures['milvus_start_s']} s, load {figures['load_s']} s")
    for name, label in (("local", "local index (HashIndex.search)"),
                        ("milvus", "Milvus (coarse there + vectors fetched + fine here)"),
                        ("milvus_coarse", "  of which Milvus coarse stage alone")):
        s = figures[name]
        print(f"{label:55s} p50 {s['p50']:8.2f} ms  p99 {s['p99']:8.2f} ms")
    print(f"answers equal to the local index's: {figures['answers_equal']} of {len(q_codes)}")
    print(f"load average before/after: {figures['load_avg_before']} / "
          f"{figures['load_avg_after']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["answers_equal"] == len(q_codes) or args.index != "BIN_FLAT" else 1


if __name__ == "__main__":
    sys.exit(main())
