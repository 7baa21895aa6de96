"""Caffe Datum databases: convert an image set into an LMDB or LevelDB of
Datum records, pad the images of a Datum LMDB, and compute a database's mean
image.

The database format is exactly what Caffe's own tools/convert_imageset writes,
so Caffe's Data layer and compute_image_mean read it unchanged. Caffe is
imported only inside the functions that build or parse Datum messages
(through protos.caffe_pb2), so importing this module needs no build.
"""
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np

from ..errors import UserError
from ..files import atomic_write, database_backend, replace_dir
from ..images import BadImage, read_image, resize_for_net, write_skipped_list
from ..nets.protos import caffe_pb2
from ..progress import Progress
from ..report import get_logger

log = get_logger(__name__)

BACKENDS = ("lmdb", "leveldb")
# LMDB refuses keys longer than its compiled-in maximum (511 bytes).
_MAX_KEY_BYTES = 511


class ConvertResult(NamedTuple):
    path: Path          # the database written
    written: int        # images stored
    skipped: list       # (path, reason) of images that could not be read
    seconds: float


class MeanResult(NamedTuple):
    mean: np.ndarray        # C x H x W float32, BGR, as Caffe's mean_file holds
    channel_mean: tuple     # per-channel (B, G, R) mean, for a mean_value
    count: int              # images averaged


# --- writing databases ------------------------------------------------------------

class LmdbWriter:
    """An LMDB written in batches of (key, value) pairs; its map grows as it fills."""

    def __init__(self, path, expected_bytes):
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
            except lmdb.MapFullError:
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


def _datum_bytes(Datum, chw, label):
    """A serialized Datum of a uint8 C x H x W array and its label."""
    datum = Datum(channels=chw.shape[0], height=chw.shape[1], width=chw.shape[2],
                  data=np.ascontiguousarray(chw).tobytes(), label=label)
    return datum.SerializeToString()


def float_datum_bytes(chw, label):
    """A serialized Datum of a float C x H x W array (float_data) and its
    label, written directly: Datum's `repeated float float_data = 6` in the
    packed encoding, which protobuf parsers accept for any repeated scalar
    field, so a record costs one tobytes() rather than 5 bytes of framing
    and a Python call per value. Caffe's Data layer reads it unchanged."""
    chw = np.asarray(chw, dtype="<f4")
    if chw.ndim != 3:
        raise ValueError(f"expected a C x H x W array, got shape {chw.shape}")
    payload = chw.tobytes()
    head = b"".join(_varint_field(number, value) for number, value in
                    ((1, chw.shape[0]), (2, chw.shape[1]), (3, chw.shape[2]), (5, int(label))))
    return head + b"\x32" + _varint(len(payload)) + payload   # field 6, length-delimited


def _varint(value):
    value &= (1 << 64) - 1        # negative int32 labels: ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_field(number, value):
    return _varint(number << 3) + _varint(value)


# --- image set -> Caffe database ----------------------------------------------------

