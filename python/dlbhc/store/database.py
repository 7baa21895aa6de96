"""The feature store: per image fc7, latent activations, packed code, label, path.

One database per collection: a directory holding an LMDB environment (or a
LevelDB with backend="leveldb") and one flat file:

    meta    one record, key b"meta": JSON (schema_version, bits, fc7_dim,
            fc7_dtype, threshold, preprocessing, model hashes, count, ...)
    latent  raw little-endian float32 sigmoid activations, bits values
    code    numpy.packbits(latent > threshold), big-endian bit order
    info    JSON {"path": source path, "label": int (-1 unknown), "seq": n}
    fc7.bin the fc7 of image i at byte offset i * fc7_dim * itemsize: raw
            little-endian float32 (or float16) rows, nothing else
    pca-<sha1>.npz, pca-<sha1>.bin  (optional, made by compress.py) the PCA
            projection (pca.Projection) and every image's projected fc7, flat
            rows like fc7.bin; metadata field "pca" names them, with the
            projection's sha1

The keyed tables use Caffe's extract_features keys (`%010d`, the image id,
counting from 0), in one of the engines of backends.py (LMDB tables are
named sub-databases, LevelDB keys get the table name and a slash as prefix:
b"code/0000000001").  The PCA files' format and rules are in pca_rows.py;
shards are joined by merge.py.

fc7 sits in a flat file of fixed-size rows because search reads it at random:
~1,000-2,000 candidates per query. Through a memory map a candidate's row is
one address computation, where a keyed store pays a B-tree descent per row
(measured: 5.7 us per row in a 7 GB LMDB, which alone broke the 10 ms budget
of a 2.5M-image query; see benchmarks/bench_search.py).

Crash safety: an append writes the batch's fc7 rows (and, with a PCA store,
their projections) first and fsyncs them, then commits the keyed records and
the new count in one transaction. Only rows below the committed count are
ever read, so a crash at any point (even kill -9) leaves either the whole
batch or none of it; rows written past the count by a crashed run are simply
overwritten by the next append.  Building a PCA store follows the same rule:
its files are complete and synced before the metadata names them.

Removals follow the same rule (tombstones written and synced, then the
count that makes them valid committed, with a replacement's new record in
the same transaction), and compaction rewrites the database beside itself:
live.py and compact.py, which also say how ids stay stable.

Writers change the metadata by read-modify-write inside one write
transaction (the backend's commit), so compress.py adding a PCA store while extract.py
appends loses neither: whichever commits second sees the other's record (an
append that finds a PCA store recorded since it opened the database projects
its batch before committing).
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import orjson

from ..errors import UserError
from ..files import database_backend
from ..search.codes import CODE_THRESHOLD, code_bytes
from .backends import BACKENDS, DEFAULT_BACKEND, META_KEY, meta_bytes
from .live import LiveRows
from .pca_rows import PcaRows

SCHEMA_VERSION = 1
FC7_FILE = "fc7.bin"
# How fc7 rows are stored unless told otherwise (extract.py --float16: half).
DEFAULT_FC7_DTYPE = "float32"


def key(i):
    """The keyed tables' key of image i (Caffe's extract_features format)."""
    return b"%010d" % i


class MetaFields:
    """The sizes a database's metadata record states: its image count, code
    bits and fc7 width (of a FeatureStore, or of the Milvus collection a
    database was loaded into)."""

    @property
    def count(self):
        return int(self.meta["count"])

    @property
    def bits(self):
        return int(self.meta["bits"])

    @property
    def fc7_dim(self):
        return int(self.meta["fc7_dim"])


class FeatureStore(MetaFields, PcaRows, LiveRows):
    """A feature database made by extract.py (see the module docstring); its
    PCA re-rank store's methods come from pca_rows.PcaRows, its tombstones
    and stable ids from live.LiveRows."""

    def __init__(self, path, backend, meta, readonly):
        self.path = Path(path)
        self._db = backend
        self.meta = meta
        self.readonly = readonly
        self._inode = os.stat(self.path).st_ino
        self._fc7_map = None        # memory map of fc7.bin, sized to count rows
        self._fc7_fd = None         # write handle (appending stores only)
        fc7_path = self.path / FC7_FILE
        if readonly:
            need = self.count * self.fc7_row_bytes
            have = fc7_path.stat().st_size if fc7_path.exists() else -1
            if have < need:
                raise UserError(f"{self.path}: {FC7_FILE} holds {max(have, 0)} bytes, the "
                                f"{self.count} images need {need}: the database is damaged; "
                                "re-extract it")
        else:
            self._fc7_fd = os.open(fc7_path, os.O_RDWR | os.O_CREAT, 0o644)

    # ---- opening ---------------------------------------------------------
    @classmethod
    def create(cls, path, meta, backend=DEFAULT_BACKEND):
        """A new, empty store. `meta` needs bits, fc7_dim; the rest is kept as given."""
        path = Path(path)
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}: use lmdb or leveldb")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(meta)
        for field in ("bits", "fc7_dim"):
            if field not in meta:
                raise ValueError(f"store meta needs {field}")
        meta.setdefault("fc7_dtype", DEFAULT_FC7_DTYPE)
        meta.setdefault("threshold", CODE_THRESHOLD)
        meta.update(schema_version=SCHEMA_VERSION, backend=backend, count=0,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        db = BACKENDS[backend](path, readonly=False)
        db.write([("meta", META_KEY, meta_bytes(meta))])
        return cls(path, db, meta, readonly=False)

    @classmethod
    def open(cls, path, readonly=True):
        path = Path(path)
        if not path.exists():
            from .compact import recover_switch   # a compaction killed mid-switch
            recover_switch(path)
        if not path.exists():
            raise UserError(
                f"feature database {path} does not exist: build it with "
                f"`python python/extract.py IMAGES --deploy ... --weights ... --out {path}`")
        backend = database_backend(path)
        if backend is None:
            raise UserError(f"{path} is not a feature database (no LMDB or LevelDB files in it)")
        db = BACKENDS[backend](path, readonly=readonly)
        raw = db.get("meta", META_KEY)
        if raw is None:
            db.close()
            raise UserError(f"{path} has no metadata record: not a feature database made by extract.py")
        meta = json.loads(raw)
        if meta.get("schema_version") != SCHEMA_VERSION:
            db.close()
            raise UserError(f"{path} has schema version {meta.get('schema_version')}, "
                            f"this tool reads version {SCHEMA_VERSION}: re-extract it")
        return cls(path, db, meta, readonly=readonly)

    def close(self):
        self._fc7_map = self._pca_map = None
        if self._fc7_fd is not None:
            os.close(self._fc7_fd)
            self._fc7_fd = None
        self._close_pca_fd()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- properties (count, bits, fc7_dim: MetaFields) -----------------------
    @property
    def fc7_dtype(self):
        return np.dtype(self.meta["fc7_dtype"]).newbyteorder("<")

    @property
    def fc7_row_bytes(self):
        return self.fc7_dim * self.fc7_dtype.itemsize

    @property
    def code_bytes(self):
        return code_bytes(self.bits)

    def revision(self):
        """A string that changes whenever the database does: its creation
        time, image count, removals, compactions and model.  Caches derived
        from the database (the search index) are valid for one revision."""
        changes = (f"|-{self.removed_count}|c{self.meta.get('compactions', 0)}"
                   if self.removed_count or self.meta.get("compactions") else "")
        return f"{self.meta.get('created')}|{self.count}{changes}|{self.meta.get('model', {})}"

    # ---- writing ---------------------------------------------------------
    def append(self, fc7, latent, codes, infos, remove=()):
        """Append a batch as one transaction, tombstoning the live ids
        `remove` in the same one (a replacement).  Returns the new rows."""
        if self.readonly:
            raise RuntimeError("store opened read-only")
        n = len(infos)
        fc7 = np.ascontiguousarray(fc7, dtype=self.fc7_dtype)
        latent = np.ascontiguousarray(latent, dtype="<f4")
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if fc7.shape != (n, self.fc7_dim) or latent.shape != (n, self.bits) \
                or codes.shape != (n, self.code_bytes):
            raise ValueError(f"batch shapes {fc7.shape} {latent.shape} {codes.shape} "
                             f"do not match the store ({self.fc7_dim}, {self.bits} bits)")
        remove = np.unique(np.asarray(remove, dtype=np.int64))
        if len(remove):
            self.rows_of_ids(remove)     # known and live, or UserError
        start = self.count
        # fc7 rows first, durable before the count that makes them visible
        os.pwrite(self._fc7_fd, fc7.tobytes(), start * self.fc7_row_bytes)
        os.fsync(self._fc7_fd)
        items = []
        for j in range(n):
            k = key(start + j)
            items += [("latent", k, latent[j].tobytes()), ("code", k, codes[j].tobytes()),
                      ("info", k, json.dumps(infos[j], sort_keys=True).encode())]

        def change(stored):
            if int(stored["count"]) != start:
                raise UserError(f"{self.path} got {int(stored['count']) - start:+d} images from "
                                "another process while this one was appending: run one "
                                "extract.py per database at a time, then rerun this one")
            # The PCA store as recorded now (compress.py may have added one
            # since this store was opened): its rows too before the count.
            record = stored.get("pca")
            if record:
                projection = self.projection() if record == self.pca_record else \
                    self._load_projection(record)
                self._write_pca_rows(projection, record, fc7, start)
            return dict(stored, count=start + n, **self._tombstone(stored, remove))

        self.meta = self._db.commit(items, change)
        self._fc7_map = self._pca_map = None
        return np.arange(start, start + n)

    def refresh(self):
        """Re-read the metadata record, so a store opened for reading sees
        what another process (extract.py) appended since; True when the
        revision changed.  The count is committed in the same transaction
        as the records it counts, so ids below the new count are complete
        (whole batches only), and their fc7 rows were made durable before."""
        raw = self._db.get("meta", META_KEY)
        if raw is None:
            return False
        before = self.revision()
        self.meta = json.loads(raw)
        return self.revision() != before

    def replaced(self):
        """True when the folder at this store's path is no longer the one
        opened (compaction switched a new copy in): reopen to follow."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return False     # mid-switch: the next look sees the new one

    def update_meta(self, **fields):
        """Set metadata fields (read-modify-write in one transaction)."""
        self.meta = self._db.commit([], lambda stored: dict(stored, **fields))


    # ---- reading ---------------------------------------------------------
    def fc7_rows(self):
        """All fc7 rows as a read-only memory map (count, fc7_dim): nothing is
        read until indexed, so this is cheap for any database size."""
        if self._fc7_map is None or self._fc7_map.shape[0] != self.count:
            if self.count == 0:
                return np.empty((0, self.fc7_dim), dtype=self.fc7_dtype)
            self._fc7_map = np.memmap(self.path / FC7_FILE, dtype=self.fc7_dtype, mode="r",
                                      shape=(self.count, self.fc7_dim))
        return self._fc7_map

    def fc7_rows_upto(self, count):
        """The first `count` fc7 rows as a memory map, for a count committed
        by another process after this store was opened."""
        return np.memmap(self.path / FC7_FILE, dtype=self.fc7_dtype, mode="r",
                         shape=(int(count), self.fc7_dim))

    def fc7(self, ids):
        """fc7 rows for ids, as float32 (len(ids), fc7_dim)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._check_ids(ids)
        return np.asarray(self.fc7_rows()[ids], dtype=np.float32)

    def latent(self, ids):
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._check_ids(ids)
        out = np.empty((len(ids), self.bits), dtype="<f4")
        self._db.read_rows("latent", [key(int(i)) for i in ids], out)
        return out

    def code_rows(self, ids):
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._check_ids(ids)
        out = np.empty((len(ids), self.code_bytes), dtype=np.uint8)
        self._db.read_rows("code", [key(int(i)) for i in ids], out)
        return out

    def codes(self):
        """All codes, (count, code_bytes) uint8, in id order."""
        out = np.empty((self.count, self.code_bytes), dtype=np.uint8)
        n = 0
        for k, v in self._db.scan("code"):
            i = int(k)
            if i < self.count:
                out[i] = np.frombuffer(v, dtype=np.uint8)
                n += 1
        if n != self.count:
            raise UserError(f"{self.path}: {self.count} images in metadata but {n} codes: "
                            "the database is damaged; re-extract it")
        return out

    def infos(self, ids=None):
        """info records (dict with path, label, seq) for ids, or all in id order."""
        if ids is None:
            result = [None] * self.count
            for k, v in self._db.scan("info"):
                i = int(k)
                if i < self.count:
                    result[i] = orjson.loads(v)
            return result
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._check_ids(ids)
        # orjson: 1,000 records (a top-1000 answer) parse in 0.5 ms, not 11 ms
        return [orjson.loads(v) for v in self._db.get_many("info", [key(int(i)) for i in ids])]

    def raw_records(self, table, rows):
        """The stored bytes of rows' records in a keyed table (latent, code,
        info), in the order of rows (compaction copies them unparsed)."""
        return self._db.get_many(table, [key(int(i)) for i in rows])

    def labels(self):
        return np.array([info["label"] for info in self.infos()], dtype=np.int64)

    def stored_paths(self):
        """Source paths of the live images (resume skips these)."""
        return set(self.live_records())

    def live_records(self):
        """{path: (id, info)} of the live images (info: path, label, seq,
        and for images extracted since stat was recorded, size, mtime_ns)."""
        live = self.live_mask()
        ids = self.ids_of_rows(np.arange(self.count))
        return {info["path"]: (int(ids[row]), info)
                for row, info in enumerate(self.infos()) if live[row]}

    def _check_ids(self, ids):
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise UserError(f"image id out of range: the database holds ids 0..{self.count - 1}")



# Fields that must agree for two databases (or a model and a database) to be
# used together: different values mean different codes or features.
COMPATIBILITY_FIELDS = ("bits", "fc7_dim", "threshold", "preprocessing", "fc7_dtype")


def check_compatible(expected, actual, what="the model"):
    """Raise UserError naming every field in which `actual` differs."""
    diffs = []
    for field in COMPATIBILITY_FIELDS:
        if field in expected and field in actual and expected[field] != actual[field]:
            diffs.append(f"{field}: database has {expected[field]!r}, {what} has {actual[field]!r}")
    if diffs:
        raise UserError(f"{what} does not match the feature database:\n  " + "\n  ".join(diffs)
                        + "\nUse the deploy net and weights the database was built with, "
                          "or extract a new database (--out NEW).")

