"""The query service behind serve.py: one feature database opened for
queries (retrieval.Retriever, its index in memory), the net kept loaded,
the database followed while it grows, thumbnails of its images, and the
limits that keep hostile input harmless.  HTTP is webapp.py's; this module
knows nothing of it and answers with retrieval's Answer objects (the shape
of `retrieve.py --json`).

The net.  No request thread ever touches it: requests hand their decoded
crops to netpool.NetPool, which batches them onto one net in a thread or N
nets in worker processes (net_processes; netpool.py says why).

Growth.  A watcher thread re-reads the database's metadata every
refresh_seconds; when extract.py has appended, Retriever.refresh builds the
new index and swaps it in whole.  The store commits the new count in the
same transaction as the records it counts (fc7 rows were made durable
before), and a search uses the index it started with, so every answer
comes from a whole number of committed batches.  Removals (extract.py
--remove, --sync) change the revision the same way, and the new index
leaves the removed images out; a compaction's new copy is noticed by its
folder (FeatureStore.replaced) and opened in its place.

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
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from ..images import BadImage, decode_image, read_image
from ..nets.model import Preprocessing, prepare_crop
from ..nets.records import class_name
from ..report import get_logger
from ..search.codes import pack_codes
from ..search.params import DEFAULT_TOP_K, SearchParams
from .duplicates import find_duplicates, level_settings
from .netpool import NetPool, Unavailable
from .retrieval import Query, Retriever

log = get_logger(__name__)


class BadRequest(UserError):
    """The request is wrong (HTTP 400)."""


class NotFound(UserError):
    """No such image (HTTP 404)."""


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
    searches by id need none), and the database followed as it grows,
    loses images and is compacted."""

    def __init__(self, db_path, limits=None, net=True, deploy=None, weights=None, gpu=None,
                 net_processes=0, max_batch=32, blas_threads=None, refresh_seconds=2.0,
                 rerank="auto", exact_top=None):
        self.limits = limits or Limits()
        self.retriever = Retriever(db_path, rerank=rerank, exact_top=exact_top)
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
        self._duplicates = {}       # (revision, level, radius, threshold) -> its JSON-able dict
        self._duplicates_lock = threading.Lock()
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

    @property
    def store(self):
        """The database as the retriever holds it now (a compaction switches it)."""
        return self.retriever.store

    # ---- growth ----------------------------------------------------------------
    def _watch(self):
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()

    def refresh(self):
        """Take in images appended since the last look; True when the index
        was replaced.  A failure is logged and the old index kept serving."""
        try:
            start, before = time.monotonic(), self.retriever.index.count
            if self.retriever.refresh():
                now = self.retriever.index.count
                log.info("database %s %d images: index updated in %.2f s",
                         "grew to" if now > before else "changed, now", now,
                         time.monotonic() - start)
                return True
        except Exception as err:  # noqa: BLE001  (keep serving what we have)
            log.warning("could not take in the database's new images: %s", err)
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
            "rerank": self.retriever.rerank, "rerank_note": self.retriever.auto_note,
            "classes": self.retriever.class_names,
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
        shown = text if len(text) <= 60 else text[:57] + "..."
        if not text.isdigit() or len(text) > 12:
            raise NotFound(f"no image with id {shown!r}: ids are whole numbers")
        try:
            self.store.rows_of_ids([int(text)])    # held and not removed
        except UserError as err:
            raise NotFound(str(err)) from None
        return int(text)

    def search_params(self, top_k=DEFAULT_TOP_K, candidates=None, max_radius=None):
        """A request's SearchParams, checked against the limits too;
        BadRequest naming the parameter broken."""
        try:
            return SearchParams(top_k, candidates, max_radius).within(
                max_top_k=self.limits.max_top_k, max_candidates=self.limits.max_candidates)
        except UserError as err:
            raise BadRequest(str(err)) from None

    def _check_count(self, n, what):
        if n == 0:
            raise BadRequest(f"no {what} in the request")
        if n > self.limits.max_images:
            raise BadRequest(f"{n} {what} in one request: at most {self.limits.max_images}")

    # ---- searches ------------------------------------------------------------
    def search_ids(self, id_texts, params=None):
        """Answers for database images used as queries (no net needed), as
        params (SearchParams, from search_params) asks; each image is left
        out of its own results, as retrieve.py --id does."""
        params = self.search_params() if params is None else params
        self._check_count(len(id_texts), "ids")
        ids = [self.parse_id(t) for t in id_texts]
        with self._search_slots:
            queries, codes, fc7 = self.retriever.id_queries(ids)
            return self.retriever.search(queries, codes, fc7, params)

    def search_uploads(self, files, params=None):
        """Answers for uploaded images, files = [(name, bytes or binary file
        object)], in order (a file is read only once it holds a decode slot),
        as params asks (see search_ids).  Returns (answers, timings in ms:
        decode, net, search)."""
        params = self.search_params() if params is None else params
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
                                            params, latent=latent)
        done = time.perf_counter()
        return answers, {"decode": 1000 * (decoded - start), "net": 1000 * (forwarded - decoded),
                         "search": 1000 * (done - forwarded)}

    # ---- near-duplicates ----------------------------------------------------------
    def duplicates(self, level, radius=None, threshold=None):
        """The near-duplicate groups at `level` (duplicates.find_duplicates'
        answer as a dict), found once per database revision and settings;
        bad settings are a BadRequest."""
        try:
            chosen, radius, threshold = level_settings(level, radius, threshold, self.store.bits)
        except UserError as err:
            raise BadRequest(str(err)) from None
        with self._duplicates_lock:
            key = (self.store.revision(), chosen.name, radius, threshold)
            if key not in self._duplicates:
                self._duplicates = {key: find_duplicates(self.store, chosen.name, radius,
                                                         threshold).as_dict()}
            return self._duplicates[key]

    # ---- images --------------------------------------------------------------
    def image_record(self, id_text):
        image_id = self.parse_id(id_text)
        info = self.retriever.image_info(image_id)
        return {"id": image_id, "path": info["path"], "label": int(info["label"]),
                "class_name": class_name(self.retriever.class_names, info["label"])}

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
        path = self.retriever.image_info(image_id)["path"]
        try:
            rgb = read_image(path, max_pixels=self.limits.max_pixels)
        except BadImage as err:
            raise NotFound(f"the file of image {image_id} cannot be shown: {err.reason}") from None
        data = thumbnail_jpeg(rgb, size)
        self._thumbnails.put((image_id, size), data)
        return data
