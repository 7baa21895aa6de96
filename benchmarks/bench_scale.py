#!/usr/bin/env python3
"""Search at real scale and real dimensions: 2.5M images with 4096-value fc7
actually on disk, re-ranked by fc7, by the PCA store, and by PCA then exact
fc7 on the best few hundred; cold and warm; and the cost of opening it.

    .venv/bin/python benchmarks/bench_scale.py --workdir /big/disk/scale    # make bench-scale
    .venv/bin/python benchmarks/bench_scale.py --n 200000 --workdir /tmp/s  # a small trial

What it does, all through the project's own code:
  1. writes a feature database of --n images (FeatureStore.create/append):
     clustered synthetic --bits codes (dlbhc_testing.synthetic) and
     fc7 of --fc7-dim values as --fc7-dtype (default float16: 2.5M x 4096 x
     2 bytes = 20.5 GB; float32 would be 41 GB) from the synthetic pool of
     4096 random rows (values do not change timings); reused when --workdir
     already holds it complete;
  2. gives it a PCA store with `python/compress.py DB --pca 256` (timed);
  3. opens it the way retrieve.py and the service do (retrieval.Retriever)
     in a fresh process, three times: building the search index (first
     open), cold (the database's files dropped from the page cache) and
     warm; each reports its open time and memory (RSS: total, anonymous =
     the process's own arrays, file = mapped pages the kernel can drop);
  4. times single-query searches (HashIndex.search, top --k, the coarse
     stage's default 2k candidates) for: coarse only; fc7 re-rank; PCA
     re-rank; PCA + exact fc7 top --exact-top.  For each, in a fresh
     process (a process's mapped pages stay in the page cache), a cold pass
     (the database's files dropped from the page cache first) then a warm
     pass over the same queries, p50/p99.

"Cold" here: the database's own files (fc7.bin, the PCA rows, data.mdb, the
index cache) are dropped from the page cache with posix_fadvise(DONTNEED)
and fincore checks how much stayed; the machine is shared, so its whole
page cache (/proc/sys/vm/drop_caches) is left alone.  On a virtual machine
the host may still cache the disk's blocks, so a cold read can be faster
than the physical disk.  "Warm": the same
queries again right after, their pages now cached as far as RAM allows.
Record the machine's load with the figures (printed at start and end).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from dlbhc.errors import UserError, run_main
from dlbhc_testing.measure import latency_summary
from dlbhc_testing.synthetic import (FC7_POOL_ROWS, add_cluster_args, fc7_pool,
                                     open_or_write_store, zipf_clustered_codes)

ROOT = Path(__file__).resolve().parents[1]


METHODS = ("coarse", "fc7", "pca", "pca+exact")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="where the database goes (kept for reruns; --clean deletes it)")
    p.add_argument("--n", type=int, default=2_500_000)
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--fc7-dim", type=int, default=4096)
    p.add_argument("--fc7-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--pca", type=int, default=256)
    p.add_argument("--exact-top", type=int, default=200)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=1000)
    add_cluster_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean", action="store_true", help="delete the database at the end")
    p.add_argument("--json", default="out/bench_scale.json")
    p.add_argument("--pass", dest="pass_method", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the page cache -------------------------------------------------------------
def database_files(db):
    db = Path(db)
    files = [f for f in db.iterdir() if f.is_file()]
    index = db.with_name(db.name + ".index.npz")
    return files + ([index] if index.exists() else [])


def drop_from_page_cache(files):
    """posix_fadvise(DONTNEED) on each file (after fdatasync: dirty pages
    cannot be dropped)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(files):
    """Bytes of the files in the page cache (util-linux fincore), or None."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--raw", "--noheadings", "-o", "RES",
                              *map(str, files)], capture_output=True, text=True, check=True)
        return sum(int(x) for x in out.stdout.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def meminfo_mb():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) / 1024
    return {"total": fields["MemTotal"], "available": fields["MemAvailable"],
            "cached": fields["Cached"]}


# ---- opening the database in a fresh process -------------------------------------
OPEN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {python!r})
    t0 = time.perf_counter()
    from dlbhc.serving.retrieval import Query, Retriever
    t1 = time.perf_counter()
    r = Retriever({db!r})
    t2 = time.perf_counter()
    def rss():
        out = {{}}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024
        return out
    opened = rss()
    fc7, codes = r.features_of_ids([0])
    t3 = time.perf_counter()
    r.search([Query("q")], codes, fc7)
    t4 = time.perf_counter()
    print(json.dumps({{"import_s": t1 - t0, "open_s": t2 - t1, "first_query_s": t4 - t3,
                      "rss_open_mb": opened, "rss_after_query_mb": rss(),
                      "rerank": r.rerank}}))
""")


