"""dlbhc.datasets.cifar10: the CIFAR-10 getter on fake archives (the network faked
through get_cifar10's opener), and the data/get_cifar10.py script."""
import hashlib
import io
import json
import logging
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

from dlbhc.datasets import cifar10
from dlbhc.datasets.cifar10 import (ARCHIVE_ENV, CIFAR10_CLASSES, CIFAR10_URL, COMPLETE_MARKER,
                           get_cifar10, verify_archive)
from dlbhc.errors import UserError
from dlbhc.images import list_images

PROJECT = Path(__file__).resolve().parents[1]
SHARED_JPG_ARCHIVE = PROJECT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"


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


def test_cifar_from_jpg_archive_and_rerun(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlbhc")
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
    assert "already complete" in caplog.text
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
    with pytest.raises(UserError) as info:
        get_cifar10(tmp_path / "cifar10", opener=offline)
    message = str(info.value)
    assert CIFAR10_URL in message and ARCHIVE_ENV in message and "--archive" in message
    assert not (tmp_path / "cifar10").exists()
    assert not list(tmp_path.iterdir())


def _serve(payload):
    """An opener that answers every URL with `payload`."""
    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}
    return lambda url, timeout: Response(payload)


def test_cifar_download_checks_md5_and_keeps_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ARCHIVE_ENV, raising=False)
    payload = make_python_archive(tmp_path / "served.tar.gz").read_bytes()
    with pytest.raises(UserError, match="md5"):
        get_cifar10(tmp_path / "a" / "cifar10", opener=_serve(payload))  # real md5 != fake's
    assert not list((tmp_path / "a").glob("*.partial"))
    assert not (tmp_path / "a" / "cifar-10-python.tar.gz").exists()

    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    result = get_cifar10(tmp_path / "b" / "cifar10", opener=_serve(payload))
    assert result.train == 5
    kept = tmp_path / "b" / "cifar-10-python.tar.gz"
    assert kept.read_bytes() == payload
    # A second destination next to it reuses the download (an opener of None
    # would fail if it were called).
    assert get_cifar10(tmp_path / "b" / "again", opener=None).train == 5


def test_cifar_damaged_download_is_fetched_again(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dlbhc")
    monkeypatch.delenv(ARCHIVE_ENV, raising=False)
    payload = make_python_archive(tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    kept = tmp_path / "cifar-10-python.tar.gz"
    kept.write_bytes(payload[:100])         # an interrupted earlier download
    assert get_cifar10(tmp_path / "cifar10", opener=_serve(payload)).train == 5
    assert "downloading it again" in caplog.text
    assert kept.read_bytes() == payload


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


def test_cifar_known_archive_name_is_checksummed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlbhc")
    fake = make_jpg_archive(tmp_path / "cifar10-jpg.tar.gz")
    with pytest.raises(UserError, match="sha256 .* expected 0e9467"):
        get_cifar10(tmp_path / "c", archive=fake)
    # Any other name is the user's own copy: noted, not checked.
    assert verify_archive(make_jpg_archive(tmp_path / "mine.tar.gz")) is False
    assert "not verified" in caplog.text


@pytest.mark.skipif(not SHARED_JPG_ARCHIVE.exists(), reason="no shared CIFAR-10 archive")
def test_shared_archive_checksum_is_accepted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlbhc")
    assert verify_archive(SHARED_JPG_ARCHIVE) is True      # checked, and it matches
    assert "not verified" not in caplog.text
    # The same check refuses a copy with one byte changed (the archive is
    # about 19 MB, so a copy in tmp_path is cheap).
    data = bytearray(SHARED_JPG_ARCHIVE.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged = tmp_path / SHARED_JPG_ARCHIVE.name
    damaged.write_bytes(data)
    with pytest.raises(UserError, match="sha256 .* expected 0e9467"):
        verify_archive(damaged)


def test_cifar_refuses_foreign_destination(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a complete CIFAR-10 folder"):
        get_cifar10(tmp_path / "c", archive=make_jpg_archive(tmp_path / "a.tar.gz"))
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep me"


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
