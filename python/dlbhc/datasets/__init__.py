"""Datasets: images into the forms Caffe trains on, and the data sets used.

Modules:
    datum       Caffe Datum databases: an image set converted into an LMDB
                (or LevelDB) as convert_imageset does, padded copies, the
                mean image, float feature records
    cifar10     CIFAR-10 as image folders and `path label` lists (download
                or a local archive, checksummed)
    debian      pinned Debian packages as data sources: apt-get download,
                sha256 check, unpack
    photos      a small collection of real photos in class folders, from a
                pinned Debian package
    fashion_mnist  Fashion-MNIST (28x28 grey product photos, 10 classes) as
                class folders, from a pinned Debian package: a collection of
                small images
    collection  a user's own collection for training: classes, labels and a
                held-out test split (DEFAULT_TEST_FRACTION of each class), or
                its images without labels (has_labels, load_unlabelled)

Only datum touches Caffe's protobuf messages, inside its functions.
"""
from .cifar10 import get_cifar10
from .collection import (DEFAULT_TEST_FRACTION, Collection, has_labels, load_collection,
                         load_unlabelled)
from .datum import compute_mean, convert_imageset, pad_imageset
from .fashion_mnist import get_fashion_mnist
from .photos import get_photos

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "Collection",
    "compute_mean", "convert_imageset", "get_cifar10", "get_fashion_mnist", "get_photos",
    "has_labels",
    "load_collection", "load_unlabelled",
    "pad_imageset",
]
