#!/usr/bin/env python3
"""Extraction speed against the net's own forward speed (a benchmark, not a test).

In one run on the same machine, alternating ROUNDS times: `caffe time` (its
"Average Forward pass") on the deploy net at the extraction batch size, then
extract.py over a fresh slice of real JPEGs (CIFAR-10 training images) into a
new database. Each round gives a ratio extract img/s / forward-only img/s
(the forward figure being the mean of the caffe time runs just before and
after that extraction); the median ratio is the result, and the spread of the
caffe time figures shows how noisy the machine was. Weights are random:
speed does not depend on their values.

    .venv/bin/python benchmarks/bench_extract.py --net cifar --images 10000
    .venv/bin/python benchmarks/bench_extract.py --net alexnet --images 1500
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dlbhc.caffe_env import caffe_tool, import_caffe  # noqa: E402


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


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cifar", "alexnet"], default="cifar")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=None, help="default 100 (cifar), 50 (alexnet)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=None, help="caffe time iterations")
    p.add_argument("--rounds", type=int, default=3, help="alternations of caffe time and extract")
    p.add_argument("--list", default=str(ROOT / "data/cifar10/train.txt"))
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    batch = args.batch_size or (100 if args.net == "cifar" else 50)
    iterations = args.iterations or (50 if args.net == "cifar" else 10)
    list_file = Path(args.list)
    if not list_file.exists():
        raise SystemExit(f"{list_file} missing: run `make data` first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deploy = deploy_with_batch(ROOT / f"prototxt/{args.net}_hash{args.bits}_deploy.prototxt",
                                   tmp / "deploy.prototxt", batch)
        weights = random_weights(deploy, tmp / "random.caffemodel")
        lines = list_file.read_text().splitlines()
        per_round = args.images // args.rounds
        forward = [caffe_time_forward(deploy, batch, iterations)]
        rounds = []
        for r in range(args.rounds):
            sub = tmp / f"images{r}.txt"
            sub.write_text("\n".join(lines[r * per_round:(r + 1) * per_round]) + "\n")
            out = subprocess.run([sys.executable, str(ROOT / "python/extract.py"), str(sub),
                                  "--root", str(list_file.parent), "--out", str(tmp / f"db{r}.lmdb"),
                                  "--deploy", str(deploy), "--weights", str(weights),
                                  "--mean", "104,117,123", "--batch-size", str(batch),
                                  "--workers", str(args.workers)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit("extract.py failed:\n" + out.stderr[-2000:])
            m = re.search(r"stored (\d+) new images \(([0-9.]+) img/s\)", out.stdout)
            forward.append(caffe_time_forward(deploy, batch, iterations))
            fwd = (forward[-2] + forward[-1]) / 2
            rounds.append({"images": int(m.group(1)), "extract_img_s": float(m.group(2)),
                           "forward_img_s": round(fwd, 1),
                           "ratio": round(float(m.group(2)) / fwd, 3)})
    ratios = sorted(r["ratio"] for r in rounds)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else \
        (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    figures = {
        "net": f"{args.net}_hash{args.bits}", "batch": batch, "workers": args.workers,
        "rounds": rounds, "forward_runs_img_s": [round(f, 1) for f in forward],
        "median_ratio": round(median, 3),
    }
    for i, r in enumerate(rounds):
        print(f"round {i}: extract.py {r['extract_img_s']:.1f} img/s over {r['images']} JPEGs, "
              f"caffe time forward-only {r['forward_img_s']:.1f} img/s, ratio {r['ratio']:.3f}")
    print(f"{figures['net']} (batch {batch}, {args.workers} workers): median ratio "
          f"{median:.3f} (target >= 0.9); caffe time runs {figures['forward_runs_img_s']} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
