"""The query service behind serve.py: one feature database opened for
queries (retrieval.Retriever, its index in memory), the net kept loaded,
the database followed while it grows, thumbnails of its images, and the
limits that keep hostile input harmless.  HTTP is webapp.py's; this module
knows nothing of it and answers with retrieval's Answer objects (the shape
of `retrieve.py --json`).

The net.  pycaffe's Net is not thread-safe, its forward holds Python's GIL
for its whole length (pycaffe never releases it), and Caffe's CPU/GPU mode
is per thread.  So no request thread ever touches a net: requests hand
their decoded crops to NetPool, whose dispatcher threads gather whatever
is waiting into one batch (up to max_batch images) and run it either
  * on one net owned by a dispatcher thread in this process
    (net_processes=0; the forward then stalls every other request for its
    duration, by-id searches included), or
  * on N nets in worker processes, one each (net_processes=N), fed through
    pipes: the server's threads keep running during forwards.
benchmarks/bench_serve.py measures both; README says which is the default.

Growth.  A watcher thread re-reads the database's metadata every
refresh_seconds; when extract.py has appended, Retriever.refresh builds the
new index and swaps it in whole.  The store commits the new count in the
same transaction as the records it counts (fc7 rows were made durable
before), and a search uses the index it started with, so every answer
comes from a whole number of committed batches.

Memory bound (the limits below): request bodies are refused past
max_upload_bytes (webapp.py), and the multipart parser keeps at most 1 MB of
a part in memory (the rest in a temporary file); an upload is read and
decoded only while it holds one of `decode_slots` slots, and an image over
max_pixels is refused from its header, before any pixel buffer exists.
Decoding takes about 11 bytes per pixel at its peak (Pillow's 4-byte RGBX,
the 3-byte array, an EXIF rotation's copy), so uploads in flight hold at
most max_connections x 1 MB + decode_slots x (max_upload_bytes +
11 x max_pixels): 64 + 2 x (16 + 275) MB = 646 MB with the defaults.
Thumbnails are cached up to thumbnail_cache_bytes.
"""
import io
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from ..search.codes import pack_codes
from ..errors import UserError
from ..images import BadImage, decode_image, read_image
from ..nets.model import Preprocessing, prepare_crop
from .retrieval import Query, Retriever, check_search_parameters, load_matching_model


class BadRequest(UserError):
    """The request is wrong (HTTP 400)."""


class NotFound(UserError):
    """No such image (HTTP 404)."""


class Unavailable(UserError):
    """The server cannot do this now or at all (HTTP 503)."""


@dataclass
class Limits:
    """What one request may ask; serve.py's options set them."""
    max_upload_bytes: int = 16 << 20     # a whole request body
    max_pixels: int = 25_000_000         # per uploaded image (a 6000 x 4000 photo is 24 MP)
    max_images: int = 32                 # query images or ids per request
    max_top_k: int = 10_000
    max_candidates: int = 1_000_000
    decode_slots: int = 2                # uploads decoded at the same time
    search_slots: int = 4                # searches run at the same time
    min_thumbnail: int = 16
    max_thumbnail: int = 512
    thumbnail_cache_bytes: int = 32 << 20

    def as_dict(self):
        return asdict(self)


