#!/usr/bin/env python3
"""Extraction speed against the net's own forward speed (a benchmark, not a test).

In one run on the same machine, alternating ROUNDS times: `caffe time` (its
"Average Forward pass") on the deploy net at the extraction batch size, then
extract.py over the first IMAGES real JPEGs of the list (CIFAR-10 training
images) into a new database. Each round gives a ratio
extract img/s / forward-only img/s (the forward figure being the mean of the
caffe time runs just before and after that extraction); the median ratio is
the result, and the spread of the caffe time figures shows how noisy the
machine was. extract.py's img/s is the user's figure: wall time from start
to the last commit, start-up included, so a round should last a minute or
more (the defaults do on 2 cores). Weights are random: speed does not depend
on their values.

    .venv/bin/python benchmarks/bench_extract.py --net cifar      # 30,000 images a round
    .venv/bin/python benchmarks/bench_extract.py --net alexnet    # 2,400 images a round

--fold-compare (for a net with BatchNorm: --net efficientnet_lite0, 224 px)
runs each round twice, extract.py as it is (BatchNorm folded at load) and
with --no-fold, and the loaded net's forward (pycaffe, folded and written),
side by side; the result is the median speed-up. --layer-times N prints the
N slowest layers of the folded net, timed one layer at a time. The
backbone's converted weights are used when `make backbone` made them.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dlbhc.nets.backbones import DEFAULT_BACKBONE, paths as backbone_paths
from dlbhc.nets.caffe_env import caffe_tool, import_caffe, set_blas_threads

ROOT = Path(__file__).resolve().parents[1]


def deploy_with_batch(src, dst, batch):
    caffe = import_caffe()
    from google.protobuf import text_format
    net = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(Path(src).read_text(), net)
    net.layer[0].input_param.shape[0].dim[0] = batch
    dst.write_text(text_format.MessageToString(net))
    return dst


def random_weights(deploy, dst):
    caffe = import_caffe()
    caffe.set_mode_cpu()
    net = caffe.Net(str(deploy), caffe.TEST)  # filler-initialised
    backbone = backbone_paths(DEFAULT_BACKBONE)[1]
    if "BatchNorm" in {layer.type for layer in net.layers} and backbone.exists():
        net.copy_from(str(backbone))          # real statistics: no overflow to inf
    net.save(str(dst))
    return dst


def loaded_net(deploy, weights, fold):
    """The HashNet extract.py runs (BatchNorm folded or not), its weights in."""
    from dlbhc.nets.model import HashNet
    return HashNet(deploy, weights, "104,117,123", fold=fold)


def pycaffe_forward(net, batch, iterations):
    """Images per CPU-second of the loaded net's forward on a random batch,
    one BLAS thread (process time: on a shared machine the wall time
    measures the neighbours). `caffe time` cannot load weights, and a
    BatchNorm net with filler weights runs into inf and denormal values,
    whose speed is not the real net's."""
    set_blas_threads(1)
    data = net.net.blobs["data"]
    data.reshape(batch, *data.data.shape[1:])
    net.net.reshape()
    data.data[...] = np.random.default_rng(0).uniform(-120, 130, data.data.shape)
    net.net.forward()
    started = time.process_time()
    for _ in range(iterations):
        net.net.forward()
    return batch * iterations / (time.process_time() - started)


def layer_times(net, batch, iterations, top):
    """The `top` slowest layers' forward ms (pycaffe, one layer at a time),
    slowest first, and all layers' total."""
    pycaffe_forward(net, batch, 1)
    rows, by_type = [], {}
    for name, layer in zip(net.net._layer_names, net.net.layers):
        started = time.process_time()
        for _ in range(iterations):
            net.net.forward(start=name, end=name)
        rows.append(((time.process_time() - started) * 1000 / iterations, name))
        by_type[layer.type] = by_type.get(layer.type, 0.0) + rows[-1][0]
    rows.sort(reverse=True)
    total = sum(ms for ms, _ in rows)
    print("by layer type: " + ", ".join(f"{kind} {ms:.0f} ms ({100 * ms / total:.0f}%)" for kind, ms
                                         in sorted(by_type.items(), key=lambda kv: -kv[1])))
    return [(name, ms, ms / total) for ms, name in rows[:top]], total


