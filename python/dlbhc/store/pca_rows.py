"""The PCA re-rank store of a feature database: a projection of fc7
(search.pca.Projection) learned once, and every image's projected fc7 in a
flat file of fixed-size rows beside fc7.bin.

    pca-<sha1>.npz               the projection
    pca-<sha1>.<dtype>.bin       image i's projection at byte offset
                                 i * dim * itemsize (float32 or float16)

The database's metadata field "pca" names both files, with the
projection's sha1; compress.py makes, replaces and removes the store, and
every append projects its batch (database.FeatureStore.append).  The rules
are the fc7 rows' own: files complete and synced before the metadata names
them, rows above the committed count never read.

PcaRows holds these methods for FeatureStore, which inherits them (one
object per database, as before; the split is by concern, so the rows'
format and rules read in one place).
"""
import os
import time

import numpy as np

from ..errors import UserError
from ..files import file_digest
from ..progress import Progress
from ..search.pca import DEFAULT_SAMPLE, Projection, sample_ids

PCA_PREFIX = "pca-"
PCA_DTYPES = ("float32", "float16")
# Rows read, projected and written per step when a PCA store is built.
PCA_BUILD_ROWS = 8192


class PcaRows:
    """The PCA re-rank store's methods of a FeatureStore (a mixin: it uses the
    store's path, meta, count, fc7_dim, readonly, fc7_rows(), fc7_rows_upto()
    and backend)."""

    _pca = None            # (meta record, Projection) once loaded and checked
    _pca_map = None        # memory map of the PCA rows, sized to count rows
    _pca_fd = None         # (file name, write handle) of the PCA rows

    def _close_pca_fd(self):
        if self._pca_fd is not None:
            os.close(self._pca_fd[1])
            self._pca_fd = None

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

    def add_pca(self, projection, dtype="float32"):
        """Write every image's projection into a new PCA rows file and record
        it (and the projection) in the metadata; a PCA store recorded before
        is replaced (its files deleted after the switch).  Returns the record.

        Crash-safe like an append: the files are complete and synced before
        the metadata names them; appends made meanwhile by another process
        are projected inside the committing transaction.  A progress line
        (progress.Progress) shows while the rows are projected."""
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
        progress = Progress(done, label=f"projecting fc7 -> {projection.name()}",
                            unit="img") if done else None
        for lo in range(0, done, PCA_BUILD_ROWS):
            hi = min(done, lo + PCA_BUILD_ROWS)
            self._write_pca_rows(projection, record, fc7[lo:hi], lo)
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
