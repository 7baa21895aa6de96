#!/usr/bin/env python3
"""Query server benchmark: python/serve.py under concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py --cifar-db runs/demo/cifar_hash48/db_train.lmdb
    .venv/bin/python benchmarks/bench_serve.py --sizes 100000 --clients 1,8 --seconds 3
    .venv/bin/python benchmarks/bench_serve.py --cifar-db DB --blas-table   # 1 vs 2 BLAS threads

serve.py runs in a process of its own (as users run it); this process is the
load: C client threads, each with one keep-alive HTTP connection, send
queries back to back for --seconds after 2 s of warm-up (a closed loop:
C requests are always in flight); the database's files are read once
before its first configuration.  Per configuration: queries/s, latency
p50/p99 (ms) as the clients see it, the server's resident memory
afterwards (its net worker processes included), and this load generator's
own CPU share, which the 2 cores also had to carry, and the server's CPU
time per request ("cpu ms": user + system of the server and its children
over the run, warm-up included, divided by the requests answered), which
other work on the machine inflates far less than it does latencies.

Databases
  synthetic  N images x --bits, the codes and fc7 rows of
             dlbhc_testing.synthetic's generator and store writer (its
             default cluster settings; fc7 width chosen as bench_search.py
             does: 256 values at 2.5M); no net (serve.py --no-net): by-id
             queries.
  cifar      a CIFAR-10 database made by extract.py (--cifar-db; `make demo`
             makes runs/demo/cifar_hash48/db_train.lmdb): by-id queries and
             uploads of its own JPEGs (re-encoded CIFAR-10, as on the
             project's machines), with the server run three ways (--setups):
             one process with the net in a thread ("thread"), the nets in
             two worker processes (--net-processes 2, "net2"), two whole
             server processes each with its index and net (--workers 2,
             "workers2"); and "mixed": 8 by-id clients while 8 upload clients
             run, which shows what a forward holding the server's GIL does
             to searches that need no net.  The synthetic database is served
             with --workers 1 and 2 (--workers).

Uploads are bounded by the net's forward: before the server starts, this
process times HashNet.forward_crops on one crop (median of 50) with the
database's own net, and the table states upload p50 minus that figure as
the overhead (HTTP, decode, queueing, search).  Every query asks top_k
1000 (--top-k).  The bar of issue 11: by-id top-1000 at 2.5M, 8 clients,
p50 <= 15 ms.
"""
import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dlbhc.errors import UserError, run_main
from dlbhc_testing import synthetic
from dlbhc_testing.server import Server, multipart

