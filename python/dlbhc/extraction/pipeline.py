"""Bulk extraction: images -> net -> feature store, resumable and safe.

Decoding and resizing run in worker processes so the net does not wait for
images. On the CPU with two or more workers (and no fixed --blas-threads),
each worker also runs its own single-threaded copy of the net (built from a
netcopy.NetCopy) on whole batches and the main process only writes the
store (_forward_in_workers); otherwise (GPU, fewer workers, or
--blas-threads N) the net runs in the main process, beside decoding workers
or none (_forward_in_main). At most a few
chunks are in flight, which bounds memory however large the collection is.
Results are appended in input order by a Committer, which commits the
finished batches together every `commit_seconds`, each commit one
transaction, so a kill at any moment loses at most the uncommitted batches,
and a rerun continues from there.

Messages (images already stored, images skipped) go to the module's logger
(report); the progress line to report's message stream.
"""
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import database_backend
from ..images import BadImage, list_images, write_skipped_list
from ..nets.caffe_env import blas_threads_control
from ..nets.model import ImagePreparer
from ..progress import Progress
from ..report import get_logger
from ..search.codes import pack_codes
from ..store import DEFAULT_BACKEND, DEFAULT_FC7_DTYPE, FeatureStore, check_compatible
from ..store.live import crash_point, writer_lock
from .netcopy import NetCopy

log = get_logger(__name__)

# The defaults of every way to run an extraction (extract(), the Ray job,
# extract.py's options): the one place they are set.
# Images per net forward (and per decoded chunk of a forward worker).
DEFAULT_BATCH_SIZE = 50
# A transaction (two fsyncs) per net batch costs more than the forward of a
# small net: batches are committed together until this much time has passed.
# A crash loses at most these uncommitted images, which a rerun redoes.
DEFAULT_COMMIT_SECONDS = 2.0
# Worker processes: decoding, and on the CPU one single-threaded net each
# (two fill the two cores of the machines this was measured on; _run).
DEFAULT_WORKERS = 2


