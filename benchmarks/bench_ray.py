#!/usr/bin/env python3
"""Extraction on Ray against plain extract.py on one machine (a benchmark,
not a test): the engine's overhead on one node, as a ratio.

    .venv/bin/python benchmarks/bench_ray.py IMAGES --net cifar
    .venv/bin/python benchmarks/bench_ray.py IMAGES --net alexnet

IMAGES: a folder of images, of which the first --count (10,000) are used
(e.g. CIFAR-10's JPEG training images).
In one run: extract.py IMAGES (its defaults: two forward workers with a
single-threaded net each), then extract.py IMAGES --ray (a local Ray started
by the command, one actor per CPU, each a single-threaded net) with one
actor SIGKILLed when --kill-at of the images are done.  Both into fresh
databases, both timed as the user sees them: the command's wall time, Ray
start-up, actor restart and the final merge included.  The Ray database is
checked to hold every image exactly once, in the same order and with the
same codes as the plain one.  Ratio = plain wall time / Ray wall time
(throughput of Ray relative to plain; the bar is >= 0.85).  The steady-state
ratio leaves out the Ray start-up (time to the first progress line).
Weights are random (speed does not depend on them).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_extract import deploy_with_batch, random_weights
from dlbhc.store.database import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


PROGRESS = re.compile(r"extract \(ray\) (\d+)/(\d+)")


def actor_pids():
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::ShardExtractor"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def run(cmd, kill_at=None, log=None):
    """Run extract.py; with kill_at, SIGKILL one Ray actor once that many
    images are done.  (wall seconds, stdout, seconds to first progress, killed)"""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        first = killed = None
        while proc.poll() is None:
            time.sleep(0.05)
            found = [int(m.group(1)) for m in PROGRESS.finditer(Path(log).read_text())]
            if found and first is None:
                first = time.perf_counter() - start
            if kill_at is not None and killed is None and found and max(found) >= kill_at:
                pids = actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = max(found)
        stdout = proc.stdout.read()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{cmd} failed:\n" + Path(log).read_text()[-3000:])
    return wall, stdout, first, killed


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="image folder (e.g. 10,000 CIFAR-10 JPEGs)")
    p.add_argument("--net", choices=["cifar", "alexnet"], default="cifar")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--count", type=int, default=10000,
                   help="the first COUNT images of IMAGES (extract.py --limit)")
    p.add_argument("--batch-size", type=int, default=None, help="default 100 / 50")
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="fraction of the images done when an actor is killed (0: none)")
    p.add_argument("--workdir", help="where databases go (default: a temp folder)")
    p.add_argument("--json", default="out/bench_ray.json")
    args = p.parse_args()
    batch = args.batch_size or (100 if args.net == "cifar" else 50)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        deploy = deploy_with_batch(ROOT / f"prototxt/{args.net}_hash{args.bits}_deploy.prototxt",
                                   tmp / "deploy.prototxt", batch)
        weights = random_weights(deploy, tmp / "random.caffemodel")
        common = [sys.executable, str(ROOT / "python/extract.py"), args.images,
                  "--deploy", str(deploy), "--weights", str(weights),
                  "--mean", "104,117,123", "--batch-size", str(batch),
                  "--limit", str(args.count)]
        load_before = os.getloadavg()
        plain_s, plain_out, _, _ = run([*common, "--out", str(tmp / "plain.lmdb")],
                                       log=tmp / "plain.log")
        with FeatureStore.open(tmp / "plain.lmdb") as db:
            n = db.count
        kill_at = int(args.kill_at * n) if args.kill_at > 0 else None
        ray_s, ray_out, first, killed = run([*common, "--out", str(tmp / "ray.lmdb"), "--ray"],
                                            kill_at=kill_at, log=tmp / "ray.log")
        load_after = os.getloadavg()
        with FeatureStore.open(tmp / "plain.lmdb") as a, FeatureStore.open(tmp / "ray.lmdb") as b:
            paths = [i["path"] for i in b.infos()]
            exactly_once = b.count == n and len(set(paths)) == n
            same = exactly_once and [i["path"] for i in a.infos()] == paths \
                and np.array_equal(a.codes(), b.codes())
        restarts = re.search(r"(\d+) actor restart", ray_out)
        figures = {
            "net": f"{args.net}_hash{args.bits}", "batch": batch, "images": n,
            "plain_s": round(plain_s, 1), "plain_img_s": round(n / plain_s, 1),
            "ray_s": round(ray_s, 1), "ray_img_s": round(n / ray_s, 1),
            "ratio": round(plain_s / ray_s, 3),
            "ray_first_progress_s": round(first, 1) if first else None,
            "steady_ratio": round(plain_s / (ray_s - first), 3) if first else None,
            "killed_at_images": killed, "actor_restarts": int(restarts.group(1)) if restarts
            else None, "exactly_once": exactly_once, "same_order_and_codes": same,
            "load_avg_before": load_before, "load_avg_after": load_after,
            "plain_summary": plain_out.strip().splitlines(),
            "ray_summary": ray_out.strip().splitlines(),
        }
    print(f"{figures['net']} (batch {batch}), {n} images:")
    print(f"  plain extract.py       {plain_s:7.1f} s  {n / plain_s:7.1f} img/s")
    print(f"  extract.py --ray       {ray_s:7.1f} s  {n / ray_s:7.1f} img/s  "
          f"(first progress after {first:.1f} s; actor killed at {killed} images; "
          f"{figures['actor_restarts']} restart)")
    print(f"  ratio Ray / plain: {figures['ratio']:.3f} end to end, "
          f"{figures['steady_ratio']:.3f} without the Ray start-up (bar >= 0.85)")
    print(f"  every image exactly once: {exactly_once}; same order and codes as plain: {same}")
    print(f"  load average before {load_before}, after {load_after}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
