#!/usr/bin/env python3
"""Convert a folder of images or a `path label` list file into a Caffe Datum
database (LMDB or LevelDB), optionally with its mean image.

    python data/convert_imageset.py SOURCE OUT --size 256 [--root DIR]
        [--shuffle-seed N] [--backend lmdb|leveldb] [--mean PREFIX] [--overwrite]

The Python counterpart of Caffe's tools/convert_imageset (same Datum layout,
BGR channel order and `%08d_<path>` keys) that reads any image format through
dlbhc.images. See data/README.md.
"""
import argparse
import sys
from pathlib import Path


from dlbhc.datasets.datum import BACKENDS, compute_mean, convert_imageset
from dlbhc.errors import run_main
from dlbhc.images import list_images


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write images into a Caffe Datum database for a Data layer.")
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="a folder (class subfolders give labels 0..C-1 in sorted "
                        "order) or a list file of `path [label]` lines")
    parser.add_argument("out", type=Path, metavar="OUT", help="database folder to create")
    parser.add_argument("--root", type=Path, default=None,
                        help="folder the list file's relative paths start from "
                        "(Caffe's ROOTFOLDER; default: the list file's own folder)")
    parser.add_argument("--size", type=int, required=True,
                        help="resize every image to SIZE x SIZE (256 for the AlexNet-"
                        "based nets, 32 for the small CIFAR-10 net)")
    parser.add_argument("--shuffle-seed", type=int, default=None, metavar="N",
                        help="shuffle the order with this seed; use it for training "
                        "data, since Caffe's Data layer reads in database order")
    parser.add_argument("--backend", choices=BACKENDS, default="lmdb",
                        help="database type (default: %(default)s)")
    parser.add_argument("--mean", default=None, metavar="PREFIX",
                        help="also write the mean image as PREFIX.binaryproto (Caffe's "
                        "mean_file) and PREFIX.npy (C x H x W float32, BGR)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it already exists")
    args = parser.parse_args(argv)

    found = list_images(args.source, root=args.root)
    if found.classes:
        print("labels: " + ", ".join(f"{i}={name}" for i, name in enumerate(found.classes)))
    result = convert_imageset(found.items, args.out, args.size,
                              shuffle_seed=args.shuffle_seed, backend=args.backend,
                              overwrite=args.overwrite)
    print(f"{result.path}: {result.written} images written, {len(result.skipped)} "
          f"skipped, {result.seconds:.1f} s")
    if args.mean:
        mean = compute_mean(result.path, f"{args.mean}.binaryproto", f"{args.mean}.npy",
                            backend=args.backend)
        b, g, r = mean.channel_mean
        print(f"mean of {mean.count} images: {args.mean}.binaryproto, {args.mean}.npy; "
              f"per-channel mean_value B={b:.3f} G={g:.3f} R={r:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
