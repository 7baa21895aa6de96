#!/usr/bin/env python3
"""Each layer of the fast net, forward and backward, on zeros (what
`caffe time` feeds: its input blobs are never filled) and on varied input (a
benchmark, not a test).

Caffe's layers whose cost depends on the values (ELU's exp, max pooling's
comparisons, BatchNorm's pow before patch 0007) ran up to 2.5x slower on
varied input, so `caffe time` understated a training step. Run it once per
build (CAFFE_ROOT picks one) to compare them layer by layer:

    CAFFE_ROOT=<a Caffe build> .venv/bin/python benchmarks/profile_fast_layers.py \\
        [--batch-size 100] [--threads 1] [--rounds 3] [--min-ms 1]
"""
import argparse
import os
import time

import numpy as np

from dlbhc.nets.caffe_env import import_caffe, set_blas_threads
from dlbhc.training.fast import FAST_SIZE
from dlbhc.training.prototxt import PROTOTXT_DIR


def layer_times(net, rounds):
    """Seconds per layer, forward and backward, averaged over `rounds`
    passes after one warm-up pass."""
    names = list(net._layer_names)
    forward, backward = np.zeros(len(names)), np.zeros(len(names))
    net.forward()
    net.backward()
    for _ in range(rounds):
        for i in range(len(names)):
            start = time.perf_counter()
            net._forward(i, i)
            forward[i] += time.perf_counter() - start
        for i in reversed(range(len(names))):
            start = time.perf_counter()
            net._backward(i, i)
            backward[i] += time.perf_counter() - start
    return names, forward / rounds, backward / rounds


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="OpenBLAS threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-ms", type=float, default=1.0,
                   help="list the layers above this many ms on either input")
    args = p.parse_args()
    caffe = import_caffe()
    caffe.set_mode_cpu()
    set_blas_threads(args.threads)
    net = caffe.Net(str(PROTOTXT_DIR / f"fast_hash{args.bits}_train.prototxt"), caffe.TRAIN)
    n = args.batch_size
    net.blobs["data"].reshape(n, 3, FAST_SIZE, FAST_SIZE)
    net.blobs["label"].reshape(n)
    net.reshape()
    rng = np.random.default_rng(0)
    # the scale of mean-subtracted pixels (0..255)
    varied = rng.normal(0, 60, size=net.blobs["data"].data.shape).astype(np.float32)
    net.blobs["label"].data[...] = rng.integers(0, 10, n)
    net.blobs["smoothing"].data[...] = np.eye(10).reshape(net.blobs["smoothing"].data.shape)
    times = {}
    for name, x in (("zeros", np.zeros_like(varied)), ("varied", varied)):
        net.blobs["data"].data[...] = x
        times[name] = layer_times(net, args.rounds)
    load = os.getloadavg()
    print(f"fast_hash{args.bits} train net, batch {n}, {args.threads} BLAS thread(s), "
          f"mean of {args.rounds} rounds; load average {load[0]:.2f}")
    print(f"{'layer':16s} {'zeros fwd':>10s} {'bwd':>8s} {'varied fwd':>11s} {'bwd':>8s}  ms")
    names = times["zeros"][0]
    for i, layer in enumerate(names):
        row = [times[k][j][i] * 1e3 for k in ("zeros", "varied") for j in (1, 2)]
        if max(row) >= args.min_ms:
            print(f"{layer:16s} {row[0]:10.1f} {row[1]:8.1f} {row[2]:11.1f} {row[3]:8.1f}")
    totals = {k: (times[k][1].sum() + times[k][2].sum()) * 1e3 for k in times}
    print(f"{'total':16s} {totals['zeros']:19.1f} {totals['varied']:20.1f}")


if __name__ == "__main__":
    main()
