"""Data preparation: get CIFAR-10 as image folders, convert an image set into
a Caffe Datum database (LMDB or LevelDB), and compute its mean image.

The database format is exactly what Caffe's own tools/convert_imageset writes,
so Caffe's Data layer and compute_image_mean read it unchanged. Caffe is
imported only inside the functions that build or parse Datum messages; the
CIFAR-10 getter works without a Caffe build.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .caffe_env import import_caffe
from .errors import UserError
from .store import detect_backend as store_backend
from .images import BadImage, read_image, resize_for_net
from .progress import Progress

# --- CIFAR-10 -----------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_ENV = "CIFAR10_ARCHIVE"
# Label i is CIFAR10_CLASSES[i], the order of the official batches.meta (which
# is also alphabetical, so list_images on the extracted folders agrees).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Archives whose file name we recognise are checked against their published
# digest; any other file name is taken as a user-made copy and not checked.
KNOWN_ARCHIVES = {
    "cifar-10-python.tar.gz": ("md5", CIFAR10_MD5),
    "cifar10-jpg.tar.gz": (
        "sha256", "0e9467361a3721b0cdaadd8259975ded88369b5d8ee16375719280c0b29251a3"),
}
COMPLETE_MARKER = "cifar10.complete.json"
_OFFICIAL_BATCH_ROWS = 10000
_BATCH_RE = re.compile(r"(?:^|/)(data_batch_([1-5])|test_batch)$")
# train/<class>/<file> or test/<class>/<file>, optionally under one top folder.
_JPG_MEMBER_RE = re.compile(r"^(?:[^/]+/)?(train|test)/([^/]+)/([^/]+)$")
_SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(?:jpe?g|png)$", re.IGNORECASE)


class CifarResult(NamedTuple):
    dest: Path
    train: int          # number of training images
    test: int           # number of test images
    format: str         # "python" (official batches, PNG out) or "jpg"
    archive: str        # the archive the images came from
    reused: bool        # True when dest was already complete and left alone


def get_cifar10(dest_dir, archive=None, url=CIFAR10_URL, stream=None):
    """Make dest_dir/{train,test}/<class>/*.{png,jpg} plus train.txt, test.txt
    (`relative/path label` lines, labels in CIFAR10_CLASSES order) and
    classes.txt.

    archive (else $CIFAR10_ARCHIVE) is a local copy: either the official
    cifar-10-python.tar.gz (pickled batches, written out as lossless PNG) or a
    tar.gz of train/<class>/*.jpg and test/<class>/*.jpg. Without one, the
    official release is downloaded next to dest_dir and its md5 checked.
    Re-running on a complete dest_dir does nothing; the folder only appears
    once everything (marker file last) has been written.
    """
    stream = stream or sys.stderr
    dest = Path(dest_dir)
    marker = dest / COMPLETE_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            info["train"], info["test"], info["format"], info["archive"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{marker} is damaged; delete {dest} and run again") from None
        print(f"{dest} is already complete ({info['train']} train, {info['test']} "
              f"test images); delete it to rebuild", file=stream)
        return CifarResult(dest, info["train"], info["test"], info["format"],
                           info["archive"], True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(
            f"{dest} exists but is not a complete CIFAR-10 folder (no {COMPLETE_MARKER}); "
            "remove it or choose another destination")

    given_by = "archive argument (--archive)" if archive else f"${ARCHIVE_ENV}"
    archive = archive or os.environ.get(ARCHIVE_ENV) or None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if archive:
        archive = Path(archive)
        if not archive.is_file():
            raise UserError(f"CIFAR-10 archive {archive} (from the {given_by}) does "
                            "not exist or is not a file")
        _verify_known_archive(archive, stream)
    else:
        archive = _download_official(url, dest.parent / "cifar-10-python.tar.gz", stream)

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        fmt = _extract_cifar(archive, tmp, stream)
        counts = _write_cifar_lists(tmp)
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in CIFAR10_CLASSES))
        info = {"format": fmt, "archive": str(archive), "train": counts["train"],
                "test": counts["test"], "classes": list(CIFAR10_CLASSES)}
        # Written last: its presence means every image and list is in place.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if dest.is_dir():
            dest.rmdir()        # empty (checked above); rename needs it gone
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CifarResult(dest, counts["train"], counts["test"], fmt, str(archive), False)


def _file_digest(path, algo):
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_known_archive(archive, stream):
    known = KNOWN_ARCHIVES.get(archive.name)
    if not known:
        print(f"note: {archive.name} is not a published CIFAR-10 archive name; "
              "its checksum is not verified", file=stream)
        return
    algo, expected = known
    actual = _file_digest(archive, algo)
    if actual != expected:
        raise UserError(
            f"{archive} has {algo} {actual}, expected {expected}: the file is "
            "damaged or a different version; download it again")


def _download_official(url, target, stream):
    """Download the official archive to `target` (kept, so a rerun does not
    download again), checking its md5; reuse a good copy already there."""
    if target.is_file():
        if _file_digest(target, "md5") == CIFAR10_MD5:
            print(f"using the already downloaded {target}", file=stream)
            return target
        print(f"{target} is incomplete or damaged; downloading it again", file=stream)
    part = target.with_name(target.name + ".download")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            length = int(response.headers.get("Content-Length") or 0)
            progress = Progress(length // 1024, label="download cifar-10", unit="KiB",
                                stream=stream)
            for chunk in iter(lambda: response.read(64 * 1024), b""):
                out.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk) // 1024)
            progress.close()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        raise UserError(
            f"cannot download CIFAR-10 from {url} ({getattr(err, 'reason', err)}). "
            "If this machine is offline, get cifar-10-python.tar.gz elsewhere and pass "
            f"it with --archive PATH or the {ARCHIVE_ENV} environment variable") from None
    if digest.hexdigest() != CIFAR10_MD5:
        part.unlink(missing_ok=True)
        raise UserError(f"downloaded {url} has md5 {digest.hexdigest()}, expected "
                        f"{CIFAR10_MD5}; the download was damaged, run again")
    os.replace(part, target)
    return target


class _BatchUnpickler(pickle.Unpickler):
    """The official batches are pickles; a plain pickle.load would run any code
    a tampered archive contains. Only what a dict of numpy arrays needs may be
    loaded."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        # Batches pickled by numpy 1.x name numpy.core, which numpy 2 renamed.
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in batch")
        return super().find_class(module, name)


def _load_batch(data, name):
    try:
        # latin1 is how numpy arrays pickled by Python 2 (the official
        # release) must be read.
        batch = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"CIFAR-10 batch {name} is not a valid pickled batch ({err})") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR-10 batch {name} is not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    rows = np.asarray(batch.get("data"))
    labels = np.asarray(batch.get("labels"))
    if (rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32
            or labels.shape != (rows.shape[0],) or rows.shape[0] > _OFFICIAL_BATCH_ROWS
            or (labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)))):
        raise UserError(f"CIFAR-10 batch {name} does not hold uint8 rows of 3072 bytes "
                        "with labels 0..9")
    return rows, labels.astype(int)


def _extract_cifar(archive, out_dir, stream):
    """Stream through the tar archive once, writing images into out_dir.
    Returns the format found ("python" or "jpg")."""
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (out_dir / split / name).mkdir(parents=True)
    expected = 60000 if archive.name in KNOWN_ARCHIVES else 0
    progress = Progress(expected, label="extract cifar-10", stream=stream)
    formats = set()
    try:
        # "r|*": sequential read, no seeking, so a large .tar.gz is never
        # unpacked to disk or re-read.
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                batch = _BATCH_RE.search(name)
                if batch:
                    formats.add("python")
                    rows, labels = _load_batch(tar.extractfile(member).read(), name)
                    if batch.group(2):
                        split, offset = "train", (int(batch.group(2)) - 1) * _OFFICIAL_BATCH_ROWS
                    else:
                        split, offset = "test", 0
                    for i, (row, label) in enumerate(zip(rows, labels)):
                        # Rows are channel-major: 1024 R, 1024 G, 1024 B.
                        rgb = row.reshape(3, 32, 32).transpose(1, 2, 0)
                        # Named by position in the official split order, so a
                        # file traces back to its row in the release.
                        path = out_dir / split / CIFAR10_CLASSES[label] / f"{offset + i:05d}.png"
                        Image.fromarray(rgb).save(path, format="PNG")
                        progress.update()
                    continue
                match = _JPG_MEMBER_RE.match(name)
                if not match:
                    continue        # readme.html, batches.meta, ...
                split, cls, filename = match.groups()
                if cls not in CIFAR10_CLASSES:
                    raise UserError(f"{archive}: {name} is in unknown class folder {cls!r}; "
                                    f"CIFAR-10 classes are {', '.join(CIFAR10_CLASSES)}")
                if not _SAFE_FILE_RE.match(filename):
                    continue        # not an image, or a name we will not write
                target = out_dir / split / cls / filename
                if target.exists():
                    raise UserError(f"{archive}: {split}/{cls}/{filename} appears twice")
                formats.add("jpg")
                target.write_bytes(tar.extractfile(member).read())
                progress.update()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read CIFAR-10 archive {archive} ({err}); it should be "
                        "a .tar.gz, complete and undamaged") from None
    progress.close()
    if not formats:
        raise UserError(
            f"{archive} holds no CIFAR-10 images: expected the official python batches "
            "(data_batch_1..5, test_batch) or train/<class>/*.jpg and test/<class>/*.jpg")
    return "+".join(sorted(formats))


def _write_cifar_lists(root):
    """Write train.txt / test.txt (`split/class/file label`, class order then
    file name) and return the per-split counts."""
    counts = {}
    for split in ("train", "test"):
        lines = []
        for label, cls in enumerate(CIFAR10_CLASSES):
            for name in sorted(os.listdir(root / split / cls)):
                lines.append(f"{split}/{cls}/{name} {label}\n")
        if not lines:
            raise UserError(f"the archive has no {split} images; it is not a complete "
                            "CIFAR-10 archive")
        (root / f"{split}.txt").write_text("".join(lines))
        counts[split] = len(lines)
    return counts


# --- image set -> Caffe database -------------------------------------------------

BACKENDS = ("lmdb", "leveldb")
# LMDB refuses keys longer than its compiled-in maximum (511 bytes).
_MAX_KEY_BYTES = 511


class ConvertResult(NamedTuple):
    path: Path          # the database written
    written: int        # images stored
    skipped: list       # (path, reason) of images that could not be read
    seconds: float


def _datum_key(index, relpath):
    """Caffe's convert_imageset key: the 8-digit position in the (shuffled)
    list, '_', and the path as listed ("%08d_%s"). The zero-padded index makes
    key order = conversion order, which is the order Caffe's Data layer reads.
    Over-long paths are cut to fit LMDB's key limit; the index keeps keys
    unique."""
    key = f"{index:08d}_{relpath}".encode("utf-8")
    if len(key) > _MAX_KEY_BYTES:
        key = key[:_MAX_KEY_BYTES].decode("utf-8", errors="ignore").encode("utf-8")
    return key


class _LmdbWriter:
    def __init__(self, path, expected_bytes):
        import lmdb
        self._lmdb = lmdb
        # Start near the expected size and double when full, rather than
        # reserving Caffe's fixed 1 TB map, which some filesystems refuse.
        self.env = lmdb.open(str(path), map_size=max(expected_bytes, 2**24),
                             subdir=True, meminit=False)

    def put_batch(self, pairs):
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in pairs:
                        txn.put(key, value)
                return
            except self._lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self):
        self.env.sync(True)
        self.env.close()


class _LevelDbWriter:
    def __init__(self, path, expected_bytes):
        import plyvel
        # The options Caffe's db_leveldb.cpp opens a new database with.
        self.db = plyvel.DB(str(path), create_if_missing=True, error_if_exists=True,
                            block_size=65536, write_buffer_size=268435456,
                            max_open_files=100)

    def put_batch(self, pairs):
        with self.db.write_batch() as batch:
            for key, value in pairs:
                batch.put(key, value)

    def close(self):
        self.db.close()


def _check_size(size):
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise UserError(f"image size must be a positive integer (or height, width), got {size!r}")
    return pair


def convert_imageset(items, out_lmdb, size, shuffle_seed=None, backend="lmdb",
                     overwrite=False, batch_size=1000, stream=None):
    """Write images into a Caffe Datum database, like Caffe's convert_imageset.

    items: ImageItems (or an ImageSet). Each image is decoded with read_image,
    squash-resized to size x size (or (height, width)) and stored as a Datum
    of uint8 C x H x W in BGR channel order (OpenCV's order, which Caffe's own
    tool stores and Caffe models expect), with its label. Keys are Caffe's
    "%08d_<path>". Items keep their order unless shuffle_seed is given; the
    training set needs the seeded shuffle, since Caffe's Data layer reads in
    key order and never shuffles.

    Unreadable images are reported (stderr and `<out>.skipped.txt`) and
    skipped. The database is built in `<out>.partial` and renamed when done;
    an existing `out` is refused unless overwrite=True.
    """
    stream = stream or sys.stderr
    items = list(getattr(items, "items", items))
    if not items:
        raise UserError("no images to convert")
    if backend not in BACKENDS:
        raise UserError(f"unknown database backend {backend!r}; use one of {', '.join(BACKENDS)}")
    height, width = _check_size(size)
    out = Path(out_lmdb)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another output or pass "
                        "--overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():        # left by an interrupted run; the name is ours
        shutil.rmtree(partial)

    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    Datum = import_caffe().proto.caffe_pb2.Datum
    writer_cls = _LmdbWriter if backend == "lmdb" else _LevelDbWriter
    # Datum payload plus key and protobuf framing, with headroom for LMDB pages.
    expected = int(len(items) * (3 * height * width + 600) * 1.3)

    start = time.monotonic()
    skipped, pending, written = [], [], 0
    progress = Progress(len(items), label=f"convert {out.name}", stream=stream)
    writer = writer_cls(partial, expected)
    try:
        for index, item in enumerate(items):
            progress.update()
            try:
                rgb = read_image(item.path)
            except BadImage as bad:
                skipped.append((str(bad.path), bad.reason))
                print(f"skipped {bad.path}: {bad.reason}", file=stream)
                continue
            chw_bgr = resize_for_net(rgb, (height, width))[:, :, ::-1].transpose(2, 0, 1)
            datum = Datum(channels=3, height=height, width=width,
                          data=np.ascontiguousarray(chw_bgr).tobytes(), label=item.label)
            # Caffe numbers every listed line, read or not, so keys match the
            # list position; skipped images simply leave a gap.
            pending.append((_datum_key(index, item.relpath or str(item.path)),
                            datum.SerializeToString()))
            written += 1
            if len(pending) >= batch_size:
                writer.put_batch(pending)
                pending = []
        if pending:
            writer.put_batch(pending)
        writer.close()
        writer = None
        progress.close()
        if written == 0:
            first_path, first_reason = skipped[0]
            raise UserError(
                f"none of the {len(items)} images could be read (first: {first_path}: "
                f"{first_reason}); for a list file, check that --root points at the "
                "folder its paths are relative to")
        _replace_dir(partial, out)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise

    skipped_file = out.with_name(out.name + ".skipped.txt")
    if skipped:
        skipped_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
        print(f"{len(skipped)} unreadable image(s) skipped; listed in {skipped_file}",
              file=stream)
    elif skipped_file.exists():
        skipped_file.unlink()   # from an earlier run over different data
    return ConvertResult(out, written, skipped, time.monotonic() - start)


def _replace_dir(new, target):
    """Move the finished `new` to `target`, replacing an old `target` only
    after the new one is complete."""
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    else:
        os.rename(new, target)


# --- mean image -----------------------------------------------------------------

def pad_imageset(src, dst, pad, mode="reflect", overwrite=False, batch=1000):
    """Copy a Datum LMDB with every image padded by `pad` pixels on each side.

    The small CIFAR-10 net trains on random 32x32 crops of 40x40 images (the
    usual pad-and-crop augmentation); Caffe's Data layer can crop but not pad,
    so the padding is stored. Unlike a squash resize, padding keeps objects at
    the scale of the test images: the centre crop of a padded image is the
    original. Keys and order are kept. Built in DST.partial, renamed when
    complete. Returns the number of images.
    """
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
    _replace_dir(partial, dst)
    return count



class MeanResult(NamedTuple):
    mean: np.ndarray        # C x H x W float32, BGR, as Caffe's mean_file holds
    channel_mean: tuple     # per-channel (B, G, R) mean, for a mean_value
    count: int              # images averaged


def detect_backend(db_path):
    """'lmdb' or 'leveldb' from the files inside a Caffe database directory."""
    backend = store_backend(db_path)
    if backend is None:
        raise UserError(f"{db_path} is not an LMDB or LevelDB database directory "
                        "(no data.mdb or CURRENT file in it)")
    return backend


def _iterate_db(db_path, backend):
    """Yield (key, value) bytes of every record, in key order, plus the record
    count (or None) as the first item."""
    if backend == "lmdb":
        import lmdb
        try:
            # lock=False: reading needs no lock file, so read-only copies work.
            env = lmdb.open(str(db_path), readonly=True, lock=False, subdir=True)
        except lmdb.Error as err:
            raise UserError(f"cannot open LMDB {db_path}: {err}") from None
        try:
            yield env.stat()["entries"]
            with env.begin() as txn:
                yield from txn.cursor()
        finally:
            env.close()
    else:
        import plyvel
        try:
            db = plyvel.DB(str(db_path), create_if_missing=False)
        except plyvel.Error as err:
            raise UserError(f"cannot open LevelDB {db_path} (in use by another "
                            f"process?): {err}") from None
        try:
            yield None
            yield from db.iterator()
        finally:
            db.close()


def compute_mean(lmdb_path, binaryproto_out, npy_out, backend=None, stream=None):
    """Per-pixel mean of a Datum database, as Caffe's compute_image_mean.

    Writes binaryproto_out (a BlobProto 1 x C x H x W, the `mean_file` of a
    Caffe transform_param) and npy_out (C x H x W float32, BGR, what
    caffe.io.Transformer.set_mean takes); either may be None to skip it.
    Streams over the database, so memory holds only one running sum.
    """
    stream = stream or sys.stderr
    db_path = Path(lmdb_path)
    if not db_path.is_dir():
        raise UserError(f"database {db_path} does not exist")
    backend = backend or detect_backend(db_path)
    caffe_pb2 = import_caffe().proto.caffe_pb2
    records = _iterate_db(db_path, backend)
    try:
        shape, total_sum, count = _sum_records(records, db_path, caffe_pb2, stream)
    finally:
        records.close()     # closes the database even when a record is bad
    if count == 0:
        raise UserError(f"database {db_path} is empty")

    mean = (total_sum / count).astype(np.float32).reshape(shape)
    if binaryproto_out is not None:
        blob = caffe_pb2.BlobProto()
        # The legacy num/channels/height/width fields, as compute_image_mean
        # writes them (Blob::FromProto and caffe.io read either form).
        blob.num, blob.channels, blob.height, blob.width = 1, *shape
        blob.data.extend(mean.ravel().tolist())
        _atomic_write(Path(binaryproto_out), lambda f: f.write(blob.SerializeToString()))
    if npy_out is not None:
        _atomic_write(Path(npy_out), lambda f: np.save(f, mean))
    channel_mean = tuple(float(v) for v in mean.reshape(shape[0], -1).mean(axis=1))
    return MeanResult(mean, channel_mean, count)


def _sum_records(records, db_path, caffe_pb2, stream):
    """Sum the pixels of every Datum; returns (shape, sum, count)."""
    total = next(records)
    progress = Progress(total or 0, label=f"mean {db_path.name}", stream=stream)
    datum = caffe_pb2.Datum()
    shape = total_sum = None
    count = 0
    for key, value in records:
        datum.ParseFromString(bytes(value))
        where = f"{db_path} record {bytes(key).decode('utf-8', 'replace')!r}"
        if datum.encoded:
            raise UserError(f"{where} holds an encoded (compressed) image; compute the "
                            "mean of a database written without --encoded")
        this_shape = (datum.channels, datum.height, datum.width)
        if datum.data:
            pixels = np.frombuffer(datum.data, dtype=np.uint8)
        else:
            pixels = np.asarray(datum.float_data, dtype=np.float64)
        if pixels.size != this_shape[0] * this_shape[1] * this_shape[2] or pixels.size == 0:
            raise UserError(f"{where}: data size {pixels.size} does not match its shape "
                            f"{this_shape}")
        if shape is None:
            shape, total_sum = this_shape, np.zeros(pixels.size, dtype=np.float64)
        elif this_shape != shape:
            raise UserError(f"{where} is {this_shape}, earlier records are {shape}: a mean "
                            "image needs every image the same size (convert with --size)")
        total_sum += pixels
        count += 1
        progress.update()
    progress.close()
    return shape, total_sum, count


def _atomic_write(path, write):
    """Write through a temporary file in the same folder and rename, so a
    reader never sees a half-written mean file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
