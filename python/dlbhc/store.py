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

The keyed tables use Caffe's extract_features keys (`%010d`, the image id,
counting from 0); LMDB tables are named sub-databases, LevelDB keys get the
table name and a slash as prefix (b"code/0000000001").

fc7 sits in a flat file of fixed-size rows because search reads it at random:
~1,000-2,000 candidates per query. Through a memory map a candidate's row is
one address computation, where a keyed store pays a B-tree descent per row
(measured: 5.7 us per row in a 7 GB LMDB, which alone broke the 10 ms budget
of a 2.5M-image query; see benchmarks/bench_search.py).

Crash safety: an append writes the batch's fc7 rows first (and fsyncs them),
then commits the keyed records and the new count in one transaction. Only
rows below the committed count are ever read, so a crash at any point (even
kill -9) leaves either the whole batch or none of it; rows written past the
count by a crashed run are simply overwritten by the next append.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import orjson

from .codes import CODE_THRESHOLD, code_bytes
from .errors import UserError
from .files import database_backend

SCHEMA_VERSION = 1
TABLES = ("meta", "latent", "code", "info")
FC7_FILE = "fc7.bin"
META_KEY = b"meta"
# LMDB reserves address space, not disk: 1 TiB holds 60M images of fc7.
LMDB_MAP_SIZE = 1 << 40


def key(i):
    return b"%010d" % i


class _LmdbBackend:
    name = "lmdb"

    def __init__(self, path, readonly):
        import lmdb
        try:
            # readahead=False: searches read scattered records; the kernel's
            # readahead would pull in neighbours nobody asked for.
            self.env = lmdb.open(str(path), map_size=LMDB_MAP_SIZE, max_dbs=len(TABLES),
                                 readonly=readonly, readahead=False, subdir=True,
                                 create=not readonly)
            if readonly:
                self.dbs = {t: self.env.open_db(t.encode(), create=False) for t in TABLES}
            else:
                # All tables in one transaction: a reader sees all or none of them.
                with self.env.begin(write=True) as txn:
                    self.dbs = {t: self.env.open_db(t.encode(), txn=txn, create=True)
                                for t in TABLES}
        except lmdb.NotFoundError:
            raise UserError(f"{path} is not a complete feature database (its tables are "
                            "missing): it may still be being created") from None
        except lmdb.Error as err:
            raise UserError(f"cannot open LMDB feature store {path}: {err}") from err

    def get(self, table, k):
        with self.env.begin(db=self.dbs[table], buffers=False) as txn:
            return txn.get(k)

    def get_many(self, table, keys):
        """Values as bytes for keys (one read transaction)."""
        with self.env.begin(db=self.dbs[table]) as txn:
            return [txn.get(k) for k in keys]

    def read_rows(self, table, keys, out):
        """Copy fixed-size records straight into the rows of `out` (no parsing)."""
        row_bytes = out.dtype.itemsize * out.shape[1]
        view = out.view(np.uint8).reshape(out.shape[0], row_bytes)
        with self.env.begin(db=self.dbs[table], buffers=True) as txn:
            get = txn.get
            for i, k in enumerate(keys):
                buf = get(k)
                if buf is None:
                    raise KeyError(k)
                view[i] = np.frombuffer(buf, dtype=np.uint8)

    def scan(self, table):
        with self.env.begin(db=self.dbs[table]) as txn:
            for k, v in txn.cursor():
                yield k, v

    def write(self, items):
        """items: list of (table, key, value); one transaction."""
        with self.env.begin(write=True) as txn:
            for table, k, v in items:
                txn.put(k, v, db=self.dbs[table])

    def close(self):
        self.env.close()


class _LevelDbBackend:
    name = "leveldb"

    def __init__(self, path, readonly):
        import plyvel
        try:
            self.db = plyvel.DB(str(path), create_if_missing=not readonly)
        except plyvel.Error as err:
            raise UserError(f"cannot open LevelDB feature store {path}: {err}") from err

    @staticmethod
    def _k(table, k):
        return table.encode() + b"/" + k

    def get(self, table, k):
        return self.db.get(self._k(table, k))

    def get_many(self, table, keys):
        return [self.db.get(self._k(table, k)) for k in keys]

    def read_rows(self, table, keys, out):
        row_bytes = out.dtype.itemsize * out.shape[1]
        view = out.view(np.uint8).reshape(out.shape[0], row_bytes)
        prefix = table.encode() + b"/"
        get = self.db.get
        for i, k in enumerate(keys):
            buf = get(prefix + k)
            if buf is None:
                raise KeyError(k)
            view[i] = np.frombuffer(buf, dtype=np.uint8)

    def scan(self, table):
        prefix = table.encode() + b"/"
        for k, v in self.db.iterator(prefix=prefix):
            yield k[len(prefix):], v

    def write(self, items):
        # transaction=True: LevelDB applies the whole batch atomically.
        with self.db.write_batch(transaction=True, sync=True) as wb:
            for table, k, v in items:
                wb.put(self._k(table, k), v)

    def close(self):
        self.db.close()


_BACKENDS = {"lmdb": _LmdbBackend, "leveldb": _LevelDbBackend}


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


