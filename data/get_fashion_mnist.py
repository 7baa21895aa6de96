#!/usr/bin/env python3
"""Get Fashion-MNIST (28x28 grey product photos, 10 classes) as image folders,
a collection of small images to try `make train DATA=` on:

    python data/get_fashion_mnist.py [--dest data] [--per-class 500 --test-per-class 100]
    make train DATA=data/fashion-mnist-500x100/train TEST=data/fashion-mnist-500x100/test

From Debian's dataset-fashion-mnist package, fetched with `apt-get download`
(no root needed, nothing installed) and its sha256 checked. See data/README.md.
"""
import argparse
import sys
import time
from pathlib import Path

from dlbhc.datasets.fashion_mnist import FASHION_MNIST, get_fashion_mnist
from dlbhc.errors import run_main

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write DEST/fashion-mnist[-NxM]/{train,test}/<class>/*.png with "
                    "train.txt, test.txt and classes.txt (Fashion-MNIST, MIT licence).")
    parser.add_argument("--dest", type=Path, default=PROJECT_ROOT / "data",
                        help="parent folder (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="only the first N training images of each class (default all 6,000)")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="only the first N test images of each class (default all 1,000)")
    parser.add_argument("--deb", type=Path, default=None,
                        help=f"the package file instead of `apt-get download "
                             f"{FASHION_MNIST.package}={FASHION_MNIST.version}`")
    args = parser.parse_args(argv)
    start = time.monotonic()
    result = get_fashion_mnist(args.dest, deb=args.deb, per_class=args.per_class,
                               test_per_class=args.test_per_class)
    state = "already present" if result.reused else f"done in {time.monotonic() - start:.1f} s"
    print(f"{result.dest}: {result.counts['train']} train + {result.counts['test']} test "
          f"images, {state}")
    print(f"train on it: make train DATA={result.dest}/train TEST={result.dest}/test")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