@dataclass
class ExtractionReport:
    stored: int = 0
    already: int = 0
    skipped: list = field(default_factory=list)   # (path, reason)
    total: int = 0
    seconds: float = 0.0
    forward_mode: str = None   # where the net ran / BLAS threads, for the summary

    @property
    def rate(self):
        return self.stored / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text):
    """'i/n' -> (i, n) with 0 <= i < n."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def select_inputs(items, shard=None):
    """(seq, item) pairs; seq is the position in the full list (kept in the
    store so that merged shards sort back into single-run order)."""
    pairs = list(enumerate(items))
    if shard:
        i, n = shard
        pairs = [p for p in pairs if p[0] % n == i]
    return pairs


def _prepare_chunk(preparer, chunk):
    """Decode a chunk (in a worker, or in the main process with no workers):
    [(seq, path, label)] -> [(seq, path, label, uint8 crop | None, reason)]."""
    result = []
    for seq, path, label in chunk:
        try:
            result.append((seq, path, label, preparer(path), None))
        except BadImage as err:
            result.append((seq, path, label, None, err.reason))
        except Exception as err:  # a decoder bug must not kill a day-long run
            result.append((seq, path, label, None, f"{type(err).__name__}: {err}"))
    return result


_WORKER_PREPARER = None


def _init_worker(preparer):
    """A decoding worker: keeps the preparer that _worker_chunk uses. Workers
    keep the default priority (at a lower one they starved whenever other
    processes shared the cores, and the net waited for images)."""
    global _WORKER_PREPARER
    _WORKER_PREPARER = preparer


def _worker_chunk(chunk):
    """Decoding worker: _prepare_chunk with the preparer _init_worker kept."""
    return _prepare_chunk(_WORKER_PREPARER, chunk)


_WORKER_NET = None


def _init_net_worker(preparer, spec):
    """A forward worker: its own copy of the net (NetCopy: one BLAS thread)."""
    global _WORKER_PREPARER, _WORKER_NET
    _WORKER_PREPARER = preparer
    _WORKER_NET = spec.build()


def _net_worker_chunk(chunk):
    """Worker: decode a batch and run the net on it -> (results without the
    arrays, fc7, latent) for the images that decoded."""
    results = _prepare_chunk(_WORKER_PREPARER, chunk)
    good = [r[3] for r in results if r[3] is not None]
    fc7 = latent = None
    if good:
        fc7, latent = _WORKER_NET.forward_crops(np.stack(good))
    return [(seq, path, label, array is not None, reason)
            for seq, path, label, array, reason in results], fc7, latent


def open_or_create_store(out, net, backend, fc7_dtype):
    """Open an existing store for appending (refusing a different model) or
    create a new one."""
    out = Path(out)
    wanted = dict(net.describe(), fc7_dtype=fc7_dtype)
    existing = database_backend(out) if out.exists() else None
    if existing is None:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a feature database: choose another --out")
        return FeatureStore.create(out, wanted, backend=backend)
    if existing != backend:
        raise UserError(f"{out} is a {existing} database, but --backend {backend} was given")
    store = FeatureStore.open(out, readonly=False)
    try:
        check_compatible(store.meta, wanted, what="the given model")
        old_w = store.meta.get("model", {}).get("weights_sha1")
        new_w = wanted["model"]["weights_sha1"]
        if old_w and old_w != new_w:
            raise UserError(f"{out} was built with other weights (sha1 {old_w[:12]}…, "
                            f"{store.meta['model'].get('weights')}); the given weights have "
                            f"sha1 {new_w[:12]}…. Features of two models must not be mixed: "
                            "use the same weights or a new --out.")
    except UserError:
        store.close()
        raise
    return store


def extract(source, net, out, root=None, batch_size=DEFAULT_BATCH_SIZE, workers=DEFAULT_WORKERS,
            backend=DEFAULT_BACKEND, fc7_dtype=DEFAULT_FC7_DTYPE, shard=None, prefetch=None,
            limit=None, commit_seconds=DEFAULT_COMMIT_SECONDS, blas_threads=None):
    """Extract every image of `source` (folder or list file) into store `out`
    (created, or appended to when it holds the same model); returns an
    ExtractionReport. Skipped images are listed in `out`.skipped.tsv."""
    start = time.monotonic()
    items = list_images(source, root=root)[0]
    if limit:
        items = items[:limit]
    report = extract_items(input_triples(select_inputs(items, shard)), net, out,
                           batch_size=batch_size, workers=workers, backend=backend,
                           fc7_dtype=fc7_dtype, shard=shard, prefetch=prefetch,
                           commit_seconds=commit_seconds, blas_threads=blas_threads)
    report.seconds = time.monotonic() - start
    return report


def input_triples(pairs):
    """(seq, ImageItem) pairs -> (seq, absolute path, label) triples, what a
    store records.  Absolute paths: the database is read from other folders
    later (retrieve.py's montage opens the images it returns)."""
    return [(seq, os.path.abspath(it.path), int(it.label)) for seq, it in pairs]


def extract_items(triples, net, out, batch_size=DEFAULT_BATCH_SIZE, workers=DEFAULT_WORKERS,
                  backend=DEFAULT_BACKEND, fc7_dtype=DEFAULT_FC7_DTYPE, shard=None, prefetch=None,
                  commit_seconds=DEFAULT_COMMIT_SECONDS, blas_threads=None, progress=None):
    """Extract (seq, path, label) triples into store `out` (created, or
    appended to when it holds the same model), skipping the paths it already
    holds; returns an ExtractionReport and lists skipped images in
    `out`.skipped.tsv.  extract() calls this for a whole collection, and each
    Ray actor (ray_extract) for one shard.  progress: a function
    (images to do) -> an object with update(n) and close() (default: a
    Progress line on the message stream)."""
    start = time.monotonic()
    report = ExtractionReport(total=len(triples))
    with writer_lock(out, "extract.py"):
        _extract_locked(triples, net, out, report, batch_size, workers, backend, fc7_dtype,
                        shard, prefetch, commit_seconds, blas_threads, progress)
    report.seconds = time.monotonic() - start
    write_skipped_list(out, report.skipped, "extract.py")
    return report


def _extract_locked(triples, net, out, report, batch_size, workers, backend, fc7_dtype, shard,
                    prefetch, commit_seconds, blas_threads, progress):
    store = open_or_create_store(out, net, backend, fc7_dtype)
    try:
        if shard:
            store.update_meta(shard=f"{shard[0]}/{shard[1]}")
        done = store.stored_paths() if store.count else set()
        todo = [t for t in triples if t[1] not in done]
        report.already = len(triples) - len(todo)
        if report.already:
            log.info("%s: %d of %d images already stored; %d to go", out, report.already,
                     len(triples), len(todo))
        if todo:
            run_extraction(todo, net, store, report, batch_size, workers, prefetch,
                           commit_seconds, blas_threads, progress)
    finally:
        store.close()


def _chunks(todo, size):
    for i in range(0, len(todo), size):
        yield todo[i:i + size]


class BlasThreadTuner:
    """Chooses how many BLAS threads the net's forward uses while the
    decoding workers share the cores.

    On a machine with few cores the workers preempt BLAS threads in the
    middle of a GEMM, and a multi-threaded GEMM then waits for its slowest
    thread: for the small CIFAR net one BLAS thread plus the workers beat two
    threads plus the workers, for AlexNet's large GEMMs two threads win. So
    the first batches alternate between all threads and one, timing the
    forward per image, and the rest of the run uses the faster setting.
    `fixed` (extract.py --blas-threads N) skips the trial.
    """

    def __init__(self, control, trials=3, fixed=None):
        self.control = control
        self.choice = None
        self.samples = {}
        if control is None:
            return
        get, set_ = control
        self.most = int(get())
        if fixed:
            set_(int(fixed))
            self.choice = int(fixed)
        elif self.most <= 1:
            self.choice = self.most
        else:
            self.candidates = [self.most, 1]
            self.samples = {c: [] for c in self.candidates}
            self.trials = trials
            self._batches = 0

    @property
    def tuning(self):
        return self.control is not None and self.choice is None

    def before_batch(self):
        if self.tuning:
            # batch 0 warms caches and allocations up: not timed
            self._current = self.candidates[max(0, self._batches - 1) % 2]
            self.control[1](self._current)

    def after_batch(self, seconds, images):
        if not self.tuning:
            return
        self._batches += 1
        if self._batches == 1:
            return
        self.samples[self._current].append(seconds / images)
        if all(len(v) >= self.trials for v in self.samples.values()):
            medians = {c: sorted(v)[len(v) // 2] for c, v in self.samples.items()}
            self.choice = min(medians, key=medians.get)
            self.control[1](self.choice)
            self.medians_ms = {c: round(1000 * m, 2) for c, m in medians.items()}

    def describe(self):
        if self.control is None:
            return None
        if getattr(self, "medians_ms", None):
            tried = ", ".join(f"{c}: {ms} ms/img" for c, ms in self.medians_ms.items())
            return f"BLAS threads {self.choice} (forward with the workers running: {tried})"
        return f"BLAS threads {self.choice if self.choice is not None else self.most}"


def _in_order(pool, function, chunks, window):
    """pool.apply_async over chunks with at most `window` in flight; yields
    the results in input order (the store keeps the input order)."""
    in_flight = deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(function, (chunk,)))
        if len(in_flight) >= window:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


class Committer:
    """Stages computed batches and commits them together: one store.append
    (one transaction) when `commit_seconds` have passed since the last
    commit, and a final commit(). Codes are packed here (codes.pack_codes);
    report.stored counts the committed images.  Each record gets its file's
    size and mtime_ns (from `stats`, {path: (size, mtime_ns)} taken before
    decoding, else os.stat at commit) for --sync to tell changed files; the
    live ids `replaces` names for a path ({path: id}) are tombstoned in the
    commit that stores the path's new record."""

    def __init__(self, store, report, commit_seconds=DEFAULT_COMMIT_SECONDS, replaces=None,
                 stats=None):
        self.store, self.report, self.commit_seconds = store, report, commit_seconds
        self.replaces, self.stats = replaces or {}, stats or {}
        self._fc7, self._latent, self._infos = [], [], []
        self._since = time.monotonic()

    def stage(self, fc7, latent, infos):
        """Queue a computed batch (none when `infos` is empty); commit when
        commit_seconds have passed."""
        if infos:
            self._fc7.append(fc7)
            self._latent.append(latent)
            self._infos.extend(infos)
        if time.monotonic() - self._since >= self.commit_seconds:
            self.commit()

    def commit(self):
        """Append everything staged as one transaction (nothing when empty)."""
        if not self._infos:
            return
        latent = np.concatenate(self._latent)
        for info in self._infos:
            stat = self.stats.get(info["path"])
            if stat is None:
                try:
                    st = os.stat(info["path"])
                    stat = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stat = None
            if stat is not None:
                info["size"], info["mtime_ns"] = int(stat[0]), int(stat[1])
        remove = [self.replaces[i["path"]] for i in self._infos if i["path"] in self.replaces]
        self.store.append(np.concatenate(self._fc7), latent, pack_codes(latent), self._infos,
                          remove=remove)
        crash_point("committed")
        self.report.stored += len(self._infos)
        self._fc7, self._latent, self._infos = [], [], []
        self._since = time.monotonic()


@dataclass
class _Sink:
    """Where both forward loops hand their results: skipped images are
    reported, progress counted, computed batches staged for the committer."""
    committer: Committer
    progress: Progress
    report: ExtractionReport

    def skip(self, path, reason):
        self.report.skipped.append((path, reason))
        log.warning("skipped %s: %s", path, reason)


def _forward_in_workers(todo, net, preparer, workers, batch_size, prefetch, sink):
    """The net in worker processes: each worker decodes a whole batch and
    runs its own single-threaded copy of the net on it; results come back in
    input order, and this process only reports and stages them."""
    with mp.get_context("fork").Pool(workers, initializer=_init_net_worker,
                                     initargs=(preparer, NetCopy.of(net))) as pool:
        for results, fc7, latent in _in_order(pool, _net_worker_chunk,
                                              _chunks(todo, batch_size),
                                              prefetch or 2 * workers):
            infos = []
            for seq, path, label, ok, reason in results:
                if ok:
                    infos.append({"path": path, "label": label, "seq": seq})
                else:
                    sink.skip(path, reason)
            sink.progress.update(len(results))
            sink.committer.stage(fc7, latent, infos)


class _Batcher:
    """The net in the main process: gathers decoded crops into batches of
    `batch_size` and runs the forward on each, timed for the BLAS tuner."""

    def __init__(self, net, batch_size, tuner, sink):
        self.net, self.batch_size, self.tuner, self.sink = net, batch_size, tuner, sink
        self.arrays, self.infos = [], []

    def add(self, results):
        """Take decoded (seq, path, label, array | None, reason) results;
        a full batch is run at once."""
        for seq, path, label, array, reason in results:
            if array is None:
                self.sink.skip(path, reason)
                self.sink.progress.update(1)
                continue
            self.arrays.append(array)
            self.infos.append({"path": path, "label": label, "seq": seq})
            if len(self.arrays) >= self.batch_size:
                self.flush()

    def flush(self):
        """Run the forward on the gathered crops and stage the results."""
        if not self.arrays:
            return
        self.tuner.before_batch()
        started = time.perf_counter()
        fc7, latent = self.net.forward_crops(np.stack(self.arrays))
        self.tuner.after_batch(time.perf_counter() - started, len(self.arrays))
        self.sink.progress.update(len(self.arrays))
        self.sink.committer.stage(fc7, latent, self.infos)
        self.arrays, self.infos = [], []


def _forward_in_main(todo, net, preparer, workers, batch_size, prefetch, tuner, sink):
    """The net in the main process; `workers` processes decode small chunks
    (0: decoding in this process too), in input order."""
    batcher = _Batcher(net, batch_size, tuner, sink)
    chunks = _chunks(todo, max(1, min(batch_size, 16)))
    if workers <= 0:
        for chunk in chunks:
            batcher.add(_prepare_chunk(preparer, chunk))
    else:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker,
                                         initargs=(preparer,)) as pool:
            for results in _in_order(pool, _worker_chunk, chunks,
                                     prefetch or max(4, 4 * workers)):
                batcher.add(results)
    batcher.flush()


def run_extraction(todo, net, store, report, batch_size, workers, prefetch,
                   commit_seconds=DEFAULT_COMMIT_SECONDS, blas_threads=None, progress=None,
                   replaces=None, stats=None):
    """Forward every (seq, path, label) of `todo` into `store`, in order
    (replaces, stats: see Committer)."""
    preparer = ImagePreparer(net.prep)
    on_gpu = net.gpu is not None and net.gpu >= 0
    meter = progress(len(todo)) if progress else Progress(len(todo), label="extract", unit="img")
    sink = _Sink(Committer(store, report, commit_seconds, replaces, stats), meter, report)
    # On the CPU, one single-threaded net per worker, each decoding and
    # running whole batches, beats one net whose BLAS threads share the
    # cores with decoding workers: Caffe's layers between the GEMMs run on
    # one thread, and small GEMMs gain little from a second one (measured
    # for the small net on 2 cores: 2-thread caffe time ~650 img/s, one
    # net + workers <= 580 img/s, see benchmarks/bench_extract.py).
    if not on_gpu and workers >= 2 and not blas_threads:
        report.forward_mode = f"forward in {workers} worker processes, 1 BLAS thread each"
        _forward_in_workers(todo, net, preparer, workers, batch_size, prefetch, sink)
    else:
        # Only a CPU forward beside decoding workers has threads to tune;
        # --blas-threads N sets them on the CPU with or without workers.
        tunable = not on_gpu and (workers > 0 or blas_threads)
        tuner = BlasThreadTuner(blas_threads_control() if tunable else None,
                                fixed=blas_threads)
        _forward_in_main(todo, net, preparer, workers, batch_size, prefetch, tuner, sink)
        report.forward_mode = tuner.describe()
    sink.committer.commit()
    sink.progress.close()
