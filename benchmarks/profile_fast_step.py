#!/usr/bin/env python3
"""Where a training step of the fast recipe goes (a benchmark, not a test).

The fast recipe's own parts (training/fast.py's loop): the augmented batch
(training.augment), feeding it into the input blob (nets.model's
BatchTransformer), clearing the gradients, Caffe's forward and backward, and
the numpy Nesterov update (training.sgd), each timed over STEPS steps after
one warm-up step, on the checked-in fast net with random images (not
constant ones: before patch 0007, Caffe's ReLU, ELU, BatchNorm and max
pooling ran up to 2-5x slower on varied input than on the zeros `caffe
time` feeds). The Python parts against Caffe's layers say whether the time
between `caffe time`'s figure and the training's seconds per step is spent
in Python.

    .venv/bin/python benchmarks/profile_fast_step.py [--steps 4] [--batch-size 500] [--threads 2]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dlbhc.nets.caffe_env import import_caffe, set_blas_threads
from dlbhc.nets.model import BatchTransformer, Preprocessing
from dlbhc.training.augment import AugmentedBatches
from dlbhc.training.fast import FAST_SIZE, run_nets
from dlbhc.training.fast_schedule import FastSchedule
from dlbhc.training.sgd import NesterovSGD, triangle_lr

PARTS = ("augment", "feed", "clear", "forward", "backward", "update")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=FastSchedule.batch_size)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--threads", type=int, default=2, help="OpenBLAS threads")
    args = p.parse_args()
    caffe = import_caffe()
    caffe.set_mode_cpu()
    set_blas_threads(args.threads)
    schedule = FastSchedule(batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    n = args.batch_size * (args.steps + 1)
    images = rng.integers(0, 256, (n, FAST_SIZE, FAST_SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, _ = run_nets(args.bits, 10, args.batch_size, Path(tmp), "profile")
        net = caffe.Net(str(train_file), caffe.TRAIN)
        sgd = NesterovSGD(net, train_file, schedule.momentum, schedule.weight_decay)
    transform = BatchTransformer(Preprocessing(FAST_SIZE, FAST_SIZE, (120.0, 120.0, 120.0)))
    batches = AugmentedBatches(images, labels, args.batch_size, seed=0)
    times = {part: [] for part in PARTS}
    load_start = os.getloadavg()[0]
    iterator = iter(batches.epoch(0))
    for step in range(args.steps + 1):
        marks = [time.perf_counter()]
        crops, batch_labels = next(iterator)
        marks.append(time.perf_counter())
        transform(crops, out=net.blobs["data"].data)
        net.blobs["label"].data[...] = batch_labels
        marks.append(time.perf_counter())
        sgd.clear_diffs()
        marks.append(time.perf_counter())
        net.forward()
        marks.append(time.perf_counter())
        net.backward()
        marks.append(time.perf_counter())
        sgd.step(triangle_lr(step, args.steps + 1, schedule.peak_lr_for_batch(),
                             schedule.warmup_fraction))
        marks.append(time.perf_counter())
        if step:                        # the first step warms up buffers
            for part, a, b in zip(PARTS, marks, marks[1:]):
                times[part].append(b - a)
    ms = {part: 1000 * float(np.median(v)) for part, v in times.items()}
    total = sum(ms.values())
    print(f"fast_hash{args.bits}, batch {args.batch_size}, {args.threads} BLAS threads, "
          f"median of {args.steps} steps; load average {load_start:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    for part in PARTS:
        print(f"  {part:9s} {ms[part]:9.1f} ms  {100 * ms[part] / total:5.1f}%")
    python = ms["augment"] + ms["feed"] + ms["clear"] + ms["update"]
    print(f"  step      {total:9.1f} ms; outside Caffe's forward/backward {python:.1f} ms "
          f"({100 * python / total:.2f}%)")


if __name__ == "__main__":
    main()