def open_in_fresh_process(db):
    script = OPEN_SCRIPT.format(python=str(ROOT / "python"), db=str(db))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"opening {db} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


# ---- searches -----------------------------------------------------------------------
def time_pass(run, n_queries):
    ms = []
    results = []
    for i in range(n_queries):
        t = time.perf_counter()
        results.append(run(i))
        ms.append((time.perf_counter() - t) * 1e3)
    return ms, results


def database_path(args):
    return Path(args.workdir) / (f"db_n{args.n}_b{args.bits}_d{args.fc7_dim}_"
                                 f"{args.fc7_dtype}.lmdb")


def search_pass(args):
    """One fine stage's cold pass then warm pass over the queries, in this
    (fresh) process; prints the figures as JSON."""
    from dlbhc.serving.retrieval import Retriever
    method = args.pass_method
    _, queries = zipf_clustered_codes(args.n, args.queries, args.bits,
                                      np.random.default_rng([args.seed, args.n, args.bits]),
                                      args.centres, args.zipf, args.mean_flips)
    pool = fc7_pool(args.fc7_dim, np.random.default_rng(args.seed))
    q_fc7 = pool[np.random.default_rng([args.seed, 1]).integers(0, FC7_POOL_ROWS,
                                                                 args.queries)]
    rerank = {"coarse": "fc7", "fc7": "fc7", "pca": "pca", "pca+exact": "pca"}[method]
    retriever = Retriever(database_path(args), rerank=rerank,
                          exact_top=args.exact_top if method == "pca+exact" else 0)
    index, store = retriever.index, retriever.store

    def run(i):
        if method == "coarse":
            return index.coarse(queries[i], 2 * args.k)
        return index.search(queries[i:i + 1], q_fc7[i:i + 1], store.fc7, args.k,
                            reduced=retriever.reduced)[0]
    cold_ms, cold = time_pass(run, args.queries)
    warm_ms, warm = time_pass(run, args.queries)
    result = {"rerank": retriever.rerank if method != "coarse" else "none",
              "cold_ms": latency_summary(cold_ms), "warm_ms": latency_summary(warm_ms),
              "cold_equals_warm": all(np.array_equal(a.ids, b.ids) for a, b in zip(cold, warm))}
    if method != "coarse":
        result["candidates_p50"] = float(np.median([r.candidates for r in warm]))
        if method == "pca+exact":
            result["exact_p50"] = float(np.median([r.exact for r in warm]))
    retriever.close()
    print(json.dumps(result))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.pass_method:
        return search_pass(args)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    row_bytes = args.fc7_dim * np.dtype(args.fc7_dtype).itemsize
    print(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {os.cpu_count()} cores; "
          f"memory {meminfo_mb()['total'] / 1024:.1f} GB; N={args.n}, {args.bits} bits, fc7 "
          f"{args.fc7_dim} x {args.fc7_dtype} = {args.n * row_bytes / 1e9:.1f} GB", flush=True)
    db = database_path(args)
    need = args.n * (row_bytes + 4 * args.pca + 700)
    free = shutil.disk_usage(work).free
    if not db.exists() and free < need * 1.1:
        raise UserError(f"{work} has {free / 1e9:.1f} GB free; the database needs about "
                        f"{need / 1e9:.1f} GB")
    report = {"args": vars(args), "load_start": load0}

    # 1. the database
    codes, queries = zipf_clustered_codes(args.n, args.queries, args.bits,
                                          np.random.default_rng([args.seed, args.n, args.bits]),
                                          args.centres, args.zipf, args.mean_flips)
    pool = fc7_pool(args.fc7_dim, np.random.default_rng(args.seed))
    store, write_s = open_or_write_store(db, args.n, args.fc7_dim, args.bits, codes, pool,
                                         fc7_dtype=args.fc7_dtype)
    store.close()
    del codes
    report["write_s"] = write_s
    print(f"database {db}: {sum(f.stat().st_size for f in database_files(db)) / 1e9:.1f} GB"
          + (f", written in {write_s:.0f} s" if write_s else " (reused)"), flush=True)

    # 2. its PCA store
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "python" / "compress.py"), str(db),
                          "--pca", str(args.pca)], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"compress.py failed:\n{out.stderr[-2000:]}")
    report["compress_s"] = time.perf_counter() - start
    report["compress_stdout"] = out.stdout
    print(out.stdout.strip(), f"({report['compress_s']:.0f} s)", flush=True)

    # 3. opening it: building the index, cold, warm
    index_cache = db.with_name(db.name + ".index.npz")
    index_cache.unlink(missing_ok=True)
    report["open"] = {"build_index": open_in_fresh_process(db)}
    drop_from_page_cache(database_files(db))
    report["open"]["cold_cached_bytes_before"] = cached_bytes(database_files(db))
    report["open"]["cold"] = open_in_fresh_process(db)
    report["open"]["warm"] = open_in_fresh_process(db)
    for name in ("build_index", "cold", "warm"):
        o = report["open"][name]
        print(f"open ({name}): {o['open_s']:.2f} s open + {o['import_s']:.2f} s imports, "
              f"RSS {o['rss_open_mb']['VmRSS']:.0f} MB (anon {o['rss_open_mb']['RssAnon']:.0f}, "
              f"file {o['rss_open_mb']['RssFile']:.0f}); first query {o['first_query_s']:.3f} s",
              flush=True)

    # 4. searches: each fine stage in a fresh process (pages a process has
    # mapped cannot be dropped from the page cache while it maps them)
    report["passes"] = {}
    for method in METHODS:
        files = database_files(db)
        drop_from_page_cache(files)
        before = {"fc7": cached_bytes([db / "fc7.bin"]),
                  "pca": cached_bytes([f for f in files if f.name.startswith("pca-")])}
        out = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--pass", method,
                              "--n", str(args.n), "--bits", str(args.bits),
                              "--fc7-dim", str(args.fc7_dim), "--fc7-dtype", args.fc7_dtype,
                              "--exact-top", str(args.exact_top), "--queries", str(args.queries),
                              "--k", str(args.k), "--centres", str(args.centres),
                              "--zipf", str(args.zipf), "--mean-flips", str(args.mean_flips),
                              "--seed", str(args.seed)], capture_output=True, text=True)
        if out.returncode != 0:
            raise UserError(f"the {method} pass failed:\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["cached_before"] = before
        report["passes"][method] = result
        cold, warm = result["cold_ms"], result["warm_ms"]
        print(f"{method:>10}: cold p50 {cold['p50']:7.2f} p99 {cold['p99']:7.1f} ms | warm p50 "
              f"{warm['p50']:7.2f} p99 {warm['p99']:7.1f} ms | in the page cache before: fc7 "
              f"{(before['fc7'] or 0) / 1e6:.0f} MB, pca {(before['pca'] or 0) / 1e6:.0f} MB"
              + ("" if result["cold_equals_warm"] else "  COLD AND WARM RESULTS DIFFER"),
              flush=True)

    load1 = os.getloadavg()
    report["load_end"] = load1
    report["memory"] = meminfo_mb()
    print(f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.clean:
        shutil.rmtree(db, ignore_errors=True)
        index_cache.unlink(missing_ok=True)
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"results written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
