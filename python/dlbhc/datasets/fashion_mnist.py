"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando Research; MIT
licence) as image folders: 28x28 grey product photos in 10 classes, 60,000
for training and 10,000 for testing. A collection of small images the
project has never trained on, to measure the recipes for small images on.

The source is Debian's package `dataset-fashion-mnist` (the release's IDX
files under /usr/share/datasets/fashion-mnist/), fetched with `apt-get
download` (nothing installed, no root) and its sha256 checked, as photos.py
does for its photos. get_fashion_mnist writes

    <dest>/{train,test}/<class>/NNNNN.png   (grey PNG, the release's pixels)
    <dest>/train.txt, test.txt              (`split/class/file label`)
    <dest>/classes.txt, SOURCE.txt

optionally only the first `per_class` training (and `test_per_class` test)
images of each class, in the release's order: a smaller collection with the
same classes (its folder name says so).
"""
import gzip
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import atomic_write, replace_dir
from .debian import COMPLETE_MARKER, unpack_checked


class DebianDataset(NamedTuple):
    package: str
    version: str
    sha256: str               # of the .deb file
    folder: str               # the IDX files inside the package


FASHION_MNIST = DebianDataset(
    package="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    folder="usr/share/datasets/fashion-mnist")
# Label i is FASHION_CLASSES[i] (the release's README), as folder names.
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot")
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_IMAGES, IDX_LABELS = 0x803, 0x801


class FashionResult(NamedTuple):
    dest: Path
    counts: dict              # split -> images
    reused: bool


def read_idx(path, expected_magic):
    """The uint8 array of a gzipped IDX file (big-endian header: magic, then
    one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise UserError(f"{path}: too short for an IDX file")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise UserError(f"{path}: IDX magic {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path}: {array.size} values for the shape {shape}")
    return array.reshape(shape)


def collection_name(per_class=None, test_per_class=None):
    if per_class is None and test_per_class is None:
        return "fashion-mnist"
    return f"fashion-mnist-{per_class or 'all'}x{test_per_class or 'all'}"


def first_per_class(labels, n):
    """Indices of the first n images of each class, in the release's order."""
    if n is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n]
                                   for c in range(len(FASHION_CLASSES))]))


def get_fashion_mnist(dest_root, deb=None, per_class=None, test_per_class=None,
                      source=FASHION_MNIST):
    """The collection in dest_root/<collection_name>/ (see the module
    docstring); reused when complete, written in a .partial folder and
    renamed, so an interrupted run leaves nothing half-made."""
    for value in (per_class, test_per_class):
        if value is not None and value < 1:
            raise UserError(f"images per class must be at least 1, got {value}")
    dest = Path(dest_root) / collection_name(per_class, test_per_class)
    if (dest / COMPLETE_MARKER).exists():
        counts = {s: sum(1 for _ in (dest / s).glob("*/*.png")) for s in SPLIT_FILES}
        return FashionResult(dest, counts, True)
    with tempfile.TemporaryDirectory(prefix="dlbhc-fashion-") as tmp:
        tmp = Path(tmp)
        deb, unpacked = unpack_checked(source, deb, tmp)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        counts = {}
        for split, limit in (("train", per_class), ("test", test_per_class)):
            image_file, label_file = (unpacked / source.folder / f for f in SPLIT_FILES[split])
            if not image_file.is_file():
                raise UserError(f"{deb} has no {source.folder}/{image_file.name}")
            images, labels = read_idx(image_file, IDX_IMAGES), read_idx(label_file, IDX_LABELS)
            if len(images) != len(labels):
                raise UserError(f"{deb}: {len(images)} {split} images but {len(labels)} labels")
            counts[split] = write_split(partial, split, images, labels,
                                        first_per_class(labels, limit))
        (partial / "classes.txt").write_text("".join(f"{c}\n" for c in FASHION_CLASSES))
        (partial / "SOURCE.txt").write_text(
            f"Fashion-MNIST from Debian's {source.package} {source.version} (sha256 "
            f"{source.sha256}); MIT licence, Zalando Research. "
            + (f"First {per_class or 'all'} training and {test_per_class or 'all'} test "
               "images of each class, in the release's order.\n" if dest.name != "fashion-mnist"
               else "All images.\n"))
        atomic_write(partial / COMPLETE_MARKER, lambda f: f.write(b"ok\n"))
        replace_dir(partial, dest)
    return FashionResult(dest, counts, False)


def write_split(root, split, images, labels, chosen):
    """root/split/<class>/NNNNN.png (NNNNN: the index in the release) and
    root/split.txt; the number written."""
    for name in FASHION_CLASSES:
        (root / split / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in chosen:
        relpath = f"{split}/{FASHION_CLASSES[labels[i]]}/{i:05d}.png"
        Image.fromarray(images[i], mode="L").save(root / relpath)
        lines.append(f"{relpath} {int(labels[i])}\n")
    (root / f"{split}.txt").write_text("".join(lines))
    return len(lines)
