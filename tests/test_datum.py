"""dlbhc.datasets.datum: image set -> Caffe Datum database (LMDB, LevelDB), padding,
mean image; and the data/convert_imageset.py script. Every test here needs the
Caffe build (the conftest `caffe` fixture: a missing build fails them)."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlbhc.datasets.datum import compute_mean, convert_imageset, pad_imageset
from dlbhc.errors import UserError
from dlbhc.images import ImageItem, list_images, read_image, resize_for_net

PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("caffe")


def _rows(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), np.uint8)


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
    from dlbhc.nets.caffe_env import import_caffe
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


def test_convert_folder_to_lmdb(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlbhc")
    found = _image_folder(tmp_path / "imgs")
    out = tmp_path / "train_lmdb"
    result = convert_imageset(found, out, 8)
    assert result.written == 3 and result.path == out
    assert [Path(p).name for p, _ in result.skipped] == ["corrupt.jpg"]
    assert "skipped" in caplog.text
    skipped_file = tmp_path / "train_lmdb.skipped.tsv"
    header, line = skipped_file.read_text().rstrip("\n").split("\n")
    assert header.startswith("# path\treason") and "convert_imageset" in header
    path, reason = line.split("\t")
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


def test_pad_imageset_keeps_the_image_at_the_centre(tmp_path):
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
    assert not (tmp_path / "db.skipped.tsv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "imgs"]


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


def test_mean_matches_numpy(tmp_path):
    from dlbhc.nets.caffe_env import import_caffe
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


def test_mean_matches_caffe_compute_image_mean(tmp_path):
    from dlbhc.nets.caffe_env import caffe_tool, import_caffe
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


def test_mean_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compute_mean(tmp_path / "nope", None, None)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not an LMDB or LevelDB"):
        compute_mean(tmp_path / "plain", None, None)


# --- scripts --------------------------------------------------------------------

def _script(name, *args):
    return subprocess.run([sys.executable, str(PROJECT / "data" / name), *map(str, args)],
                          capture_output=True, text=True, cwd=PROJECT.parent)


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
