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
counting from 0); LMDB tables are named sub-databases, LevelDB keys get the
table name and a slash as prefix (b"code/0000000001").

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

Writers change the metadata by read-modify-write inside one write
transaction (_commit), so compress.py adding a PCA store while extract.py
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

from ..search.codes import CODE_THRESHOLD, code_bytes
from ..errors import UserError
from ..files import database_backend, file_digest
from ..search.pca import DEFAULT_SAMPLE, Projection, sample_ids
from ..progress import Progress

SCHEMA_VERSION = 1
TABLES = ("meta", "latent", "code", "info")
FC7_FILE = "fc7.bin"
PCA_PREFIX = "pca-"
PCA_DTYPES = ("float32", "float16")
# Rows read, projected and written per step when a PCA store is built.
PCA_BUILD_ROWS = 8192
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
        """Values as bytes for keys (one read transaction; None for a missing key)."""
        with self.env.begin(db=self.dbs[table]) as txn:
            # One C call for every key: a top-1000 answer's info records in
            # 2.1 ms where a get() per key took 5.4 ms (2.5M records, loaded
            # machine).  getmulti leaves missing keys out: then key by key.
            found = txn.cursor().getmulti(keys)
            if len(found) == len(keys):
                return [v for _, v in found]
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

    def commit(self, items, change):
        """One write transaction: `items` and the metadata change(stored meta)
        returns.  LMDB admits one writer at a time (across processes too), so
        nobody changes the metadata between the read and the write."""
        with self.env.begin(write=True) as txn:
            meta = change(json.loads(txn.get(META_KEY, db=self.dbs["meta"])))
            for table, k, v in items:
                txn.put(k, v, db=self.dbs[table])
            txn.put(META_KEY, _meta_bytes(meta), db=self.dbs["meta"])
        return meta

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

    def commit(self, items, change):
        """items and change(stored meta), one batch.  A LevelDB is open in
        one process at a time (its LOCK file), so nobody else can write it
        between the read and the write."""
        meta = change(json.loads(self.get("meta", META_KEY)))
        self.write(list(items) + [("meta", META_KEY, _meta_bytes(meta))])
        return meta

    def close(self):
        self.db.close()


_BACKENDS = {"lmdb": _LmdbBackend, "leveldb": _LevelDbBackend}


