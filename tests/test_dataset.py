"""dlbhc.dataset: CIFAR-10 getter on fake archives, image set -> Caffe DB,
mean image; and the data/ scripts in front of them."""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlbhc import dataset
from dlbhc.caffe_env import caffe_root
from dlbhc.dataset import (ARCHIVE_ENV, CIFAR10_CLASSES, CIFAR10_URL, COMPLETE_MARKER,
                           compute_mean, convert_imageset, get_cifar10)
from dlbhc.errors import UserError
from dlbhc.images import ImageItem, list_images, read_image, resize_for_net

PROJECT = Path(__file__).resolve().parents[1]
SHARED_JPG_ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"

needs_caffe = pytest.mark.skipif(
    not (caffe_root() / "python" / "caffe" / "_caffe.so").exists(),
    reason="pycaffe is not built (run `make caffe`)")


# --- fake CIFAR-10 archives ---------------------------------------------------

def py2_batch_pickle(rows, labels):
    """A batch pickled the way the official release is: Python 2, protocol 2,
    byte-string keys and a numpy.core array. Python 3 cannot write Python 2
    strings, so the opcodes are spelled out."""
    def s(b):       # SHORT_BINSTRING / BINSTRING
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v):       # BININT
        return b"J" + struct.pack("<i", v)
    out = bytearray(b"\x80\x02}(")
    out += s(b"batch_label") + s(b"fake batch")
    out += s(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    out += i(0) + b"\x85" + s(b"b") + b"\x87R"
    out += b"(" + i(1) + i(rows.shape[0]) + i(rows.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
    out += b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    out += b"\x89" + s(rows.tobytes()) + b"tb"
    out += s(b"labels") + b"](" + b"".join(i(int(v)) for v in labels) + b"e"
    out += b"u."
    return bytes(out)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _rows(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), np.uint8)


BATCHES = {   # name -> (rows, labels); data_batch_2 is stored first on purpose
    "data_batch_2": (_rows(2, 2), [3, 1]),
    "data_batch_1": (_rows(3, 1), [0, 3, 9]),
    "test_batch": (_rows(2, 3), [9, 0]),
}


def make_python_archive(path):
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        for name, (rows, labels) in BATCHES.items():
            _add(tar, f"cifar-10-batches-py/{name}", py2_batch_pickle(rows, labels))
        _add(tar, "cifar-10-batches-py/batches.meta", b"not needed")
    return path


JPG_MEMBERS = ["train/cat/0001.jpg", "train/cat/0000.jpg", "train/airplane/0000.jpg",
               "test/truck/0000.jpg"]


def _jpeg_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(_rows(1, seed).reshape(32, 32, 3)).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def make_jpg_archive(path, members=JPG_MEMBERS):
    with tarfile.open(path, "w:gz") as tar:
        for d in ["train/", "train/cat/", "test/"]:
            info = tarfile.TarInfo(d.rstrip("/"))
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        _add(tar, "README.txt", b"fake")
        for k, name in enumerate(members):
            _add(tar, name, _jpeg_bytes(k))
    return path


# --- CIFAR-10 getter ----------------------------------------------------------

def test_cifar_from_official_python_batches(tmp_path):
    archive = make_python_archive(tmp_path / "fake-python.tar.gz")
    dest = tmp_path / "cifar10"
    result = get_cifar10(dest, archive=archive)
    assert (result.train, result.test, result.format, result.reused) == (5, 2, "python", False)
    assert (dest / "train.txt").read_text() == (
        "train/airplane/00000.png 0\n"
        "train/automobile/10001.png 1\n"
        "train/cat/00001.png 3\n"
        "train/cat/10000.png 3\n"
        "train/truck/00002.png 9\n")
    assert (dest / "test.txt").read_text() == "test/airplane/00001.png 0\ntest/truck/00000.png 9\n"
    assert (dest / "classes.txt").read_text().split() == list(CIFAR10_CLASSES)
    assert json.loads((dest / COMPLETE_MARKER).read_text())["train"] == 5
    # Lossless, and rows are channel-major R, G, B planes.
    row = BATCHES["data_batch_2"][0][0]
    png = np.asarray(Image.open(dest / "train/cat/10000.png"))
    np.testing.assert_array_equal(png, row.reshape(3, 32, 32).transpose(1, 2, 0))
    assert png[0, 0].tolist() == [row[0], row[1024], row[2048]]
    # Every class folder exists, the lists agree with a folder walk.
    walked = list_images(dest / "train")
    assert walked.classes == list(CIFAR10_CLASSES)
    assert [(f"train/{i.relpath}", i.label) for i in walked.items] == [
        (line.split()[0], int(line.split()[1]))
        for line in (dest / "train.txt").read_text().splitlines()]
    assert not list(tmp_path.glob(".cifar10.partial-*"))


def test_cifar_from_jpg_archive_and_rerun(tmp_path, capsys):
    archive = make_jpg_archive(tmp_path / "my-copy.tar.gz")
    dest = tmp_path / "out" / "cifar10"
    result = get_cifar10(dest, archive=archive)
    assert (result.train, result.test, result.format) == (3, 1, "jpg")
    assert (dest / "train.txt").read_text() == (
        "train/airplane/0000.jpg 0\ntrain/cat/0000.jpg 3\ntrain/cat/0001.jpg 3\n")
    assert (dest / "test.txt").read_text() == "test/truck/0000.jpg 9\n"
    # JPEG bytes are copied as they are, not re-encoded.
    assert (dest / "train/cat/0001.jpg").read_bytes() == _jpeg_bytes(0)
    assert not (dest / "README.txt").exists()
    before = (dest / "train.txt").stat().st_mtime_ns
    again = get_cifar10(dest, archive=archive)
    assert again.reused and (again.train, again.test) == (3, 1)
    assert (dest / "train.txt").stat().st_mtime_ns == before
    assert "already complete" in capsys.readouterr().err
    (dest / COMPLETE_MARKER).write_text("{oops")
    with pytest.raises(UserError, match="damaged; delete"):
        get_cifar10(dest, archive=archive)


def test_cifar_archive_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ARCHIVE_ENV, str(make_jpg_archive(tmp_path / "env.tar.gz")))
    assert get_cifar10(tmp_path / "c").train == 3


