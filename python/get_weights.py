#!/usr/bin/env python3
"""Download pretrained Caffe weights (bvlc_alexnet by default), sha1-checked.

    python python/get_weights.py [bvlc_alexnet|bvlc_reference_caffenet]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlbhc.errors import run_main  # noqa: E402
from dlbhc.weights import fetch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="bvlc_alexnet")
    args = p.parse_args(argv)
    fetch(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
