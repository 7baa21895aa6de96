"""Which of a feature database's rows are live: tombstones, stable ids, and
the one-writer lock.

Ids are what programs and users see (retrieve.py --id, the service's
/image/ID, Milvus primary keys): an image keeps its id for life and an id
is never given to another image, not even after compaction.  Rows are
where a record sits (its `%010d` key, its fc7 row).  They are equal until
the first compaction (compact.py), which drops the dead rows and records
the id of every remaining row in a map:

    ids.bin      (written by compaction) little-endian int64, the id of
                 rows 0..m-1 (ascending); metadata "id_map": {"rows": m,
                 "offset": k}: row r >= m has id r + k
    removed.bin  little-endian int64 ids, the tombstones, appended; only
                 the first meta["removed"] are valid

A removal follows the appends' rule (database.py): the tombstones are
written and fsynced first, then the new "removed" count is committed in
one transaction with whatever else the change holds (a replacement's new
record), so a kill -9 leaves all of it or none.  The revision names the
number of tombstones and compactions, so caches (the search index) follow.

LiveRows holds these methods for FeatureStore, which inherits them (as
pca_rows.PcaRows): live_mask() is the one answer to "is this row live?"
that search, evaluation, Milvus and the near-duplicate finder use.
"""
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import UserError

REMOVED_FILE = "removed.bin"
IDS_FILE = "ids.bin"
_ID = np.dtype("<i8")


def lock_path(db_path):
    """The writer lock of a database: a file beside it (`DB.lock`), so that
    it outlives compaction's switch of the folder."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".lock")


@contextmanager
def writer_lock(db_path, what="this command", must_exist=False):
    """Hold the database's one-writer lock (extract.py adding, removing,
    syncing, compacting); UserError at once when another process holds it
    (or, must_exist, when there is no database at db_path)."""
    db_path = Path(db_path)
    if must_exist and not (db_path.exists() or db_path.with_name(db_path.name + ".old").exists()):
        raise UserError(f"feature database {db_path} does not exist")
    path = lock_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{db_path} is in use by another writer ({holder}): wait for it to "
                            f"finish, then run {what} again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def read_ids(path, count):
    """The first `count` int64 ids of a flat id file (empty when count is 0)."""
    if not count:
        return np.empty(0, dtype=np.int64)
    data = np.fromfile(path, dtype=_ID, count=int(count))
    if len(data) < count:
        raise UserError(f"{path} holds {len(data)} ids, the metadata counts {count}: "
                        "the database is damaged")
    return data.astype(np.int64)


def crash_point(name):
    """Tests kill the process here when DLBHC_CRASH_AT=name: kill -9 at a
    chosen step of a removal, compaction or sync (tests/test_changes_*.py)."""
    if os.environ.get("DLBHC_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def write_ids(fd, ids, start):
    """ids (int64) written at entry `start` of a flat id file, then fsynced."""
    os.pwrite(fd, np.ascontiguousarray(ids, dtype=_ID).tobytes(), int(start) * _ID.itemsize)
    os.fsync(fd)


class LiveRows:
    """Tombstones and the id map of a FeatureStore (a mixin: it uses the
    store's path, meta, count and readonly)."""

    _live = None      # (revision, mask) cached
    _map = None       # (rows, ids) of the id map, cached

    @property
    def removed_count(self):
        """Tombstones committed (ids removed since the last compaction)."""
        return int(self.meta.get("removed", 0))

    @property
    def live_count(self):
        return self.count - self.removed_count

    @property
    def next_id(self):
        """The id the next appended image gets (ids are never reused)."""
        return self.count + int(self.meta.get("id_map", {}).get("offset", 0))

    def removed_ids(self, since=0):
        """The removed ids (tombstones since the last compaction; with since=n,
        those after the first n removed), ascending."""
        return np.sort(read_ids(self.path / REMOVED_FILE, self.removed_count)[int(since):])

    def _id_map(self):
        record = self.meta.get("id_map")
        if not record:
            return None
        if self._map is None or len(self._map) != int(record["rows"]):
            self._map = read_ids(self.path / IDS_FILE, int(record["rows"]))
        return self._map

    def ids_of_rows(self, rows):
        """The ids of rows (array)."""
        rows = np.asarray(rows, dtype=np.int64)
        mapped = self._id_map()
        if mapped is None:
            return rows.copy()
        offset = int(self.meta["id_map"]["offset"])
        inside = rows < len(mapped)
        return np.where(inside, mapped[np.minimum(rows, max(len(mapped) - 1, 0))],
                        rows + offset) if len(mapped) else rows + offset

    def rows_of_ids(self, ids, live=True):
        """The rows of ids; UserError naming the first id the database does
        not hold (or, with live=True, has removed)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        mapped = self._id_map()
        if mapped is None:
            rows, known = ids.copy(), (ids >= 0) & (ids < self.count)
        else:
            offset = int(self.meta["id_map"]["offset"])
            pos = np.searchsorted(mapped, ids)
            in_map = (pos < len(mapped)) & (mapped[np.minimum(pos, max(len(mapped) - 1, 0))]
                                            == ids) if len(mapped) else np.zeros(len(ids), bool)
            tail = ids - offset
            rows = np.where(in_map, pos, tail)
            known = in_map | ((tail >= len(mapped)) & (tail < self.count))
        if not known.all():
            bad = int(ids[~known][0])
            gone = 0 <= bad < self.next_id
            raise UserError(f"no image with id {bad}: " + (
                f"it was removed from {self.path} and compacted away" if gone else
                f"{self.path} holds ids 0..{self.next_id - 1}" +
                (" (less those removed)" if self.next_id != self.live_count else "")))
        if live and self.removed_count:
            dead = ~self.live_mask()[rows]
            if dead.any():
                raise UserError(f"image id {int(ids[dead][0])} was removed from {self.path}")
        return rows

    def live_mask(self):
        """(count,) bool: which rows are live (not removed).  The one test
        every reader uses: search, evaluation, Milvus, near-duplicates."""
        key = (self.count, self.removed_count, self.meta.get("compactions", 0))
        if self._live is None or self._live[0] != key:
            mask = np.ones(self.count, dtype=bool)
            if self.removed_count:
                mask[self.rows_of_ids(self.removed_ids(), live=False)] = False
            self._live = (key, mask)
        return self._live[1]

    def live_rows(self):
        """The rows of live images, ascending."""
        return np.flatnonzero(self.live_mask())

    def live_ids(self):
        """The ids of live images, ascending."""
        return self.ids_of_rows(self.live_rows())

    def _tombstone(self, stored, ids):
        """Inside a write transaction (the backend's commit, `stored` its
        metadata): append ids to the tombstones, durable, and return the
        metadata fields to commit with them."""
        if not len(ids):
            return {}
        start = int(stored.get("removed", 0))
        fd = os.open(self.path / REMOVED_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            write_ids(fd, ids, start)
        finally:
            os.close(fd)
        crash_point("tombstone")       # written, not yet committed
        return {"removed": start + len(ids)}

    def remove(self, ids):
        """Tombstone live ids, one transaction; returns how many."""
        if self.readonly:
            raise RuntimeError("store opened read-only")
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        self.rows_of_ids(ids)       # known and live, or UserError
        self.meta = self._db.commit([], lambda stored: dict(stored, **self._tombstone(stored, ids)))
        return len(ids)
