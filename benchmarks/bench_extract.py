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
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dlbhc.nets.caffe_env import caffe_tool, import_caffe

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
    caffe.Net(str(deploy), caffe.TEST).save(str(dst))  # filler-initialised
    return dst


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


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cifar", "alexnet"], default="cifar")
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
    batch = args.batch_size or (100 if args.net == "cifar" else 50)
    images = args.images or (30000 if args.net == "cifar" else 2400)
    # caffe time runs of ~15 s: shorter ones scattered by +-30% on the shared machine
    iterations = args.iterations or (100 if args.net == "cifar" else 15)
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
        forward = [caffe_time_forward(deploy, batch, iterations)]
        rounds = []
        for r in range(args.rounds):
            cmd = [sys.executable, str(ROOT / "python/extract.py"), str(sub),
                   "--root", str(list_file.parent), "--out", str(tmp / f"db{r}.lmdb"),
                   "--deploy", str(deploy), "--weights", str(weights),
                   "--mean", "104,117,123", "--batch-size", str(batch)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit("extract.py failed:\n" + out.stderr[-2000:])
            m = re.search(r"stored (\d+) new images \(([0-9.]+) img/s\)", out.stdout)
            forward.append(caffe_time_forward(deploy, batch, iterations))
            fwd = (forward[-2] + forward[-1]) / 2
            rounds.append({"images": int(m.group(1)), "extract_img_s": float(m.group(2)),
                           "forward_img_s": round(fwd, 1),
                           "ratio": round(float(m.group(2)) / fwd, 3)})
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
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