def caffe_time_forward(deploy, batch, iterations):
    out = subprocess.run([str(caffe_tool("caffe")), "time", "-model", str(deploy),
                          "-iterations", str(iterations)], capture_output=True, text=True,
                         env=dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0"))
    m = re.search(r"Average Forward pass: ([0-9.]+) ms", out.stderr)
    if not m:
        raise SystemExit("caffe time failed:\n" + out.stderr[-2000:])
    ms = float(m.group(1))
    return batch / (ms / 1000.0)


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def plain_rounds(args, deploy, batch, iterations, extract):
    forward = [caffe_time_forward(deploy, batch, iterations)]
    rounds = []
    for r in range(args.rounds):
        images, rate, _ = extract(r)
        forward.append(caffe_time_forward(deploy, batch, iterations))
        fwd = (forward[-2] + forward[-1]) / 2
        rounds.append({"images": images, "extract_img_s": rate, "forward_img_s": round(fwd, 1),
                       "ratio": round(rate / fwd, 3)})
    figures = {
        "net": f"{args.net}_hash{args.bits}", "batch": batch,
        "workers": args.workers if args.workers is not None else "default",
        "rounds": rounds, "caffe_time_img_s": [round(f, 1) for f in forward],
        "median_ratio": round(median([r["ratio"] for r in rounds]), 3),
    }
    for i, r in enumerate(rounds):
        print(f"round {i}: extract.py {r['extract_img_s']:.1f} img/s over {r['images']} JPEGs, "
              f"caffe time forward-only {r['forward_img_s']:.1f} img/s, ratio {r['ratio']:.3f}")
    print("caffe time runs (img/s): " + ", ".join(f"{f:.1f}" for f in forward))
    print(f"{figures['net']} (batch {batch}): median ratio {figures['median_ratio']:.3f} "
          "(target >= 0.9)")
    return figures


def fold_compare(args, deploy, weights, batch, iterations, extract):
    """Rounds of (forward written, folded; extract.py --no-fold, folded),
    the order alternating between rounds; the forward is pycaffe's on the
    loaded weights (pycaffe_forward), one batch, the default BLAS threads."""
    nets = {"written": loaded_net(deploy, weights, False), "folded": loaded_net(deploy, weights, True)}
    rounds = []
    for r in range(args.rounds):
        row = {}
        order = [("written", ("--no-fold",)), ("folded", ())]
        for name, extra in (order if r % 2 == 0 else order[::-1]):
            row[f"forward_{name}_img_s"] = round(pycaffe_forward(nets[name], batch, iterations), 1)
            row["images"], row[f"extract_{name}_img_s"], cpu = extract(r, *extra)
            row[f"extract_{name}_cpu_ms_per_img"] = round(cpu, 1)
        row["extract_speedup"] = round(row["extract_folded_img_s"] / row["extract_written_img_s"], 3)
        row["extract_cpu_speedup"] = round(row["extract_written_cpu_ms_per_img"]
                                           / row["extract_folded_cpu_ms_per_img"], 3)
        row["forward_speedup"] = round(row["forward_folded_img_s"]
                                       / row["forward_written_img_s"], 3)
        rounds.append(row)
        print(f"round {r}: extract.py {row['extract_written_img_s']:.1f} -> "
              f"{row['extract_folded_img_s']:.1f} img/s folded (x{row['extract_speedup']:.2f}) "
              f"over {row['images']} JPEGs; forward {row['forward_written_img_s']:.1f} -> "
              f"{row['forward_folded_img_s']:.1f} img per CPU-s (x{row['forward_speedup']:.2f}); "
              f"extract.py CPU {row['extract_written_cpu_ms_per_img']:.0f} -> "
              f"{row['extract_folded_cpu_ms_per_img']:.0f} ms/img (x{row['extract_cpu_speedup']:.2f})")
    figures = {"net": f"{args.net}_hash{args.bits}", "batch": batch,
               "workers": args.workers if args.workers is not None else "default",
               "rounds": rounds,
               "median_extract_speedup": median([r["extract_speedup"] for r in rounds]),
               "median_forward_speedup": median([r["forward_speedup"] for r in rounds]),
               "median_extract_cpu_speedup": median([r["extract_cpu_speedup"] for r in rounds])}
    print(f"{figures['net']} (batch {batch}): BatchNorm folded, extract.py x"
          f"{figures['median_extract_speedup']:.2f} wall, x"
          f"{figures['median_extract_cpu_speedup']:.2f} CPU time, forward x"
          f"{figures['median_forward_speedup']:.2f} (medians of {args.rounds} rounds)")
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cifar", "alexnet", "efficientnet_lite0"], default="cifar")
    p.add_argument("--fold-compare", action="store_true",
                   help="each round: extract.py folded (the default) and with --no-fold")
    p.add_argument("--layer-times", type=int, metavar="N", default=0,
                   help="print the N slowest layers of the (folded) net")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--images", type=int, default=None,
                   help="images per round (default 30,000 cifar, 2,400 alexnet: about a minute)")
    p.add_argument("--batch-size", type=int, default=None, help="default 100 (cifar), 50 (alexnet)")
    p.add_argument("--workers", type=int, default=None, help="extract.py --workers (default: its own)")
    p.add_argument("--iterations", type=int, default=None, help="caffe time iterations")
    p.add_argument("--rounds", type=int, default=3, help="alternations of caffe time and extract")
    p.add_argument("--list", default=str(ROOT / "data/cifar10/train.txt"))
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    big = {"cifar": False, "alexnet": True, "efficientnet_lite0": True}[args.net]
    batch = args.batch_size or (50 if big else 100)
    images = args.images or {"cifar": 30000, "alexnet": 2400, "efficientnet_lite0": 1000}[args.net]
    # caffe time runs of ~15 s: shorter ones scattered by +-30% on the shared machine
    iterations = args.iterations or (15 if big else 100)
    list_file = Path(args.list)
    if not list_file.exists():
        raise SystemExit(f"{list_file} missing: run `make data` first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deploy = deploy_with_batch(ROOT / f"prototxt/{args.net}_hash{args.bits}_deploy.prototxt",
                                   tmp / "deploy.prototxt", batch)
        weights = random_weights(deploy, tmp / "random.caffemodel")
        lines = list_file.read_text().splitlines()
        if len(lines) < images:
            raise SystemExit(f"{list_file} lists {len(lines)} images, fewer than --images {images}")
        lines = lines[:images]
        sub = tmp / "images.txt"
        sub.write_text("\n".join(lines) + "\n")
        def extract(r, *extra):
            """(images, extract.py's img/s, CPU ms per image of all its processes)"""
            cmd = [sys.executable, str(ROOT / "python/extract.py"), str(sub),
                   "--root", str(list_file.parent), "--out", str(tmp / f"db{r}{len(extra)}.lmdb"),
                   "--deploy", str(deploy), "--weights", str(weights),
                   "--mean", "104,117,123", "--batch-size", str(batch), *extra]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(cmd, capture_output=True, text=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if out.returncode != 0:
                raise SystemExit("extract.py failed:\n" + out.stderr[-2000:])
            m = re.search(r"stored (\d+) new images \(([0-9.]+) img/s\)", out.stdout)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            return int(m.group(1)), float(m.group(2)), 1000 * cpu / int(m.group(1))

        if args.fold_compare:
            figures = fold_compare(args, deploy, weights, batch, iterations, extract)
        else:
            figures = plain_rounds(args, deploy, batch, iterations, extract)
        if args.layer_times:
            rows, total = layer_times(loaded_net(deploy, weights, True), batch,
                                      max(2, iterations // 3), args.layer_times)
            print(f"slowest layers of the folded net (pycaffe, one layer at a time, CPU time, batch "
                  f"{batch}, all layers {total:.0f} ms):")
            for name, ms, share in rows:
                print(f"  {name:24s} {ms:9.1f} ms  {100 * share:5.1f}%")
            figures["slowest_layers"] = [[n, round(ms, 1)] for n, ms, _ in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
