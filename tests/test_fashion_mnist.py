"""data/get_fashion_mnist.py: Fashion-MNIST's IDX files from a Debian package
into class folders (a collection of 28x28 images for the small-image recipes)."""
import gzip
import struct
import subprocess

import numpy as np
import pytest
from PIL import Image

from dlbhc.datasets import fashion_mnist as fm
from dlbhc.errors import UserError
from dlbhc.files import file_digest
from helpers import ROOT, run_script

GET_FASHION = ROOT / "data" / "get_fashion_mnist.py"


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_package(tmp_path, train_per_class=4, test_per_class=2):
    """A .deb laid out like dataset-fashion-mnist, with generated images whose
    first pixel is the index in the split (mod 256); its DebianDataset."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-fashion\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    folder = root / fm.FASHION_MNIST.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = rng.integers(0, 256, (len(labels), 28, 28))
        images[:, 0, 0] = np.arange(len(labels)) % 256
        image_file, label_file = fm.SPLIT_FILES[split]
        write_idx(folder / image_file, images, fm.IDX_IMAGES)
        write_idx(folder / label_file, labels, fm.IDX_LABELS)
    deb = tmp_path / "fake-fashion_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)
    pinned = fm.FASHION_MNIST
    source = pinned._replace(package="fake-fashion", version="1",
                             sha256=file_digest(deb, "sha256"))
    return deb, source, folder


def test_idx_reader_reads_what_was_written_and_refuses_the_wrong_kind(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array, fm.IDX_IMAGES)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz", fm.IDX_IMAGES), array)
    with pytest.raises(UserError, match="IDX magic 0x803, expected 0x801"):
        fm.read_idx(tmp_path / "a.gz", fm.IDX_LABELS)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">I3I", fm.IDX_IMAGES, 2, 3, 4) + bytes(5))
    with pytest.raises(UserError, match="5 values for the shape"):
        fm.read_idx(tmp_path / "short.gz", fm.IDX_IMAGES)


def test_first_per_class_keeps_the_release_order():
    labels = np.array([3, 1, 3, 3, 1, 0])
    assert list(fm.first_per_class(labels, 2)) == [0, 1, 2, 4, 5]
    assert list(fm.first_per_class(labels, None)) == [0, 1, 2, 3, 4, 5]


def test_collection_from_a_package_subset_and_a_wrong_checksum_refused(tmp_path):
    deb, source, folder = fake_package(tmp_path)
    result = fm.get_fashion_mnist(tmp_path / "out", deb=deb, per_class=3, test_per_class=1,
                                  source=source)
    assert result.dest.name == "fashion-mnist-3x1" and not result.reused
    assert result.counts == {"train": 30, "test": 10}
    labels = fm.read_idx(folder / fm.SPLIT_FILES["train"][1], fm.IDX_LABELS)
    images = fm.read_idx(folder / fm.SPLIT_FILES["train"][0], fm.IDX_IMAGES)
    lines = (result.dest / "train.txt").read_text().split("\n")[:-1]
    assert len(lines) == 30
    for line in lines:
        relpath, label = line.split()
        index = int(relpath.rsplit("/", 1)[1][:5])
        assert int(label) == labels[index]
        assert relpath.split("/")[1] == fm.FASHION_CLASSES[labels[index]]
        assert np.array_equal(np.asarray(Image.open(result.dest / relpath)), images[index])
    assert (result.dest / "classes.txt").read_text().split() == list(fm.FASHION_CLASSES)
    assert fm.get_fashion_mnist(tmp_path / "out", deb=deb, per_class=3, test_per_class=1,
                                source=source).reused
    with pytest.raises(UserError, match="sha256"):
        fm.get_fashion_mnist(tmp_path / "other", deb=deb, source=source._replace(sha256="0" * 64))
    assert not (tmp_path / "other").exists()
    with pytest.raises(UserError, match="at least 1"):
        fm.get_fashion_mnist(tmp_path / "zero", deb=deb, per_class=0, source=source)


def test_script_says_what_is_wrong_without_a_traceback(tmp_path):
    missing = run_script(GET_FASHION, ["--dest", tmp_path / "x", "--deb", tmp_path / "no.deb"],
                         check=False)
    assert missing.returncode != 0 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    # the real package's checksum against a file that is not it: refused, nothing written
    (tmp_path / "bogus.deb").write_bytes(b"not a package")
    bogus = run_script(GET_FASHION, ["--dest", tmp_path / "y", "--deb", tmp_path / "bogus.deb"],
                       check=False)
    assert bogus.returncode != 0 and "sha256" in bogus.stderr and "Traceback" not in bogus.stderr
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())
