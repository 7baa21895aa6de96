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
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dlbhc.caffe_env import import_caffe  # noqa: E402
from dlbhc.errors import UserError, run_main  # noqa: E402


def pad_lmdb(src, dst, pad, mode="reflect", overwrite=False, batch=1000):
    import lmdb
    src, dst = Path(src), Path(dst)
    if not (src / "data.mdb").exists():
        raise UserError(f"{src} is not an LMDB (no data.mdb): run `make data` first")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists: pass --overwrite to replace it")
    if pad < 1:
        raise UserError("--pad must be at least 1")
    Datum = import_caffe().proto.caffe_pb2.Datum
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    src_env = lmdb.open(str(src), readonly=True, lock=False, readahead=True)
    size = src_env.info()["map_size"]
    dst_env = lmdb.open(str(partial), map_size=max(4 * size, 1 << 30))
    count, pending = 0, []
    datum = Datum()

    def flush():
        with dst_env.begin(write=True) as txn:
            for k, v in pending:
                txn.put(k, v)
        pending.clear()

    try:
        with src_env.begin() as txn:
            for k, v in txn.cursor():
                datum.ParseFromString(v)
                if datum.encoded:
                    raise UserError(f"{src} holds encoded images; write it without --encoded")
                img = np.frombuffer(datum.data, dtype=np.uint8).reshape(
                    datum.channels, datum.height, datum.width)
                img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
                out = Datum(channels=datum.channels, height=img.shape[1], width=img.shape[2],
                            data=np.ascontiguousarray(img).tobytes(), label=datum.label)
                pending.append((bytes(k), out.SerializeToString()))
                count += 1
                if len(pending) >= batch:
                    flush()
        flush()
    finally:
        src_env.close()
        dst_env.close()
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    return count


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
    n = pad_lmdb(args.src, args.dst, args.pad, args.mode, args.overwrite)
    print(f"{args.dst}: {n} images padded by {args.pad} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
