"""A database kept in step with its collection: images removed by id or
path, a folder synced (new files added, changed ones re-extracted in place
of their old record, vanished ones removed), compaction.

Every change holds the database's writer lock (store.live.writer_lock), so
a second writer is refused with a clear message.  A changed file is told
from an unchanged one by its size and modification time (os.stat, no
decoding), which every record made since this module exists carries
(pipeline.Committer records them).  Records older than that have none and
are taken as unchanged.  A replacement commits the new record and the old
one's tombstone in one transaction, so a kill -9 leaves one record per path
and a rerun finishes the job: what was done reads as unchanged.
"""
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..images import list_images, write_skipped_list
from ..report import get_logger
from ..store import DEFAULT_BACKEND, DEFAULT_FC7_DTYPE, FeatureStore
from ..store.live import writer_lock
from .pipeline import (DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_WORKERS,
                       ExtractionReport, open_or_create_store, run_extraction)

log = get_logger(__name__)


def file_stat(path):
    """(size, mtime_ns) of a file: what tells a changed file from the record."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def ids_of_targets(store, targets):
    """Ids (ascending, unique) of `targets`: image ids (digits) or file
    paths of live images; UserError naming the first one the database does
    not hold."""
    ids, paths = [], []
    for text in targets:
        text = str(text).strip()
        (ids if text.isdigit() else paths).append(text)
    found = [int(i) for i in ids]
    store.rows_of_ids(found)          # held and live, or UserError
    if paths:
        records = store.live_records()
        for text in paths:
            hit = records.get(os.path.abspath(text))
            if hit is None:
                raise UserError(f"{text} is not an image of {store.path} (no live record has "
                                "that path; give an id or the path it was extracted from)")
            found.append(hit[0])
    return np.unique(np.asarray(found, dtype=np.int64))


def remove_images(out, targets):
    """Remove the images `targets` (ids or paths) from database `out`: one
    transaction.  Returns the removed ids."""
    with writer_lock(out, "extract.py --remove", must_exist=True):
        with FeatureStore.open(out, readonly=False) as store:
            ids = ids_of_targets(store, targets)
            store.remove(ids)
    return ids


@dataclass
class SyncReport:
    added: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0
    unknown_stat: int = 0      # old records without size/mtime: taken as unchanged
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    extraction: ExtractionReport = None

    def summary(self):
        text = (f"added {self.added}, re-extracted {self.replaced} changed, removed "
                f"{self.removed} vanished, {self.unchanged} unchanged, "
                f"{len(self.skipped)} skipped ({self.seconds:.1f} s)")
        if self.unknown_stat:
            text += (f"; {self.unknown_stat} records predate size/mtime recording and were "
                     "taken as unchanged")
        return text


def plan_sync(store, items):
    """What a sync of `items` (images.ImageItem) does to `store`: (todo
    triples (seq, path, label), {path: old id} of changed files, ids of
    vanished files, {path: (size, mtime_ns)}, report with the counts)."""
    report = SyncReport()
    records = store.live_records() if store.count else {}
    todo, replaces, stats, seen = [], {}, {}, set()
    for seq, item in enumerate(items):
        path = os.path.abspath(item.path)
        seen.add(path)
        try:
            stats[path] = file_stat(path)
        except OSError:
            continue          # vanished since listing: removed below if recorded
        hit = records.get(path)
        if hit is None:
            todo.append((seq, path, int(item.label)))
            report.added += 1
            continue
        image_id, info = hit
        if "size" not in info:
            report.unknown_stat += 1
            report.unchanged += 1
        elif (info["size"], info["mtime_ns"]) != stats[path] or \
                int(info["label"]) != int(item.label):
            todo.append((seq, path, int(item.label)))
            replaces[path] = image_id
            report.replaced += 1
        else:
            report.unchanged += 1
    vanished = [hit[0] for path, hit in records.items() if path not in stats]
    report.removed = len(vanished)
    return todo, replaces, vanished, stats, report


def sync(source, net, out, root=None, batch_size=DEFAULT_BATCH_SIZE, workers=DEFAULT_WORKERS,
         backend=DEFAULT_BACKEND, fc7_dtype=DEFAULT_FC7_DTYPE,
         commit_seconds=DEFAULT_COMMIT_SECONDS, blas_threads=None):
    """Bring database `out` in step with `source` (folder or list file):
    vanished files removed (one transaction), then new and changed files
    extracted, each changed file's old record tombstoned in the commit that
    stores its new one.  Resumable; an unchanged collection costs a stat per
    file and changes nothing.  Returns a SyncReport."""
    start = time.monotonic()
    items = list_images(source, root=root)[0]
    with writer_lock(out, "extract.py --sync"):
        store = open_or_create_store(out, net, backend, fc7_dtype)
        try:
            todo, replaces, vanished, stats, report = plan_sync(store, items)
            if vanished:
                store.remove(vanished)
            if todo:
                extraction = ExtractionReport(total=len(todo))
                run_extraction(todo, net, store, extraction, batch_size, workers, None,
                               commit_seconds, blas_threads, replaces=replaces, stats=stats)
                report.extraction, report.skipped = extraction, extraction.skipped
                # A changed file that no longer decodes: its old record is stale.
                broken = [replaces[p] for p, _ in extraction.skipped if p in replaces]
                if broken:
                    store.remove(broken)
                    report.replaced -= len(broken)
                    report.removed += len(broken)
                report.added -= sum(1 for p, _ in extraction.skipped if p not in replaces)
        finally:
            store.close()
    if todo:
        write_skipped_list(out, report.skipped, "extract.py --sync")
    report.seconds = time.monotonic() - start
    log.info("%s: %s", out, report.summary())
    return report