def _meta_bytes(meta):
    return json.dumps(meta, sort_keys=True).encode()


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
        self._pca = None            # (meta record, Projection) once loaded and checked
        self._pca_map = None        # memory map of the PCA rows, sized to count rows
        self._pca_fd = None         # (file name, write handle) of the PCA rows
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
        db.write([("meta", META_KEY, _meta_bytes(meta))])
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
        self._fc7_map = self._pca_map = None
        if self._fc7_fd is not None:
            os.close(self._fc7_fd)
            self._fc7_fd = None
        self._close_pca_fd()
        self._db.close()

    def _close_pca_fd(self):
        if self._pca_fd is not None:
            os.close(self._pca_fd[1])
            self._pca_fd = None

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
            return dict(stored, count=start + n)

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

    def update_meta(self, **fields):
        """Set metadata fields (read-modify-write in one transaction)."""
        self.meta = self._db.commit([], lambda stored: dict(stored, **fields))

    # ---- the PCA re-rank store ---------------------------------------------
    @property
    def pca_record(self):
        """The metadata's PCA record (dim, whiten, dtype, file names,
        projection sha1, ...), or None when the database has no PCA store."""
        return self.meta.get("pca") or None

    def projection(self):
        """The database's PCA projection, checked against the metadata (file
        present, sha1 as recorded, fc7 size and model matching); UserError
        naming what is wrong otherwise."""
        record = self.pca_record
        if record is None:
            raise UserError(f"{self.path} has no PCA re-rank store: make one with "
                            f"`python python/compress.py {self.path} --pca 256`")
        if self._pca is None or self._pca[0] != record:
            self._pca = (record, self._load_projection(record))
        return self._pca[1]

    def _load_projection(self, record):
        path = self.path / record["projection"]
        rebuild = (f"rebuild it with `python python/compress.py {self.path} --pca "
                   f"{record.get('dim', 256)} --replace` or search with --rerank fc7")
        if not path.is_file():
            raise UserError(f"{self.path}: the PCA projection {record['projection']} recorded "
                            f"in its metadata is missing: {rebuild}")
        if file_digest(path) != record["projection_sha1"]:
            raise UserError(f"{self.path}: {record['projection']} is not the projection the "
                            f"database recorded (its sha1 differs): {rebuild}")
        projection = Projection.load(path)
        problem = projection.mismatch(self.fc7_dim, self.meta.get("model"))
        if problem is None and projection.dim != int(record["dim"]):
            problem = f"it has {projection.dim} components, the metadata says {record['dim']}"
        if problem:
            raise UserError(f"{self.path}: the PCA projection does not match the database: "
                            f"{problem}; {rebuild}")
        rows = self.path / record["rows"]
        need = self.count * projection.dim * np.dtype(record["dtype"]).itemsize
        have = rows.stat().st_size if rows.exists() else -1
        if have < need:
            raise UserError(f"{self.path}: {record['rows']} holds {max(have, 0)} bytes, the "
                            f"{self.count} images need {need}: {rebuild}")
        return projection

    def pca_rows(self):
        """Every image's projected fc7 as a read-only memory map (count, dim)."""
        projection = self.projection()
        record = self.pca_record
        if self._pca_map is None or self._pca_map.shape[0] != self.count:
            if self.count == 0:
                return np.empty((0, projection.dim), dtype=record["dtype"])
            self._pca_map = np.memmap(self.path / record["rows"], dtype=np.dtype(record["dtype"]),
                                      mode="r", shape=(self.count, projection.dim))
        return self._pca_map

    def _write_pca_rows(self, projection, record, fc7, start):
        """Project stored-precision fc7 rows and write them at row `start` of
        the PCA rows file named by `record` (synced).  fc7 is in the store's
        dtype, so the rows are the projection of what fc7.bin holds."""
        if self._pca_fd is None or self._pca_fd[0] != record["rows"]:
            self._close_pca_fd()
            self._pca_fd = (record["rows"], os.open(self.path / record["rows"],
                                                    os.O_RDWR | os.O_CREAT, 0o644))
        fd = self._pca_fd[1]
        row_bytes = projection.dim * np.dtype(record["dtype"]).itemsize
        for lo in range(0, len(fc7), PCA_BUILD_ROWS):
            rows = projection.apply(fc7[lo:lo + PCA_BUILD_ROWS]).astype(record["dtype"])
            os.pwrite(fd, rows.tobytes(), (start + lo) * row_bytes)
        os.fsync(fd)

    def learn_projection(self, dim, whiten=False, sample=DEFAULT_SAMPLE, seed=0):
        """Learn a PCA projection on a fixed-seed random sample of this
        database's fc7 rows (pca.Projection.learn)."""
        if self.count < 2:
            raise UserError(f"{self.path} holds {self.count} image(s): PCA needs at least 2")
        ids = sample_ids(self.count, sample, seed)
        rows = np.asarray(self.fc7_rows()[ids], dtype=np.float32)
        return Projection.learn(rows, dim, whiten=whiten, model=self.meta.get("model"))

    def add_pca(self, projection, dtype="float32", log=None):
        """Write every image's projection into a new PCA rows file and record
        it (and the projection) in the metadata; a PCA store recorded before
        is replaced (its files deleted after the switch).  Returns the record.

        Crash-safe like an append: the files are complete and synced before
        the metadata names them; appends made meanwhile by another process
        are projected inside the committing transaction."""
        if self.readonly:
            raise RuntimeError("store opened read-only")
        if dtype not in PCA_DTYPES:
            raise UserError(f"PCA rows dtype {dtype!r}: use one of {', '.join(PCA_DTYPES)}")
        problem = projection.mismatch(self.fc7_dim, self.meta.get("model"))
        if problem:
            raise UserError(f"the projection does not match {self.path}: {problem}. "
                            "Learn one on this database (--pca N) instead.")
        before = self.pca_record
        sha1 = projection.digest()
        name = f"{PCA_PREFIX}{sha1[:16]}"
        record = {"dim": projection.dim, "whiten": projection.whiten, "dtype": dtype,
                  "projection": name + ".npz", "rows": name + f".{dtype}.bin",
                  "projection_sha1": sha1, "sample": projection.info.get("sample"),
                  "explained": projection.info.get("explained"),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        projection.save(self.path / record["projection"])
        done = self.count
        fc7 = self.fc7_rows()
        progress = Progress(done, label=f"projecting fc7 -> {projection.name()}", unit="img",
                            stream=log) if log is not None and done else None
        for lo in range(0, done, PCA_BUILD_ROWS):
            hi = min(done, lo + PCA_BUILD_ROWS)
            self._write_pca_rows(projection, record, fc7[lo:hi], lo)
            if progress:
                progress.update(hi - lo)
        if progress:
            progress.close()

        def change(stored):
            if stored.get("pca") != before:
                raise UserError(f"{self.path}: another process changed the PCA store while "
                                "this one was building one: run one compress.py at a time")
            count = int(stored["count"])
            if count > done:   # appended meanwhile, without these rows
                self._write_pca_rows(projection, record, self.fc7_rows_upto(count)[done:count],
                                     done)
            return dict(stored, pca=record)

        self.meta = self._db.commit([], change)
        self._pca = (record, projection)
        self._fc7_map = self._pca_map = None
        self.remove_unused_pca_files()
        return record

    def remove_pca(self):
        """Forget the PCA store (search re-ranks on fc7 again) and delete its files."""
        if self.readonly:
            raise RuntimeError("store opened read-only")
        self.meta = self._db.commit([], lambda stored: {k: v for k, v in stored.items()
                                                        if k != "pca"})
        self._pca = self._pca_map = None
        self._close_pca_fd()
        return self.remove_unused_pca_files()

    def remove_unused_pca_files(self):
        """Delete PCA files the metadata does not name (a replaced store, or
        one a crash left half built).  Returns their names."""
        record = self.pca_record or {}
        keep = {record.get("projection"), record.get("rows")}
        gone = []
        for f in sorted(self.path.glob(PCA_PREFIX + "*")):
            if f.name not in keep:
                f.unlink()
                gone.append(f.name)
        return gone

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
            # A shard's PCA store stays behind (its files are the shard's): the
            # merged database gets one with compress.py (--projection
            # SHARD/pca-*.npz keeps the shards' projection).
            meta = {k: v for k, v in base.items()
                    if k not in ("count", "created", "schema_version", "backend", "shard", "pca")}
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


