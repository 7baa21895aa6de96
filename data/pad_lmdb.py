#!/usr/bin/env python3
"""Copy a Datum LMDB with every image padded by N pixels on each side.

    python data/pad_lmdb.py data/cifar10/cifar10_train_32_lmdb \
        data/cifar10/cifar10_train_32pad4_lmdb --pad 4

The small CIFAR-10 net trains on random 32x32 crops of 40x40 images, the
usual pad-and-crop augmentation (random shifts of up to 4 pixels). Caffe's
Data layer can crop (crop_size) but not pad, so the padding is stored in the
training database. Padding, unlike a squash resize to 40 (convert_imageset
--size 40), keeps the objects at the scale of the test images: the centre
32x32 crop of a padded image is the original image, exactly what the TEST
phase and extract.py (resize 32, no crop) feed the net.

The padding reflects the border (numpy "reflect", as in the fast CIFAR-10
training recipes) rather than adding black frames. Records keep their keys
and order (so the training order stays the shuffled one). The output is built
in OUT.partial and renamed when complete; an existing OUT is left alone
unless --overwrite is given.
"""
import argparse
import sys

from dlbhc.datasets.datum import pad_imageset
from dlbhc.errors import run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Datum LMDB to read (e.g. cifar10_train_32_lmdb)")
    p.add_argument("dst", help="padded LMDB to write")
    p.add_argument("--pad", type=int, default=4, help="pixels added on each side (default 4)")
    p.add_argument("--mode", default="reflect", choices=["reflect", "edge", "constant"],
                   help="numpy.pad mode (constant = black frame)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    n = pad_imageset(args.src, args.dst, args.pad, args.mode, args.overwrite)
    print(f"{args.dst}: {n} images padded by {args.pad} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