BAR_MS = 15.0
# How the server runs for the CIFAR-10 database: serve.py's options.
SETUPS = {"thread": [], "net2": ["--net-processes", 2], "workers2": ["--workers", 2]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2500000", help="synthetic database sizes (default "
                   "%(default)s; '' for none)")
    p.add_argument("--bits", type=int, default=128, help="synthetic code length")
    p.add_argument("--cifar-db", help="a CIFAR-10 database made by extract.py (skipped if absent)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients (default %(default)s)")
    p.add_argument("--workers", default="1,2",
                   help="serve.py --workers settings for the synthetic database")
    p.add_argument("--setups", default="thread,net2,workers2",
                   help="how the CIFAR-10 server runs: thread (one net in a thread of the "
                        "one server process), net2 (--net-processes 2), workers2 (--workers 2, "
                        "a net in each); default %(default)s")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per configuration")
    p.add_argument("--top-k", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the synthetic store is written (default: a temp "
                                     "folder, deleted at the end); kept and reused if given")
    p.add_argument("--json", default="out/bench_serve.json", help="results file")
    p.add_argument("--blas-table", action="store_true",
                   help="only time the --cifar-db net's forward with 1 and 2 BLAS threads "
                        "(batches 1, 8, 32) and exit")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
        args.clients = [int(c) for c in args.clients.split(",")]
        args.workers = [int(c) for c in args.workers.split(",")]
    except ValueError:
        raise UserError("--sizes, --clients and --workers take comma-separated "
                        "integers") from None
    args.setups = args.setups.split(",")
    unknown = [name for name in args.setups if name not in SETUPS]
    if unknown:
        raise UserError(f"--setups: unknown {unknown}; choose from {', '.join(SETUPS)}")
    if args.seconds <= 0 or min(args.clients) < 1 or args.top_k < 1:
        raise UserError("--seconds, --clients and --top-k must be positive")
    return args


# ---- the load ------------------------------------------------------------------

class Client:
    """One keep-alive connection; request() -> (status, ms, Server-Timing)."""

    def __init__(self, url):
        host, port = url.split("//")[1].strip("/").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def request(self, method, path, body=None, headers=None):
        start = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        response.read()
        ms = 1000 * (time.perf_counter() - start)
        return response.status, ms, response.getheader("Server-Timing")


def make_requests(kind, rng, count, top_k, uploads):
    """A function i -> (method, path, body, headers) for query i of a client."""
    if kind == "id":
        ids = rng.integers(0, count, 100_000)
        return lambda i: ("GET", f"/api/search?id={ids[i % len(ids)]}&top_k={top_k}", None, None)
    bodies = []
    for name, data in uploads:
        body, content_type = multipart([("image", name, data)])
        bodies.append((body, {"Content-Type": content_type}))
    order = rng.integers(0, len(bodies), 100_000)
    return lambda i: ("POST", f"/api/search?top_k={top_k}", *bodies[order[i % len(order)]])


def load(url, groups, seconds, warmup=2.0):
    """Run client groups [(label, clients, request maker)] at once; per
    label: the measured latencies, statuses and server timings."""
    stop_at = [None]
    results = {label: {"ms": [], "bad": 0, "timing": []} for label, _, _ in groups}
    lock = threading.Lock()
    start_line = threading.Barrier(sum(c for _, c, _ in groups) + 1)

    def run(label, make, seed):
        client = Client(url)
        rng_i = int(seed) * 7919
        start_line.wait()
        mine = []
        i = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at[0]:
                break
            method, path, body, headers = make(rng_i + i)
            i += 1
            status, ms, timing = client.request(method, path, body, headers)
            if now >= stop_at[0] - seconds:      # past the warm-up
                mine.append((status, ms, timing))
        client.conn.close()
        with lock:
            results[label]["all"] = results[label].get("all", 0) + i
            for status, ms, timing in mine:
                if status == 200:
                    results[label]["ms"].append(ms)
                    if timing:
                        results[label]["timing"].append(timing)
                else:
                    results[label]["bad"] += 1

    threads = []
    for label, clients, make in groups:
        for c in range(clients):
            threads.append(threading.Thread(target=run, args=(label, make, c)))
    for t in threads:
        t.start()
    cpu0 = os.times()
    stop_at[0] = time.perf_counter() + warmup + seconds
    start_line.wait()
    for t in threads:
        t.join()
    cpu1 = os.times()
    load_cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (warmup + seconds)
    return results, load_cpu


def server_pids(server):
    """The server's process and its child processes (net workers, --workers)."""
    pids = [server.pid]
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def server_rss_mb(server):
    """Resident MB of the server and its child processes (net workers):
    total, and anonymous (the processes' own memory; the rest is mapped
    files, fc7.bin and LMDB pages, which the page cache shares and drops)."""
    def rss(pid, field="VmRSS"):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return 0.0
        return 0.0

    pids = server_pids(server)
    return {"server": rss(server.pid), "total": sum(rss(p) for p in pids),
            "anon": sum(rss(p, "RssAnon") for p in pids)}


def server_cpu_s(server):
    """CPU seconds (user + system) the server and its child processes have used."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick     # utime, stime

    return sum(cpu(p) for p in server_pids(server))


def timing_medians(timings):
    parts = {}
    for header in timings:
        for item in header.split(", "):
            name, _, ms = item.partition(";dur=")
            parts.setdefault(name, []).append(float(ms))
    return {name: float(np.median(v)) for name, v in parts.items()}


def row_of(database, kind, net, clients, result, seconds, load_cpu, rss):
    ms = np.asarray(result["ms"])
    return {"database": database, "kind": kind, "net": net, "clients": clients,
            "queries": int(len(ms)), "errors": result["bad"],
            "qps": len(ms) / seconds if len(ms) else 0.0,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "server_timing_ms": timing_medians(result["timing"]),
            "load_cpu_cores": load_cpu, "rss_mb": rss}


def format_row(r):
    p50 = f"{r['p50_ms']:8.2f}" if r["p50_ms"] is not None else f"{'-':>8}"
    p99 = f"{r['p99_ms']:8.2f}" if r["p99_ms"] is not None else f"{'-':>8}"
    timing = " ".join(f"{k} {v:.1f}" for k, v in r["server_timing_ms"].items())
    return (f"{r['database']:>14} {r['kind']:>13} {r['net']:>9} {r['clients']:>3} "
            f"{r['qps']:>8.1f} {p50} {p99} {r['server_cpu_ms_per_request']:>6.1f} "
            f"{r['rss_mb']['total']:>7.0f} "
            f"{r['rss_mb']['anon']:>7.0f} "
            f"{r['load_cpu_cores']:>5.2f} {r['errors']:>4}  {timing}")


HEADER = (f"{'database':>14} {'queries':>13} {'net':>9} {'C':>3} {'q/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'cpu ms':>6} {'RSS MB':>7} {'anon MB':>7} {'load':>5} {'err':>4}  server-side ms (median)")


# ---- the databases ---------------------------------------------------------------

def synthetic_store(n, args, workdir):
    """The synthetic store of n images (the generator's default settings)."""
    dim = synthetic.fc7_dim_within(n)
    codes, _ = synthetic.zipf_clustered_codes(n, 0, args.bits,
                                              np.random.default_rng([args.seed, n]))
    store, write_s = synthetic.open_or_write_store(
        workdir / f"serve_n{n}_b{args.bits}_d{dim}", n, dim, args.bits, codes,
        synthetic.fc7_pool(dim, np.random.default_rng(args.seed)))
    path = store.path
    store.close()
    return path, dim, write_s


def forward_ms(db_path, repeats=50, batches=(1,), blas_threads=(1,), rounds=1):
    """Median ms of the database's own net on a batch of crops (no HTTP, no
    decode): {(batch, BLAS threads): [ms per round]}.  serve.py's default is
    one BLAS thread."""
    from dlbhc.nets.caffe_env import blas_threads_control
    from dlbhc.serving.retrieval import load_matching_model
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(db_path) as store:
        meta = dict(store.meta)
    net = load_matching_model(meta, db_path)
    control = blas_threads_control()
    found = {}
    for batch in batches:
        crops = np.zeros((batch, net.prep.crop, net.prep.crop, 3), dtype=np.uint8)
        for _ in range(rounds):
            for threads in blas_threads:      # alternated, so load hits both alike
                if control is not None:
                    control[1](threads)
                for _ in range(3):
                    net.forward_crops(crops)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    net.forward_crops(crops)
                    times.append(1000 * (time.perf_counter() - start))
                found.setdefault((batch, threads), []).append(float(np.median(times)))
    return found


def blas_comparison(db_path):
    """--blas-table: the net's forward, 1 against 2 BLAS threads."""
    table = forward_ms(db_path, repeats=30, batches=(1, 8, 32), blas_threads=(1, 2), rounds=2)
    print("the net's forward, median ms of 30, two rounds alternating the thread counts")
    print(f"{'batch':>5} {'1 BLAS thread':>16} {'2 BLAS threads':>16}")
    for batch in (1, 8, 32):
        cells = [", ".join(f"{ms:.2f}" for ms in table[(batch, t)]) for t in (1, 2)]
        print(f"{batch:>5} {cells[0]:>16} {cells[1]:>16}")
    return {f"batch{b}_threads{t}": v for (b, t), v in table.items()}


def upload_files(db_path, n=64, seed=0):
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(db_path) as store:
        ids = np.random.default_rng(seed).choice(store.count, size=min(n, store.count),
                                                 replace=False)
        paths = [info["path"] for info in store.infos(np.sort(ids))]
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


def wait_for_workers(server, workers, timeout=1800):
    """Until every worker process of the server has answered (each loads its
    own index and net after serve.py prints its address)."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        # A new connection each time: any ready worker may accept it.
        seen.add(server.get_json("/api/info", {"Connection": "close"})["process"])
    if len(seen) < workers:
        raise UserError(f"only {len(seen)} of the server's {workers} workers answered")


def warm_files(db_path, chunk=64 << 20):
    """Read the database's files once, so that the first configuration does
    not pay for the disk (the other tests of the machine may have evicted
    them); seconds taken."""
    start = time.perf_counter()
    for path in sorted(Path(db_path).iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(chunk):
                    pass
    return time.perf_counter() - start


def run_configs(server, database, count, configs, args, rows):
    rng = np.random.default_rng(args.seed)
    for kind, net, groups in configs:
        made = [(label, clients, make_requests(label, rng, count, args.top_k, args.uploads))
                for label, clients in groups]
        cpu_before = server_cpu_s(server)
        results, load_cpu = load(server.url, made, args.seconds)
        # Server CPU per request (warm-up included): what a request costs the
        # cores whatever else runs on the machine, unlike the latencies.
        cpu_ms = 1000 * (server_cpu_s(server) - cpu_before) / \
            max(1, sum(r.get("all", 0) for r in results.values()))
        rss = server_rss_mb(server)
        for label, clients in groups:
            row = row_of(database, kind if len(groups) == 1 else f"{label} (mixed)", net,
                         clients, results[label], args.seconds, load_cpu, rss)
            row["server_cpu_ms_per_request"] = cpu_ms
            rows.append(row)
            print(format_row(row), flush=True)


def main(argv=None):
    args = parse_args(argv)
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    if args.blas_table:
        if not args.cifar_db or not Path(args.cifar_db).exists():
            raise UserError("--blas-table needs --cifar-db DB (a database made by extract.py)")
        print(f"load average {' '.join(uptime)} at the start", flush=True)
        blas_comparison(args.cifar_db)
        print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
              "at the end")
        return 0
    print(f"{os.cpu_count()} cores, load average {' '.join(uptime)} at the start; "
          f"{args.seconds:g} s per configuration after 2 s of warm-up; top_k {args.top_k}",
          flush=True)
    rows, facts = [], {"load_average_start": uptime}
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_") if own_workdir else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    try:
        for n in args.sizes:
            path, dim, write_s = synthetic_store(n, args, workdir)
            facts[f"synthetic_{n}"] = {"fc7_dim": dim, "store_write_s": write_s,
                                       "warm_read_s": warm_files(path)}
            for workers in args.workers:
                started = time.perf_counter()
                server = Server(["--db", path, "--no-net", "--refresh-seconds", 0,
                                 "--workers", workers], timeout=1800)
                wait_for_workers(server, workers)
                facts[f"synthetic_{n}"][f"server_start_s_workers{workers}"] = \
                    time.perf_counter() - started
                try:
                    args.uploads = []
                    net = "-" if workers == 1 else f"{workers} workers"
                    run_configs(server, f"synthetic {n / 1e6:g}M", n,
                                [("by id", net, [("id", c)]) for c in args.clients], args, rows)
                finally:
                    server.stop()
        if args.cifar_db and Path(args.cifar_db).exists():
            facts["forward_ms_batch1"] = forward_ms(args.cifar_db)[(1, 1)][0]
            print(f"the net's forward on one image: {facts['forward_ms_batch1']:.2f} ms "
                  "(median of 50, one BLAS thread, this process, before the server starts)", flush=True)
            args.uploads = upload_files(args.cifar_db)
            facts["cifar_warm_read_s"] = warm_files(args.cifar_db)
            for setup in args.setups:
                server = Server(["--db", args.cifar_db, "--refresh-seconds", 0, *SETUPS[setup]],
                                timeout=600)
                wait_for_workers(server, 2 if setup == "workers2" else 1)
                count = server.get_json("/api/info")["count"]
                try:
                    configs = [] if setup == "net2" else \
                        [("by id", setup, [("id", c)]) for c in args.clients]
                    configs += [("upload", setup, [("upload", c)]) for c in args.clients]
                    configs.append(("mixed", setup, [("id", 8), ("upload", 8)]))
                    run_configs(server, "cifar10", count, configs, args, rows)
                finally:
                    server.stop()
        elif args.cifar_db:
            print(f"no database at {args.cifar_db}: the CIFAR-10 runs are skipped "
                  "(`make demo` makes one)", flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    facts["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print(f"load average: {' '.join(facts['load_average_start'])} at the start, "
          f"{' '.join(facts['load_average_end'])} at the end")
    forward = facts.get("forward_ms_batch1")
    for row in rows:
        if forward and row["kind"] == "upload" and row["clients"] == 1 and row["p50_ms"]:
            print(f"upload, 1 client, net in {row['net']}: p50 {row['p50_ms']:.2f} ms = forward "
                  f"{forward:.2f} ms + {row['p50_ms'] - forward:.2f} ms on top")
    bar = [r for r in rows if r["database"] == "synthetic 2.5M" and r["kind"] == "by id"
           and r["clients"] == 8]
    for r in bar:
        print(f"bar: by-id top-{args.top_k} at 2.5M, 8 clients, server {r['net']}: "
              f"p50 {r['p50_ms']:.2f} ms -> "
              f"{'met' if r['p50_ms'] <= BAR_MS else 'NOT met'} (<= {BAR_MS:g} ms)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "uploads"},
                               "facts": facts, "results": rows}, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
