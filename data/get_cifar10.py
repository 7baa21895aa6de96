#!/usr/bin/env python3
"""Get CIFAR-10 as image folders plus Caffe list files.

    python data/get_cifar10.py [--dest data/cifar10] [--archive PATH]

Without --archive (or $CIFAR10_ARCHIVE) the official release is downloaded
from the University of Toronto and its md5 checked. See data/README.md.
"""
import argparse
import sys
import time
from pathlib import Path

from dlbhc.datasets.cifar10 import ARCHIVE_ENV, CIFAR10_URL, get_cifar10
from dlbhc.errors import run_main

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Unpack CIFAR-10 into DEST/{train,test}/<class>/ images with "
                    "DEST/train.txt and DEST/test.txt (`path label`, labels 0..9 in "
                    "the order airplane..truck).")
    parser.add_argument("--dest", type=Path, default=PROJECT_ROOT / "data" / "cifar10",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="local copy of the data instead of downloading: the "
                        "official cifar-10-python.tar.gz, or a tar.gz of "
                        f"train/<class>/*.jpg and test/<class>/*.jpg (default: ${ARCHIVE_ENV}, "
                        f"else download {CIFAR10_URL})")
    args = parser.parse_args(argv)
    start = time.monotonic()
    result = get_cifar10(args.dest, archive=args.archive)
    state = "already present" if result.reused else f"done in {time.monotonic() - start:.1f} s"
    print(f"{result.dest}: {result.train} train + {result.test} test images "
          f"({result.format} archive {result.archive}), {state}")
    print(f"lists: {result.dest / 'train.txt'}, {result.dest / 'test.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