def test_cifar_offline_without_archive(tmp_path, monkeypatch):
    monkeypatch.delenv(ARCHIVE_ENV, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(dataset.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as info:
        get_cifar10(tmp_path / "cifar10")
    message = str(info.value)
    assert CIFAR10_URL in message and ARCHIVE_ENV in message and "--archive" in message
    assert not (tmp_path / "cifar10").exists()
    assert not list(tmp_path.iterdir())


def test_cifar_download_checks_md5_and_keeps_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ARCHIVE_ENV, raising=False)
    payload = make_python_archive(tmp_path / "served.tar.gz").read_bytes()

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}
    monkeypatch.setattr(dataset.urllib.request, "urlopen",
                        lambda url, timeout: Response(payload))
    with pytest.raises(UserError, match="md5"):
        get_cifar10(tmp_path / "a" / "cifar10")    # real md5 != fake archive's
    assert not list((tmp_path / "a").glob("*.download"))

    monkeypatch.setattr(dataset, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    result = get_cifar10(tmp_path / "b" / "cifar10")
    assert result.train == 5
    kept = tmp_path / "b" / "cifar-10-python.tar.gz"
    assert kept.read_bytes() == payload
    # A second destination next to it reuses the download.
    monkeypatch.setattr(dataset.urllib.request, "urlopen", None)
    assert get_cifar10(tmp_path / "b" / "again").train == 5


def test_cifar_bad_archives(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_cifar10(tmp_path / "c", archive=tmp_path / "missing.tar.gz")
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(make_jpg_archive(tmp_path / "whole.tar.gz").read_bytes()[:500])
    with pytest.raises(UserError, match="cannot read CIFAR-10 archive"):
        get_cifar10(tmp_path / "c", archive=truncated)
    text = tmp_path / "text.tar.gz"
    text.write_text("hello")
    with pytest.raises(UserError, match="cannot read CIFAR-10 archive"):
        get_cifar10(tmp_path / "c", archive=text)
    # Nothing half-made is left behind.
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial-*"))


def test_cifar_archive_without_cifar_content(tmp_path):
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        _add(tar, "photos/a.jpg", b"x")
    with pytest.raises(UserError, match="holds no CIFAR-10 images"):
        get_cifar10(tmp_path / "c", archive=tmp_path / "other.tar.gz")
    make_jpg_archive(tmp_path / "odd.tar.gz", ["train/unicorn/0000.jpg"])
    with pytest.raises(UserError, match="unknown class folder 'unicorn'"):
        get_cifar10(tmp_path / "c", archive=tmp_path / "odd.tar.gz")
    make_jpg_archive(tmp_path / "train-only.tar.gz", ["train/cat/0000.jpg"])
    with pytest.raises(UserError, match="no test images"):
        get_cifar10(tmp_path / "c", archive=tmp_path / "train-only.tar.gz")


def test_cifar_rejects_code_in_batch_pickle(tmp_path):
    evil = b"\x80\x02cos\nsystem\nU\x04true\x85R."
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/data_batch_1", evil)
    with pytest.raises(UserError, match="not a valid pickled batch.*os.system"):
        get_cifar10(tmp_path / "c", archive=tmp_path / "evil.tar.gz")


def test_cifar_known_archive_name_is_checksummed(tmp_path):
    fake = make_jpg_archive(tmp_path / "cifar10-jpg.tar.gz")
    with pytest.raises(UserError, match="sha256 .* expected 0e9467"):
        get_cifar10(tmp_path / "c", archive=fake)


@pytest.mark.skipif(not SHARED_JPG_ARCHIVE.exists(), reason="no shared CIFAR-10 archive")
def test_shared_archive_checksum_is_accepted(capsys):
    dataset._verify_known_archive(SHARED_JPG_ARCHIVE, sys.stderr)


def test_cifar_refuses_foreign_destination(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a complete CIFAR-10 folder"):
        get_cifar10(tmp_path / "c", archive=make_jpg_archive(tmp_path / "a.tar.gz"))
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep me"


# --- converter and mean -------------------------------------------------------

def _image_folder(root):
    """Classes a, b; a pure-red PNG, a grey PNG, a JPEG and one corrupt file."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (10, 6), (255, 0, 0)).save(root / "a" / "red.png")
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10) * 4, "L").save(root / "a" / "gray.png")
    (root / "b" / "corrupt.jpg").write_bytes(os.urandom(300))
    Image.fromarray(_rows(1, 7).reshape(32, 32, 3)).save(root / "b" / "noise.jpg", quality=90)
    return list_images(root)


def _read_lmdb(path):
    import lmdb
    from dlbhc.caffe_env import import_caffe
    Datum = import_caffe().proto.caffe_pb2.Datum
    env = lmdb.open(str(path), readonly=True, lock=False)
    records = []
    with env.begin() as txn:
        for key, value in txn.cursor():
            datum = Datum()
            datum.ParseFromString(value)
            arr = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
            records.append((key.decode(), datum.label, arr))
    env.close()
    return records


@needs_caffe
def test_convert_folder_to_lmdb(tmp_path, capsys):
    found = _image_folder(tmp_path / "imgs")
    out = tmp_path / "train_lmdb"
    result = convert_imageset(found, out, 8)
    assert result.written == 3 and result.path == out
    assert [Path(p).name for p, _ in result.skipped] == ["corrupt.jpg"]
    assert "skipped" in capsys.readouterr().err
    skipped_file = tmp_path / "train_lmdb.skipped.txt"
    path, reason = skipped_file.read_text().rstrip("\n").split("\t")
    assert path.endswith("b/corrupt.jpg") and "not an image" in reason

    records = _read_lmdb(out)
    # Caffe's "%08d_<path>" keys; the corrupt file (position 2) leaves a gap.
    assert [(k, label) for k, label, _ in records] == [
        ("00000000_a/gray.png", 0), ("00000001_a/red.png", 0), ("00000003_b/noise.jpg", 1)]
    assert all(arr.shape == (3, 8, 8) and arr.dtype == np.uint8 for _, _, arr in records)
    red = records[1][2]
    assert (red[2] == 255).all() and (red[0] == 0).all() and (red[1] == 0).all()  # BGR
    noise = records[2][2]
    expected = resize_for_net(read_image(tmp_path / "imgs/b/noise.jpg"), 8)
    np.testing.assert_array_equal(noise, expected[:, :, ::-1].transpose(2, 0, 1))
    assert not (tmp_path / "train_lmdb.partial").exists()


@needs_caffe
def test_pad_imageset_keeps_the_image_at_the_centre(tmp_path):
    from dlbhc.dataset import pad_imageset
    convert_imageset(_image_folder(tmp_path / "imgs"), tmp_path / "src_lmdb", 8)
    n = pad_imageset(tmp_path / "src_lmdb", tmp_path / "pad_lmdb", pad=2)
    original, padded = _read_lmdb(tmp_path / "src_lmdb"), _read_lmdb(tmp_path / "pad_lmdb")
    assert n == len(padded) == 3
    for (k1, l1, a), (k2, l2, b) in zip(original, padded):
        assert (k1, l1) == (k2, l2) and b.shape == (3, 12, 12)
        np.testing.assert_array_equal(b[:, 2:10, 2:10], a)        # centre crop = original
        np.testing.assert_array_equal(b[:, 0, 2:10], a[:, 2, :])  # reflected border
    with pytest.raises(UserError, match="exists"):
        pad_imageset(tmp_path / "src_lmdb", tmp_path / "pad_lmdb", pad=2)


@needs_caffe
def test_convert_refuses_existing_output_unless_overwrite(tmp_path):
    found = _image_folder(tmp_path / "imgs")
    out = tmp_path / "db"
    convert_imageset(found, out, 4)
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        convert_imageset(found, out, 4)
    good = [i for i in found.items if "corrupt" not in i.relpath]
    result = convert_imageset(good, out, 5, overwrite=True)
    assert result.written == 3 and not result.skipped
    assert _read_lmdb(out)[0][2].shape == (3, 5, 5)
    # The stale skipped list of the first run is gone.
    assert not (tmp_path / "db.skipped.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "imgs"]


@needs_caffe
def test_convert_shuffle_is_seeded_and_deterministic(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(12):
        Image.new("RGB", (4, 4), (k * 20, 0, 0)).save(folder / f"{k:02d}.png")
    items = list_images(folder).items
    orders = []
    for name, seed in [("plain", None), ("s1", 1), ("s1b", 1), ("s2", 2)]:
        convert_imageset(items, tmp_path / name, 4, shuffle_seed=seed)
        keys = [k for k, _, _ in _read_lmdb(tmp_path / name)]
        assert [k[:8] for k in keys] == [f"{i:08d}" for i in range(12)]
        orders.append([k[9:] for k in keys])
    plain, s1, s1b, s2 = orders
    assert plain == sorted(plain) and s1 == s1b and s1 != plain and s1 != s2
    assert sorted(s1) == plain
    assert [i.relpath for i in items] == plain      # input list left untouched


@needs_caffe
def test_convert_leveldb_and_list_file(tmp_path):
    import plyvel
    _image_folder(tmp_path / "imgs")
    lst = tmp_path / "list.txt"
    lst.write_text("a/red.png 5\n# comment\nb/noise.jpg 7\n")
    found = list_images(lst, root=tmp_path / "imgs")
    result = convert_imageset(found, tmp_path / "db", 6, backend="leveldb")
    assert result.written == 2
    db = plyvel.DB(str(tmp_path / "db"))
    keys = [k.decode() for k, _ in db.iterator()]
    db.close()
    assert keys == ["00000000_a/red.png", "00000001_b/noise.jpg"]
    mean = compute_mean(tmp_path / "db", None, tmp_path / "m.npy")
    assert mean.count == 2 and np.load(tmp_path / "m.npy").shape == (3, 6, 6)


@needs_caffe
def test_convert_bad_arguments(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 images could be read.*0 bytes"):
        convert_imageset([ImageItem(bad, 0, "bad.jpg")], tmp_path / "db", 8)
    assert not (tmp_path / "db").exists() and not (tmp_path / "db.partial").exists()
    with pytest.raises(UserError, match="backend"):
        convert_imageset([ImageItem(bad, 0)], tmp_path / "db", 8, backend="hdf5")
    with pytest.raises(UserError, match="positive"):
        convert_imageset([ImageItem(bad, 0)], tmp_path / "db", 0)
    with pytest.raises(UserError, match="no images"):
        convert_imageset([], tmp_path / "db", 8)


@needs_caffe
def test_mean_matches_numpy(tmp_path):
    from dlbhc.caffe_env import import_caffe
    found = _image_folder(tmp_path / "imgs")
    convert_imageset(found, tmp_path / "db", 7)
    result = compute_mean(tmp_path / "db", tmp_path / "mean.binaryproto", tmp_path / "mean.npy")
    stack = [resize_for_net(read_image(i.path), 7)[:, :, ::-1].transpose(2, 0, 1)
             for i in found.items if "corrupt" not in i.relpath]
    expected = np.mean(np.stack(stack).astype(np.float64), axis=0)
    assert result.count == 3
    np.testing.assert_allclose(result.mean, expected, rtol=0, atol=1e-4)
    npy = np.load(tmp_path / "mean.npy")
    assert npy.dtype == np.float32 and npy.shape == (3, 7, 7)
    np.testing.assert_array_equal(npy, result.mean)
    np.testing.assert_allclose(result.channel_mean, expected.mean(axis=(1, 2)), atol=1e-4)
    blob = import_caffe().proto.caffe_pb2.BlobProto()
    blob.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 7, 7)
    np.testing.assert_allclose(np.array(blob.data).reshape(3, 7, 7), expected, atol=1e-4)


@needs_caffe
@pytest.mark.skipif(not (caffe_root() / "build/tools/compute_image_mean").exists(),
                    reason="Caffe's compute_image_mean tool is not built")
def test_mean_matches_caffe_compute_image_mean(tmp_path):
    from dlbhc.caffe_env import caffe_tool, import_caffe
    convert_imageset(_image_folder(tmp_path / "imgs"), tmp_path / "db", 9)
    ours = compute_mean(tmp_path / "db", tmp_path / "ours.binaryproto", None)
    subprocess.run([str(caffe_tool("compute_image_mean")), "-backend", "lmdb",
                    str(tmp_path / "db"), str(tmp_path / "caffe.binaryproto")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_minloglevel": "2"})
    caffe = import_caffe()
    blobs = []
    for name in ["caffe", "ours"]:
        blob = caffe.proto.caffe_pb2.BlobProto()
        blob.ParseFromString((tmp_path / f"{name}.binaryproto").read_bytes())
        blobs.append(blob)
    theirs = caffe.io.blobproto_to_array(blobs[0])
    assert theirs.shape == (1, 3, 9, 9)
    np.testing.assert_allclose(caffe.io.blobproto_to_array(blobs[1]), theirs, atol=1e-4)
    np.testing.assert_allclose(ours.mean, theirs[0], atol=1e-4)


@needs_caffe
def test_mean_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compute_mean(tmp_path / "nope", None, None)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not an LMDB or LevelDB"):
        compute_mean(tmp_path / "plain", None, None)


# --- scripts --------------------------------------------------------------------

def _script(name, *args):
    return subprocess.run([sys.executable, str(PROJECT / "data" / name), *map(str, args)],
                          capture_output=True, text=True, cwd=PROJECT.parent,
                          env={k: v for k, v in os.environ.items() if k != ARCHIVE_ENV})


def test_get_cifar10_script(tmp_path):
    archive = make_jpg_archive(tmp_path / "a.tar.gz")
    run = _script("get_cifar10.py", "--dest", tmp_path / "c", "--archive", archive)
    assert run.returncode == 0, run.stderr
    assert "3 train + 1 test images" in run.stdout
    bad = _script("get_cifar10.py", "--dest", tmp_path / "d", "--archive", tmp_path / "no.tar.gz")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@needs_caffe
def test_convert_imageset_script(tmp_path):
    _image_folder(tmp_path / "imgs")
    run = _script("convert_imageset.py", tmp_path / "imgs", tmp_path / "db", "--size", "8",
                  "--shuffle-seed", "3", "--mean", tmp_path / "mean")
    assert run.returncode == 0, run.stderr
    assert "labels: 0=a, 1=b" in run.stdout and "3 images written, 1 skipped" in run.stdout
    assert (tmp_path / "mean.binaryproto").exists() and np.load(tmp_path / "mean.npy").shape == (3, 8, 8)
    again = _script("convert_imageset.py", tmp_path / "imgs", tmp_path / "db", "--size", "8")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