def convert_imageset(items, out_lmdb, size, shuffle_seed=None, backend="lmdb",
                     overwrite=False, batch_size=1000):
    """Write images into a Caffe Datum database, like Caffe's convert_imageset.

    items: ImageItems (or an ImageSet). Each image is decoded with read_image,
    squash-resized to size x size (or (height, width)) and stored as a Datum
    of uint8 C x H x W in BGR channel order (OpenCV's order, which Caffe's own
    tool stores and Caffe models expect), with its label. Keys are Caffe's
    "%08d_<path>". Items keep their order unless shuffle_seed is given; the
    training set needs the seeded shuffle, since Caffe's Data layer reads in
    key order and never shuffles.

    Unreadable images are reported (the report logger and `<out>.skipped.tsv`, see
    images.write_skipped_list) and skipped. The database is built in
    `<out>.partial` and renamed when done; an existing `out` is refused unless
    overwrite=True.
    """
    items = list(getattr(items, "items", items))
    shape = _check_convert_args(items, size, backend)
    out = Path(out_lmdb)
    partial = _prepare_output(out, overwrite)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    Datum = caffe_pb2().Datum
    writer_cls = LmdbWriter if backend == "lmdb" else _LevelDbWriter
    # Datum payload plus key and protobuf framing, with headroom for LMDB pages.
    expected = int(len(items) * (3 * shape[0] * shape[1] + 600) * 1.3)

    start = time.monotonic()
    progress = Progress(len(items), label=f"convert {out.name}")
    writer = writer_cls(partial, expected)
    try:
        try:
            written, skipped = _write_items(items, writer, Datum, shape, batch_size,
                                            progress)
        finally:
            writer.close()
        progress.close()
        _refuse_if_none_written(written, skipped)
        replace_dir(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    listed = write_skipped_list(out, skipped, "convert_imageset")
    if listed:
        log.warning("%d unreadable image(s) skipped; listed in %s", len(skipped), listed)
    return ConvertResult(out, written, skipped, time.monotonic() - start)


def _check_size(size):
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise UserError(f"image size must be a positive integer (or height, width), got {size!r}")
    return pair


def _check_convert_args(items, size, backend):
    """Refuse an empty item list, an unknown backend or a bad size; returns
    the (height, width) to resize to."""
    if not items:
        raise UserError("no images to convert")
    if backend not in BACKENDS:
        raise UserError(f"unknown database backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return _check_size(size)


def _prepare_output(out, overwrite):
    """Refuse an existing `out` unless overwrite; clear the `<out>.partial`
    an interrupted run left and return that path to build in."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another output or pass "
                        "--overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():        # left by an interrupted run; the name is ours
        shutil.rmtree(partial)
    return partial


def _write_items(items, writer, Datum, shape, batch_size, progress):
    """Decode, resize and store every item in batches of batch_size; returns
    (number written, [(path, reason) of the unreadable ones])."""
    skipped, pending, written = [], [], 0
    for index, item in enumerate(items):
        progress.update()
        try:
            rgb = read_image(item.path)
        except BadImage as bad:
            skipped.append((str(bad.path), bad.reason))
            log.warning("skipped %s: %s", bad.path, bad.reason)
            continue
        chw_bgr = resize_for_net(rgb, shape)[:, :, ::-1].transpose(2, 0, 1)
        # Caffe numbers every listed line, read or not, so keys match the
        # list position; skipped images simply leave a gap.
        pending.append((_datum_key(index, item.relpath or str(item.path)),
                        _datum_bytes(Datum, chw_bgr, item.label)))
        written += 1
        if len(pending) >= batch_size:
            writer.put_batch(pending)
            pending = []
    if pending:
        writer.put_batch(pending)
    return written, skipped


def _refuse_if_none_written(written, skipped):
    """A database without a single image is an error, not a result."""
    if written == 0:
        first_path, first_reason = skipped[0]
        raise UserError(
            f"none of the {len(skipped)} images could be read (first: {first_path}: "
            f"{first_reason}); for a list file, check that --root points at the "
            "folder its paths are relative to")


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


# --- reading databases ------------------------------------------------------------

def _required_backend(db_path):
    """'lmdb' or 'leveldb' for a Caffe database folder; a UserError when it
    holds neither."""
    backend = database_backend(db_path)
    if backend is None:
        raise UserError(f"{db_path} is not an LMDB or LevelDB database directory "
                        "(no data.mdb or CURRENT file in it)")
    return backend


def _iterate_db(db_path, backend):
    """Yield (key, value) bytes of every record, in key order, plus the record
    count (or None) as the first item."""
    if backend == "lmdb":
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
        import plyvel  # only for LevelDB, which few use: an optional package
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


# --- padding --------------------------------------------------------------------

def pad_imageset(src, dst, pad, mode="reflect", overwrite=False, batch=1000):
    """Copy a Datum LMDB with every image padded by `pad` pixels on each side.

    The small CIFAR-10 net trains on random 32x32 crops of 40x40 images (the
    usual pad-and-crop augmentation); Caffe's Data layer can crop but not pad,
    so the padding is stored. Unlike a squash resize, padding keeps objects at
    the scale of the test images: the centre crop of a padded image is the
    original. `mode` is numpy.pad's. Keys and order are kept. Built in
    DST.partial, renamed when complete. Returns the number of images.
    """
    src, dst = Path(src), Path(dst)
    if database_backend(src) != "lmdb":
        raise UserError(f"{src} is not an LMDB (no data.mdb): run `make data` first")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists: pass --overwrite to replace it")
    if pad < 1:
        raise UserError("--pad must be at least 1")
    Datum = caffe_pb2().Datum
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # Room for the padded copy from the start; the writer grows it if needed.
    src_bytes = (src / "data.mdb").stat().st_size
    writer = LmdbWriter(partial, max(4 * src_bytes, 1 << 30))
    records = _iterate_db(src, "lmdb")
    count, pending = 0, []
    datum = Datum()
    try:
        next(records)       # the record count, not needed here
        for key, value in records:
            datum.ParseFromString(value)
            if datum.encoded:
                raise UserError(f"{src} holds encoded images; write it without --encoded")
            img = np.frombuffer(datum.data, dtype=np.uint8).reshape(
                datum.channels, datum.height, datum.width)
            img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
            pending.append((bytes(key), _datum_bytes(Datum, img, datum.label)))
            count += 1
            if len(pending) >= batch:
                writer.put_batch(pending)
                pending = []
        writer.put_batch(pending)
    finally:
        records.close()
        writer.close()
    replace_dir(partial, dst)
    return count


def first_datum_height(lmdb_path):
    """The height of the first Datum in an LMDB (the image size a Data
    layer reads), or None when there is no readable LMDB there."""
    try:
        env = lmdb.open(str(lmdb_path), readonly=True, lock=False, subdir=True)
    except Exception:  # noqa: BLE001  (no LMDB there: the caller falls back)
        return None
    try:
        with env.begin() as txn:
            for _key, value in txn.cursor():
                datum = caffe_pb2().Datum()
                datum.ParseFromString(value)
                return datum.height
    finally:
        env.close()
    return None


# --- mean image -------------------------------------------------------------------

def compute_mean(lmdb_path, binaryproto_out, npy_out, backend=None):
    """Per-pixel mean of a Datum database, as Caffe's compute_image_mean.

    Writes binaryproto_out (a BlobProto 1 x C x H x W, the `mean_file` of a
    Caffe transform_param) and npy_out (C x H x W float32, BGR, what
    caffe.io.Transformer.set_mean takes); either may be None to skip it.
    backend is 'lmdb' or 'leveldb', found from the folder's files when None.
    Streams over the database, so memory holds only one running sum.
    """
    db_path = Path(lmdb_path)
    if not db_path.is_dir():
        raise UserError(f"database {db_path} does not exist")
    backend = backend or _required_backend(db_path)
    pb2 = caffe_pb2()
    records = _iterate_db(db_path, backend)
    try:
        shape, total_sum, count = _sum_records(records, db_path, pb2.Datum)
    finally:
        records.close()     # closes the database even when a record is bad
    if count == 0:
        raise UserError(f"database {db_path} is empty")

    mean = (total_sum / count).astype(np.float32).reshape(shape)
    # Written through a temporary file and a rename, so a reader never sees a
    # half-written mean file.
    if binaryproto_out is not None:
        blob = pb2.BlobProto()
        # The legacy num/channels/height/width fields, as compute_image_mean
        # writes them (Blob::FromProto and caffe.io read either form).
        blob.num, blob.channels, blob.height, blob.width = 1, *shape
        blob.data.extend(mean.ravel().tolist())
        atomic_write(Path(binaryproto_out), lambda f: f.write(blob.SerializeToString()))
    if npy_out is not None:
        atomic_write(Path(npy_out), lambda f: np.save(f, mean))
    channel_mean = tuple(float(v) for v in mean.reshape(shape[0], -1).mean(axis=1))
    return MeanResult(mean, channel_mean, count)


def _sum_records(records, db_path, Datum):
    """Sum the pixels of every Datum; returns (shape, sum, count)."""
    total = next(records)
    progress = Progress(total or 0, label=f"mean {db_path.name}")
    datum = Datum()
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