class FeatureStore(MetaFields):
    """A feature database made by extract.py (see the module docstring)."""

    def __init__(self, path, backend, meta, readonly):
        self.path = Path(path)
        self._db = backend
        self.meta = meta
        self.readonly = readonly
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
    def create(cls, path, meta, backend="lmdb"):
        """A new, empty store. `meta` needs bits, fc7_dim; the rest is kept as given."""
        path = Path(path)
        if backend not in _BACKENDS:
            raise UserError(f"unknown backend {backend!r}: use lmdb or leveldb")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        meta = dict(meta)
        for field in ("bits", "fc7_dim"):
            if field not in meta:
                raise ValueError(f"store meta needs {field}")
        meta.setdefault("fc7_dtype", "float32")
        meta.setdefault("threshold", CODE_THRESHOLD)
        meta.update(schema_version=SCHEMA_VERSION, backend=backend, count=0,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        db = _BACKENDS[backend](path, readonly=False)
        db.write([("meta", META_KEY, json.dumps(meta, sort_keys=True).encode())])
        return cls(path, db, meta, readonly=False)

    @classmethod
    def open(cls, path, readonly=True):
        path = Path(path)
        if not path.exists():
            raise UserError(
                f"feature database {path} does not exist: build it with "
                f"`python python/extract.py IMAGES --deploy ... --weights ... --out {path}`")
        backend = database_backend(path)
        if backend is None:
            raise UserError(f"{path} is not a feature database (no LMDB or LevelDB files in it)")
        db = _BACKENDS[backend](path, readonly=readonly)
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
        self._fc7_map = None
        if self._fc7_fd is not None:
            os.close(self._fc7_fd)
            self._fc7_fd = None
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
        time, image count and model.  Caches derived from the database (the
        search index) are valid for one revision."""
        return f"{self.meta.get('created')}|{self.count}|{self.meta.get('model', {})}"

    # ---- writing ---------------------------------------------------------
    def append(self, fc7, latent, codes, infos):
        """Append a batch as one transaction. Returns the new ids."""
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
        start = self.count
        # fc7 rows first, durable before the count that makes them visible
        os.pwrite(self._fc7_fd, fc7.tobytes(), start * self.fc7_row_bytes)
        os.fsync(self._fc7_fd)
        items = []
        for j in range(n):
            k = key(start + j)
            items += [("latent", k, latent[j].tobytes()), ("code", k, codes[j].tobytes()),
                      ("info", k, json.dumps(infos[j], sort_keys=True).encode())]
        meta = dict(self.meta, count=start + n)
        items.append(("meta", META_KEY, json.dumps(meta, sort_keys=True).encode()))
        self._db.write(items)
        self.meta = meta
        self._fc7_map = None
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

    def update_meta(self, **fields):
        meta = dict(self.meta, **fields)
        self._db.write([("meta", META_KEY, json.dumps(meta, sort_keys=True).encode())])
        self.meta = meta

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

    def labels(self):
        return np.array([info["label"] for info in self.infos()], dtype=np.int64)

    def stored_paths(self):
        """Source paths already in the store (resume skips these)."""
        return {info["path"] for info in self.infos()}

    def _check_ids(self, ids):
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise UserError(f"image id out of range: the database holds ids 0..{self.count - 1}")


def merge(shard_paths, out_path, backend="lmdb", batch=256, append=False):
    """Join shard databases (extract.py --shard i/n, or the shards of a Ray
    extraction) into one.

    Records are ordered by their position in the full input list (`seq`),
    so merged shards equal a single run over the same inputs.  With
    append=True `out_path` may already exist (same model): the records whose
    path it holds are left out and the rest appended, so a merge cut short
    by a crash (each batch is one transaction) is finished by running it
    again.  Returns the number of records written.
    """
    shards = [FeatureStore.open(p) for p in shard_paths]
    out = None
    try:
        base = shards[0].meta
        for s in shards[1:]:
            check_compatible(base, s.meta, what=f"shard {s.path}")
        existing = database_backend(out_path) if Path(out_path).exists() else None
        if append and existing is not None:
            out = FeatureStore.open(out_path, readonly=False)
            check_compatible(out.meta, base, what=f"shard {shards[0].path}")
            have = out.stored_paths() if out.count else set()
        else:
            meta = {k: v for k, v in base.items()
                    if k not in ("count", "created", "schema_version", "backend", "shard")}
            out = FeatureStore.create(out_path, meta, backend=backend)
            have = set()
        entries = []
        for si, s in enumerate(shards):
            for i, info in enumerate(s.infos()):
                if info["path"] not in have:
                    entries.append((info.get("seq", 0), info["path"], si, i))
        entries.sort()
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]
            # one read per shard and table, then back into seq order
            parts = {}
            for si in sorted({e[2] for e in chunk}):
                pos = [j for j, e in enumerate(chunk) if e[2] == si]
                ids = [chunk[j][3] for j in pos]
                s = shards[si]
                parts[si] = (pos, s.fc7(ids), s.latent(ids), s.code_rows(ids), s.infos(ids))
            order = np.concatenate([p[0] for p in parts.values()])
            back = np.argsort(order)
            fc7, latent, codes = (np.concatenate([p[k] for p in parts.values()])[back]
                                  for k in (1, 2, 3))
            infos = [info for p in parts.values() for info in p[4]]
            out.append(fc7, latent, codes, [infos[j] for j in back])
        return len(entries)
    finally:
        if out is not None:
            out.close()
        for s in shards:
            s.close()


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


def disk_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


