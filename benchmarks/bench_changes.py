#!/usr/bin/env python3
"""A collection that changes: removal, search after removal, compaction and
an unchanged --sync, timed on synthetic data.

    .venv/bin/python benchmarks/bench_changes.py                   # N = 1M, 100k files
    .venv/bin/python benchmarks/bench_changes.py --size 2500000 --sync-files 0

remove   a feature database of --size images (synthetic codes as
         bench_search's, fc7 rows of --fc7-dim values from a fixed pool,
         written by FeatureStore) loses --remove random images by
         `extract.py --remove ID...` (process start, lock, open, check,
         one transaction), timed as a user runs it: seconds; then a Retriever's refresh
         (what the service runs: the index of the live images rebuilt from
         the codes), seconds.
search   then 10% of the images are removed in all (in a subprocess; the
         Retriever's refresh timed again); the index before (all images)
         and after (the live ones) answer the same --queries queries
         through HashIndex.search over the store's fc7 rows (top --k),
         alternating query by query so machine load hits both alike:
         p50 / p99.  Bar: p50 after within 10% of before.
compact  store.compact of that database, timed, with a thread sampling
         the disk held by the new copy beside it (allocated blocks) every
         0.1 s: peak extra disk against the old database's size.  Bar: at
         most one copy.
sync     (--sync-files F, needs Caffe and the demo net) F tiny PNG files in
         10 class folders, and a database whose records name them with
         their size and mtime (fc7 random: no forward is timed), made for
         the demo net; then `extract.py FOLDER --out DB --sync` as a user
         runs it, timed end to end (net loading included).  Bar: under
         30 s, and it changes nothing (the summary line and the revision).

The figures are printed and written to --json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dlbhc.serving.retrieval import Retriever
from dlbhc.store import FeatureStore, compact
from dlbhc_testing.measure import latency_summary
from dlbhc_testing.synthetic import fc7_pool, open_or_write_store, zipf_clustered_codes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo" / "cifar_hash48"
# A 1x1 PNG (67 bytes): the smallest file list_images takes as an image.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")


def disk_bytes(path):
    """Allocated bytes of the files under path (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


REMOVE_NPY = """
import sys, numpy as np
from dlbhc.extraction import remove_images
remove_images(sys.argv[1], [str(i) for i in np.load(sys.argv[2])])
"""


def bench_remove_search_compact(args, workdir, out):
    n, rng = args.size, np.random.default_rng(args.seed)
    codes, q_codes = zipf_clustered_codes(n, args.queries, args.bits, rng)
    pool = fc7_pool(args.fc7_dim, np.random.default_rng(args.seed))
    db = workdir / f"changes_n{n}"
    if db.exists():
        shutil.rmtree(db)
    for stale in workdir.glob(db.name + ".*"):
        stale.unlink() if stale.is_file() else shutil.rmtree(stale)
    store, write_s = open_or_write_store(db, n, args.fc7_dim, args.bits, codes, pool)
    store.close()
    q_fc7 = pool[rng.integers(0, len(pool), args.queries)]
    # One LMDB environment per database per process: removals run in a
    # subprocess, as extract.py --remove does beside a running service.
    follower = Retriever(db, rerank="fc7")        # follows the removals, as serve.py's
    full = follower.index
    print(f"N={n}: store written in {write_s:.0f} s; index built")
    victims = rng.permutation(n)
    command = [sys.executable, str(ROOT / "python" / "extract.py"), "--out", str(db), "--remove",
               *[str(i) for i in victims[:args.remove]]]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    out["remove_s"] = time.perf_counter() - start
    start = time.perf_counter()
    assert follower.refresh()
    out["refresh_s"] = time.perf_counter() - start
    print(f"extract.py --remove of {args.remove} of {n} ids: {out['remove_s']:.2f} s; the "
          f"service's index followed in {out['refresh_s']:.2f} s")
    rest = victims[args.remove:n // 10]
    np.save(workdir / "rest.npy", rest)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", REMOVE_NPY, str(db), str(workdir / "rest.npy")],
                   check=True)
    out["remove_10pct_s"] = time.perf_counter() - start
    start = time.perf_counter()
    assert follower.refresh()
    out["refresh_10pct_s"] = time.perf_counter() - start
    live, store = follower.index, follower.store
    print(f"removed {len(rest)} more (10% in all) in {out['remove_10pct_s']:.2f} s; "
          f"index followed in {out['refresh_10pct_s']:.2f} s")
    k = args.k
    times = {"full": [], "live": []}
    for i in range(args.queries):          # warm both (pages, code paths)
        for index in (full, live):
            index.search(q_codes[i:i + 1], q_fc7[i:i + 1], store.fc7, k)
    for i in range(args.queries):
        pair = [("full", full), ("live", live)]
        if i % 2:
            pair.reverse()
        for name, index in pair:
            start = time.perf_counter()
            index.search(q_codes[i:i + 1], q_fc7[i:i + 1], store.fc7, k)
            times[name].append(1000 * (time.perf_counter() - start))
    out["search_before_ms"] = latency_summary(times["full"])
    out["search_after_ms"] = latency_summary(times["live"])
    out["p50_ratio"] = out["search_after_ms"]["p50"] / out["search_before_ms"]["p50"]
    print(f"search p50 before {out['search_before_ms']['p50']:.2f} ms, after removing 10% "
          f"{out['search_after_ms']['p50']:.2f} ms (ratio {out['p50_ratio']:.3f})")
    follower.close()

    old_bytes = disk_bytes(db)
    peak, done = [0], threading.Event()

    def sample():
        new = db.with_name(db.name + ".compacting")
        while not done.is_set():
            peak[0] = max(peak[0], disk_bytes(new))
            time.sleep(0.1)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    compact(db)
    out["compact_s"] = time.perf_counter() - start
    done.set()
    watcher.join()
    out.update(compact_old_bytes=old_bytes, compact_peak_extra_bytes=peak[0],
               compact_new_bytes=disk_bytes(db))
    print(f"compacted in {out['compact_s']:.1f} s: old {old_bytes / 1e9:.2f} GB, peak extra "
          f"{peak[0] / 1e9:.2f} GB ({peak[0] / old_bytes:.2f} copies), new "
          f"{out['compact_new_bytes'] / 1e9:.2f} GB")
    shutil.rmtree(db)


def bench_sync(args, workdir, out):
    from dlbhc.nets.model import HashNet
    from dlbhc.search.codes import pack_codes
    deploy = ROOT / "prototxt" / "cifar_hash48_deploy.prototxt"
    weights = Path(args.demo) / "cifar_hash48.caffemodel"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run `make demo` first (or --sync-files 0)")
    folder, db = workdir / "sync_files", workdir / "sync_db"
    for path in (folder, db):
        if path.exists():
            shutil.rmtree(path)
    start = time.perf_counter()
    paths = []
    for i in range(args.sync_files):
        path = folder / f"class{i % 10}" / f"{i:07d}.png"
        if i < 10:
            path.parent.mkdir(parents=True)
        path.write_bytes(TINY_PNG)
        paths.append(path)
    print(f"{args.sync_files} files written in {time.perf_counter() - start:.1f} s")
    net = HashNet(str(deploy), str(weights), None)
    store = FeatureStore.create(db, dict(net.describe(), fc7_dtype="float32"))
    rng = np.random.default_rng(0)
    for lo in range(0, len(paths), 50_000):
        part = paths[lo:lo + 50_000]
        latent = rng.random((len(part), net.bits)).astype(np.float32)
        infos = []
        for j, path in enumerate(part):
            st = path.stat()
            infos.append({"path": str(path.resolve()), "label": (lo + j) % 10, "seq": lo + j,
                          "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        store.append(rng.random((len(part), net.fc7_dim)).astype(np.float32), latent,
                     pack_codes(latent), infos)
    revision = store.revision()
    store.close()
    command = [sys.executable, str(ROOT / "python" / "extract.py"), str(folder), "--out", str(db),
               "--sync", "--deploy", str(deploy), "--weights", str(weights)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    out["sync_unchanged_s"] = time.perf_counter() - start
    with FeatureStore.open(db) as store:
        out["sync_changed_nothing"] = store.revision() == revision and proc.returncode == 0 \
            and f"added 0, re-extracted 0 changed, removed 0 vanished, {len(paths)} unchanged" \
            in proc.stdout
    out["sync_files"] = len(paths)
    print(proc.stdout.strip() or proc.stderr[-2000:])
    print(f"--sync on {len(paths)} unchanged files: {out['sync_unchanged_s']:.1f} s, "
          f"changed nothing: {out['sync_changed_nothing']}")
    shutil.rmtree(folder)
    shutil.rmtree(db)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="images (0: skip)")
    p.add_argument("--remove", type=int, default=10_000, help="ids removed first")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--fc7-dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--sync-files", type=int, default=100_000, help="files (0: skip)")
    p.add_argument("--demo", default=str(DEMO),
                   help="make demo's run folder, whose net --sync loads (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where databases are written (default: a temp folder)")
    p.add_argument("--json", default="out/bench_changes.json")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_changes_"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"size": args.size, "bits": args.bits, "fc7_dim": args.fc7_dim,
           "load_average": os.getloadavg()}
    if args.size:
        bench_remove_search_compact(args, workdir, out)
    if args.sync_files:
        bench_sync(args, workdir, out)
    out["load_average_after"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"figures in {args.json}")


if __name__ == "__main__":
    main()
