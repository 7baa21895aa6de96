"""Bulk extraction: images -> net -> feature store, resumable and safe.

Decoding and resizing run in worker processes so the net does not wait for
images. On the CPU with two or more workers, each worker also runs its own
single-threaded copy of the net on whole batches (the main process only
writes the store); otherwise (GPU, or fewer workers) the net runs in the
main process and the workers only decode. At most a few chunks are in
flight, which bounds memory however large the collection is. Results are
appended in input order and committed together every `commit_seconds`, each
commit one transaction, so a kill at any moment loses at most the uncommitted
batches, and a rerun continues from there.
"""
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .caffe_env import blas_threads_control
from .errors import UserError
from .images import BadImage, list_images, write_skipped_list
from .model import ImagePreparer
from .progress import Progress
from .store import FeatureStore, check_compatible, detect_backend


# A transaction (two fsyncs) per net batch costs more than the forward of a
# small net: batches are committed together until this much time has passed.
# A crash loses at most these uncommitted images, which a rerun redoes.
COMMIT_SECONDS = 2.0


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
    """Worker: [(seq, path, label)] -> [(seq, path, label, array | None, reason)]."""
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
    # Workers run at the net's priority: lowered (nice 10), they starved
    # whenever other processes shared the cores and the net waited for
    # images (measured: median ratio 0.75 against 0.82 for the small net).
    global _WORKER_PREPARER
    _WORKER_PREPARER = preparer


def _worker_chunk(chunk):
    return _prepare_chunk(_WORKER_PREPARER, chunk)


_WORKER_NET = None


def _init_net_worker(preparer, net_args):
    """A forward worker: its own copy of the net, one BLAS thread."""
    global _WORKER_PREPARER, _WORKER_NET
    _WORKER_PREPARER = preparer
    control = blas_threads_control()
    if control is not None:
        control[1](1)
    from .model import HashNet
    _WORKER_NET = HashNet(*net_args, check=False)


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
    existing = detect_backend(out) if out.exists() else None
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


def extract(source, net, out, root=None, batch_size=50, workers=2, backend="lmdb",
            fc7_dtype="float32", shard=None, prefetch=None, log=sys.stderr, limit=None,
            commit_seconds=COMMIT_SECONDS, blas_threads=None):
    """Extract every image of `source` (folder or list file) into store `out`."""
    start = time.monotonic()
    items = list_images(source, root=root)[0]
    if limit:
        items = items[:limit]
    pairs = select_inputs(items, shard)
    store = open_or_create_store(out, net, backend, fc7_dtype)
    report = ExtractionReport(total=len(pairs))
    try:
        if shard:
            store.update_meta(shard=f"{shard[0]}/{shard[1]}")
        done = store.stored_paths() if store.count else set()
        # Absolute paths: the database is read from other folders later
        # (retrieve.py's montage opens the images it returns).
        todo = [(seq, os.path.abspath(it.path), int(it.label)) for seq, it in pairs
                if os.path.abspath(it.path) not in done]
        report.already = len(pairs) - len(todo)
        if report.already:
            print(f"{out}: {report.already} of {len(pairs)} images already stored; "
                  f"{len(todo)} to go", file=log)
        if todo:
            _run(todo, net, store, report, batch_size, workers, prefetch, log, commit_seconds,
                 blas_threads)
    finally:
        store.close()
    report.seconds = time.monotonic() - start
    write_skipped_list(out, report.skipped, "extract.py")
    return report


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


def _run(todo, net, store, report, batch_size, workers, prefetch, log,
         commit_seconds=COMMIT_SECONDS, blas_threads=None):
    preparer = ImagePreparer(net.prep)
    on_gpu = net.gpu is not None and net.gpu >= 0
    # On the CPU, one single-threaded net per worker, each decoding and
    # running whole batches, beats one net whose BLAS threads share the
    # cores with decoding workers: Caffe's layers between the GEMMs run on
    # one thread, and small GEMMs gain little from a second one (measured
    # for the small net on 2 cores: 2-thread caffe time ~650 img/s, one
    # net + workers <= 580 img/s, see benchmarks/bench_extract.py).
    forward_in_workers = not on_gpu and workers >= 2 and not blas_threads
    # Otherwise only a CPU forward beside decoding workers has threads to tune.
    tuner = BlasThreadTuner(None if on_gpu or workers <= 0 or forward_in_workers
                            else blas_threads_control(), fixed=blas_threads)
    progress = Progress(len(todo), label="extract", unit="img")
    chunk_size = max(1, min(batch_size, 16))
    pending_arrays, pending_infos = [], []
    uncommitted = {"fc7": [], "latent": [], "infos": [], "since": time.monotonic()}

    def commit():
        if not uncommitted["infos"]:
            return
        latent = np.concatenate(uncommitted["latent"])
        store.append(np.concatenate(uncommitted["fc7"]), latent, net.codes(latent),
                     uncommitted["infos"])
        report.stored += len(uncommitted["infos"])
        uncommitted.update(fc7=[], latent=[], infos=[], since=time.monotonic())

    def stage(fc7, latent, infos):
        """Queue a computed batch; commit when commit_seconds have passed."""
        if infos:
            uncommitted["fc7"].append(fc7)
            uncommitted["latent"].append(latent)
            uncommitted["infos"].extend(infos)
        if time.monotonic() - uncommitted["since"] >= commit_seconds:
            commit()

    def skip(path, reason):
        report.skipped.append((path, reason))
        print(f"skipped {path}: {reason}", file=log)

    def flush():
        if not pending_arrays:
            return
        tuner.before_batch()
        started = time.perf_counter()
        fc7, latent = net.forward_crops(np.stack(pending_arrays))
        tuner.after_batch(time.perf_counter() - started, len(pending_arrays))
        progress.update(len(pending_arrays))
        stage(fc7, latent, list(pending_infos))
        pending_arrays.clear()
        pending_infos.clear()

    def consume(results):
        for seq, path, label, array, reason in results:
            if array is None:
                skip(path, reason)
                progress.update(1)
                continue
            pending_arrays.append(array)
            pending_infos.append({"path": path, "label": label, "seq": seq})
            if len(pending_arrays) >= batch_size:
                flush()

    def consume_forwarded(result):
        results, fc7, latent = result
        infos = []
        for seq, path, label, ok, reason in results:
            if ok:
                infos.append({"path": path, "label": label, "seq": seq})
            else:
                skip(path, reason)
        progress.update(len(results))
        stage(fc7, latent, infos)

    if forward_in_workers:
        net_args = (net.deploy, net.weights, net.prep.mean_bgr, None, net.prep.resize)
        report.forward_mode = f"forward in {workers} worker processes, 1 BLAS thread each"
        with mp.get_context("fork").Pool(workers, initializer=_init_net_worker,
                                         initargs=(preparer, net_args)) as pool:
            for result in _in_order(pool, _net_worker_chunk, _chunks(todo, batch_size),
                                    prefetch or 2 * workers):
                consume_forwarded(result)
    elif workers <= 0:
        for chunk in _chunks(todo, chunk_size):
            consume(_prepare_chunk(preparer, chunk))
    else:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker,
                                         initargs=(preparer,)) as pool:
            for results in _in_order(pool, _worker_chunk, _chunks(todo, chunk_size),
                                     prefetch or max(4, 4 * workers)):
                consume(results)
    flush()
    commit()
    progress.close()
    report.forward_mode = report.forward_mode or tuner.describe()