def limit_malloc_arenas(arenas=2):
    """Cap glibc's malloc arenas for a long-running server (a no-op where
    the C library is not glibc).  Each request thread would otherwise get
    an arena of its own, up to 8 per core, that keeps the freed working
    arrays of searches; call before the server starts its threads."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, int(arenas))     # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


# ---- the net -------------------------------------------------------------------

class _Job:
    __slots__ = ("crops", "done", "fc7", "latent", "error")

    def __init__(self, crops):
        self.crops = crops
        self.done = threading.Event()
        self.fc7 = self.latent = self.error = None


def _set_blas_threads(n):
    """Set the OpenBLAS threads of the Caffe in this process (when it uses
    OpenBLAS); the count in force afterwards, read back (None: no OpenBLAS)."""
    from ..nets.caffe_env import blas_threads_control
    control = blas_threads_control()
    if control is None:
        return None
    if n:
        control[1](int(n))
    return int(control[0]())


class _ThreadNet:
    """The net in this process, built and run by its dispatcher thread only
    (Caffe's mode is per thread, and the net is not thread-safe)."""
    where = "thread"

    def __init__(self, model_args, blas_threads):
        self.model_args, self.blas_threads = model_args, blas_threads
        self.net = None
        self.blas_in_force = None

    def start(self):
        self.blas_in_force = _set_blas_threads(self.blas_threads)
        self.net = load_matching_model(*self.model_args)

    def forward(self, crops):
        return self.net.forward_crops(crops)

    def close(self):
        self.net = None


def _net_process_main(conn, model_args, blas_threads):
    """A net worker process: load the net, then answer crops with (fc7, latent)."""
    net = _ThreadNet(model_args, blas_threads)    # in this process's only thread
    try:
        net.start()
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        conn.send(("error", f"{type(err).__name__}: {err}" if not isinstance(err, UserError)
                   else str(err)))
        return
    conn.send(("ready", net.blas_in_force))
    while True:
        try:
            crops = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if crops is None:
            return
        try:
            conn.send(("ok", net.forward(crops)))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", f"{type(err).__name__}: {err}"))


class _ProcessNet:
    """One net in a worker process of its own, fed through a pipe."""
    where = "process"

    def __init__(self, model_args, blas_threads):
        self.model_args, self.blas_threads = model_args, blas_threads
        self.proc = self.conn = None
        self.blas_in_force = None

    def start(self):
        # spawn, not fork: the server has threads (and maybe a GPU context).
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_net_process_main, daemon=True,
                                args=(child, self.model_args, self.blas_threads))
        self.proc.start()
        child.close()
        status, message = self._recv()
        if status != "ready":
            self.close()
            raise UserError(message)
        self.blas_in_force = message

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return "error", f"the net's worker process (pid {self.proc.pid}) died " \
                            f"(exit code {self.proc.exitcode})"

    def forward(self, crops):
        try:
            self.conn.send(crops)
        except (BrokenPipeError, OSError):
            pass   # reported by _recv
        status, value = self._recv()
        if status != "ok":
            if not self.proc.is_alive():
                self.close()
                self.start()   # a fresh worker for the next batch
            raise RuntimeError(value)
        return value

    def close(self):
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.conn.close()
        if self.proc is not None:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.proc = self.conn = None


class NetPool:
    """Forward passes for concurrent requests, batched: features(crops)
    blocks until the crops' fc7 and latent are computed.  One dispatcher
    thread per net takes the waiting jobs (up to max_batch images in all)
    and runs them as one forward."""

    def __init__(self, model_args, processes=0, max_batch=32, blas_threads=None):
        self.processes = int(processes)
        self.max_batch = max(1, int(max_batch))
        # One BLAS thread per net unless asked: query batches are small, and
        # on the shared 2-core machine a second OpenBLAS thread never helped
        # the small net's forward and, with other work on the cores, made it
        # up to 2.8x slower (its threads spin-wait for each other): batch 32
        # 93 vs 263 ms (bench_serve.py --blas-table; docs/serving.md).
        self.blas_threads = 1 if blas_threads is None else int(blas_threads)
        self.model_args = model_args
        self._jobs = queue.Queue()
        kind = _ProcessNet if self.processes > 0 else _ThreadNet
        self._nets = [kind(model_args, self.blas_threads) for _ in range(max(1, self.processes))]
        self._threads = []
        for net in self._nets:
            ready, failure = threading.Event(), []
            thread = threading.Thread(target=self._dispatch, args=(net, ready, failure),
                                      name="dlbhc-net", daemon=True)
            thread.start()
            ready.wait()
            if failure:
                self.close()
                raise failure[0]
            self._threads.append(thread)

    @property
    def nets(self):
        return list(self._nets)

    @property
    def mode(self):
        return f"{self.processes} worker processes" if self.processes else "one net in a thread"

    def features(self, crops):
        """crops (n, crop, crop, 3) uint8 -> fc7 (n, D), latent (n, bits)."""
        job = _Job(np.ascontiguousarray(crops))
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise Unavailable(f"the net failed on this request: {job.error}")
        return job.fc7, job.latent

    def _dispatch(self, net, ready, failure):
        try:
            net.start()
            # One forward before the first request: Caffe allocates its
            # blobs' memory on the first (measured: the first upload's
            # forward took 450 ms, the next ones a few).
            crop = int(self.model_args[0]["preprocessing"]["crop"])
            net.forward(np.zeros((1, crop, crop, 3), dtype=np.uint8))
        except BaseException as err:  # noqa: BLE001  (raised by the constructor)
            failure.append(err)
            ready.set()
            return
        ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch, n = [job], len(job.crops)
            while n < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)   # for the next dispatcher, after this batch
                    break
                batch.append(more)
                n += len(more.crops)
            try:
                crops = batch[0].crops if len(batch) == 1 else \
                    np.concatenate([j.crops for j in batch])
                fc7, latent = net.forward(crops)
                start = 0
                for j in batch:
                    end = start + len(j.crops)
                    j.fc7, j.latent = fc7[start:end], latent[start:end]
                    start = end
            except Exception as err:  # noqa: BLE001  (handed to the waiting requests)
                for j in batch:
                    j.error = str(err)
            for j in batch:
                j.done.set()
        net.close()

    def close(self):
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []


# ---- thumbnails ------------------------------------------------------------------

class _ByteCache:
    """A least-recently-used cache of bytes values, bounded by their total size."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value):
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


def thumbnail_jpeg(rgb, size, quality=85):
    """JPEG bytes of an RGB image shrunk to fit size x size (never enlarged:
    the page scales small images up itself)."""
    from PIL import Image
    img = Image.fromarray(rgb)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---- the service -----------------------------------------------------------------

def upload_name(name):
    """An uploaded file's name as shown back: its last path component,
    printable characters only, at most 100 of them."""
    name = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:100]
    return name or "upload"


class QueryService:
    """A database opened for queries, its net loaded once (unless net=False:
    searches by id need none), and the database followed as it grows."""

    def __init__(self, db_path, limits=None, net=True, deploy=None, weights=None, gpu=None,
                 net_processes=0, max_batch=32, blas_threads=None, refresh_seconds=2.0,
                 log=sys.stderr):
        self.limits = limits or Limits()
        self.log = log
        self.retriever = Retriever(db_path, log=log)
        self.store = self.retriever.store
        self.prep = Preprocessing.from_dict(self.store.meta["preprocessing"]) \
            if "preprocessing" in self.store.meta else None
        self.net = None
        self._decode_slots = threading.BoundedSemaphore(max(1, self.limits.decode_slots))
        # More searches at once than cores buys nothing (they share the GIL)
        # and each holds its working arrays: measured at 2.5M images, the
        # server's own memory grew from 170 to 640 MB with 32 clients when
        # every request thread searched at once.
        self._search_slots = threading.BoundedSemaphore(max(1, self.limits.search_slots))
        self._thumbnails = _ByteCache(self.limits.thumbnail_cache_bytes)
        try:
            if net:
                if self.prep is None:
                    raise UserError(f"{db_path} records no preprocessing (not made by "
                                    "extract.py): serve it with --no-net (search by id only)")
                model_args = (dict(self.store.meta), self.retriever.db_path, deploy, weights, gpu)
                self.net = NetPool(model_args, processes=net_processes, max_batch=max_batch,
                                   blas_threads=blas_threads)
        except BaseException:
            self.retriever.close()
            raise
        self.refresh_seconds = refresh_seconds
        self._stop = threading.Event()
        self._watcher = None
        if refresh_seconds and refresh_seconds > 0:
            self._watcher = threading.Thread(target=self._watch, name="dlbhc-refresh", daemon=True)
            self._watcher.start()

    def close(self):
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        if self.net is not None:
            self.net.close()
        self.retriever.close()

    # ---- growth ----------------------------------------------------------------
    def _watch(self):
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()

    def refresh(self):
        """Take in images appended since the last look; True when the index
        was replaced.  A failure is logged and the old index kept serving."""
        try:
            start = time.monotonic()
            if self.retriever.refresh():
                print(f"database grew to {self.retriever.index.count} images: index "
                      f"updated in {time.monotonic() - start:.2f} s", file=self.log, flush=True)
                return True
        except Exception as err:  # noqa: BLE001  (keep serving what we have)
            print(f"could not take in the database's new images: {err}", file=self.log,
                  flush=True)
        return False

    # ---- what the server is ------------------------------------------------------
    def info(self):
        meta = self.store.meta
        index = self.retriever.index
        model = meta.get("model", {})
        return {
            "database": str(self.retriever.db_path),
            "count": index.count,
            "stored": self.store.count,
            "bits": self.store.bits,
            "fc7_dim": self.store.fc7_dim,
            "fc7_dtype": meta.get("fc7_dtype"),
            "backend": meta.get("backend"),
            "created": meta.get("created"),
            "model": {"deploy": model.get("deploy"), "weights": model.get("weights"),
                      "weights_sha1": model.get("weights_sha1")},
            "preprocessing": meta.get("preprocessing"),
            "index": {"buckets": index.n_buckets,
                      "built": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                             time.localtime(self.retriever.index_time)),
                      "age_s": round(time.time() - self.retriever.index_time, 3)},
            "net": None if self.net is None else {
                "mode": self.net.mode, "max_batch": self.net.max_batch,
                # read back from OpenBLAS where each net runs (None: another BLAS)
                "blas_threads": [net.blas_in_force for net in self.net.nets]},
            "limits": self.limits.as_dict(),
            "process": os.getpid(),      # which of serve.py --workers N answered
        }

    # ---- parameters ----------------------------------------------------------
    def parse_id(self, text):
        """A database image id from request text; NotFound for anything else
        (a number outside the database, a word, a path)."""
        text = str(text).strip()
        count = self.store.count
        if not text.isdigit() or len(text) > 12 or int(text) >= count:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise NotFound(f"no image with id {shown!r}: the database holds ids 0..{count - 1}")
        return int(text)

    def _search_options(self, top_k, candidates, max_radius):
        try:
            check_search_parameters(top_k, candidates, max_radius, max_top_k=self.limits.max_top_k,
                                    max_candidates=self.limits.max_candidates)
        except UserError as err:
            raise BadRequest(str(err)) from None
        return dict(k=top_k, candidates=candidates, max_radius=max_radius)

    def _check_count(self, n, what):
        if n == 0:
            raise BadRequest(f"no {what} in the request")
        if n > self.limits.max_images:
            raise BadRequest(f"{n} {what} in one request: at most {self.limits.max_images}")

    # ---- searches ------------------------------------------------------------
    def search_ids(self, id_texts, top_k=10, candidates=None, max_radius=None):
        """Answers for database images used as queries (no net needed); each
        image is left out of its own results, as retrieve.py --id does."""
        options = self._search_options(top_k, candidates, max_radius)
        self._check_count(len(id_texts), "ids")
        ids = [self.parse_id(t) for t in id_texts]
        with self._search_slots:
            queries, codes, fc7 = self.retriever.id_queries(ids)
            return self.retriever.search(queries, codes, fc7, **options)

    def search_uploads(self, files, top_k=10, candidates=None, max_radius=None):
        """Answers for uploaded images, files = [(name, bytes or binary file
        object)], in order (a file is read only once it holds a decode slot).
        Returns (answers, timings in ms: decode, net, search)."""
        options = self._search_options(top_k, candidates, max_radius)
        self._check_count(len(files), "images")
        if self.net is None:
            raise Unavailable("this server runs without a net (--no-net): "
                              "it searches by database id only")
        start = time.perf_counter()
        names, crops = [], []
        for name, data in files:
            name = upload_name(name)
            with self._decode_slots:
                try:
                    rgb = decode_image(data, name, self.limits.max_pixels)
                except BadImage as err:
                    raise BadRequest(f"{name}: {err.reason}") from None
                crops.append(prepare_crop(rgb, self.prep))
                del rgb
            names.append(name)
        decoded = time.perf_counter()
        fc7, latent = self.net.features(np.stack(crops))
        forwarded = time.perf_counter()
        with self._search_slots:
            answers = self.retriever.search([Query(n) for n in names], pack_codes(latent), fc7,
                                            **options)
        done = time.perf_counter()
        return answers, {"decode": 1000 * (decoded - start), "net": 1000 * (forwarded - decoded),
                         "search": 1000 * (done - forwarded)}

    # ---- images --------------------------------------------------------------
    def image_record(self, id_text):
        image_id = self.parse_id(id_text)
        info = self.store.infos([image_id])[0]
        return {"id": image_id, "path": info["path"], "label": int(info["label"])}

    def thumbnail(self, id_text, size=128):
        """JPEG bytes of database image `id_text` shrunk to fit size x size.
        Only files the database records are ever read, and only by id."""
        image_id = self.parse_id(id_text)
        lo, hi = self.limits.min_thumbnail, self.limits.max_thumbnail
        if not lo <= size <= hi:
            raise BadRequest(f"size must be between {lo} and {hi} (got {size})")
        cached = self._thumbnails.get((image_id, size))
        if cached is not None:
            return cached
        path = self.store.infos([image_id])[0]["path"]
        try:
            rgb = read_image(path, max_pixels=self.limits.max_pixels)
        except BadImage as err:
            raise NotFound(f"the file of image {image_id} cannot be shown: {err.reason}") from None
        data = thumbnail_jpeg(rgb, size)
        self._thumbnails.put((image_id, size), data)
        return data
