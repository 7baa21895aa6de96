"""Compaction: a feature database rewritten without its removed rows.

The live rows are copied, in order, into a new database beside the old one
(`DB.compacting`): fc7 rows, PCA rows, the keyed records under their new
row keys, and ids.bin, the id of every row (ids never change: live.py).
Its metadata is committed last, after every file is synced, and only then
is the folder switched in: DB -> DB.old, DB.compacting -> DB, DB.old
deleted.  A kill -9 at any point leaves the old database whole (before the
first rename) or the new one whole (after it; the next writer or reader
finishes the switch, recover_switch), never a mix.  The extra disk held at
the peak is the new copy: the live rows, at most one copy of the old.

Readers that hold the old database (the service) keep reading it until
they notice the switch (FeatureStore.replaced) and reopen.
"""
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..progress import Progress
from ..report import get_logger
from .backends import BACKENDS, META_KEY, meta_bytes
from .database import FC7_FILE, FeatureStore, key
from .live import IDS_FILE, crash_point, write_ids, writer_lock

log = get_logger(__name__)

# Rows copied per step (fc7 of a 4096-wide float32 row: 16 KiB each).
COMPACT_ROWS = 8192
COMPACTING_SUFFIX = ".compacting"
OLD_SUFFIX = ".old"


def _sibling(path, suffix):
    return path.with_name(path.name + suffix)


def recover_switch(path):
    """Finish a compaction's folder switch that a kill interrupted (the
    database folder missing, its old and new copies beside it); True when
    something was done."""
    path = Path(path)
    new, old = _sibling(path, COMPACTING_SUFFIX), _sibling(path, OLD_SUFFIX)
    if path.exists():
        if old.exists():      # switched; the old copy not yet deleted
            shutil.rmtree(old)
            return True
        return False
    if not old.exists():
        return False
    try:
        # The new copy is complete whenever the old one has been moved aside.
        os.rename(new if new.exists() else old, path)
    except FileNotFoundError:   # another process finished it meanwhile
        pass
    if old.exists():
        shutil.rmtree(old)
    log.info("%s: finished the switch of an interrupted compaction", path)
    return True


def _copy_rows(src, fd, rows, row_bytes):
    """Rows `rows` of the memory map `src`, written densely into fd."""
    for lo in range(0, len(rows), COMPACT_ROWS):
        part = rows[lo:lo + COMPACT_ROWS]
        os.pwrite(fd, np.ascontiguousarray(src[part]).tobytes(), lo * row_bytes)
    os.fsync(fd)


def _write_copy(old, new_path, live):
    """The new database at new_path: the live rows of `old`, synced, its
    metadata committed last."""
    new_path.mkdir()
    ids = old.ids_of_rows(live)
    n = len(live)
    meter = Progress(n, label="compact", unit="img")
    db = BACKENDS[old.meta["backend"]](new_path, readonly=False)
    try:
        for lo in range(0, n, COMPACT_ROWS):
            part = live[lo:lo + COMPACT_ROWS]
            items = []
            for table in ("latent", "code", "info"):
                values = old.raw_records(table, part)
                items += [(table, key(lo + j), v) for j, v in enumerate(values)]
            db.write(items)
            meter.update(len(part))
            crash_point("compact-copy")
        files = [(FC7_FILE, old.fc7_rows(), old.fc7_row_bytes)]
        record = old.pca_record
        if record:
            pca = old.pca_rows()
            files.append((record["rows"], pca, pca.shape[1] * pca.dtype.itemsize))
            shutil.copy2(old.path / record["projection"], new_path / record["projection"])
        for name, src, row_bytes in files:
            fd = os.open(new_path / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _copy_rows(src, fd, live, row_bytes)
            finally:
                os.close(fd)
        fd = os.open(new_path / IDS_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            write_ids(fd, ids, 0)
        finally:
            os.close(fd)
        meta = dict(old.meta, count=n, removed=0,
                    id_map={"rows": n, "offset": old.next_id - n},
                    compactions=int(old.meta.get("compactions", 0)) + 1,
                    compacted=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        db.write([("meta", META_KEY, meta_bytes(meta))])
    finally:
        db.close()
        meter.close()
    dir_fd = os.open(new_path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def compact(path):
    """Rewrite the database at `path` without its removed rows (see the
    module docstring).  Returns (rows before, rows after)."""
    path = Path(path)
    with writer_lock(path, "the compaction", must_exist=True):
        recover_switch(path)
        new_path, old_path = _sibling(path, COMPACTING_SUFFIX), _sibling(path, OLD_SUFFIX)
        with FeatureStore.open(path) as old:
            before = old.count
            if not old.removed_count:
                log.info("%s has no removed images: nothing to compact", path)
                return before, before
            if new_path.exists():      # an interrupted copy: start again
                shutil.rmtree(new_path)
            live = old.live_rows()
            _write_copy(old, new_path, live)
        crash_point("compact-before-switch")
        os.rename(path, old_path)
        crash_point("compact-mid-switch")
        os.rename(new_path, path)
        shutil.rmtree(old_path)
        log.info("%s compacted: %d rows -> %d", path, before, len(live))
        return before, len(live)
