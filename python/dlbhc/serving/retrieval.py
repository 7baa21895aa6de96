"""Answering queries over a feature database: the index cache, the query's
features, coarse-to-fine search, and how results are shown (table, JSON,
montage picture).

The index (packed codes + bucket table) is built once from the database and
cached beside it as `<db>.index.npz`; it is rebuilt whenever the database's
revision (creation time, image count, model) changes, e.g. after extract.py
appended images. Codes stay in RAM; fc7 rows are read from the database's
memory-mapped fc7 file only for the candidates of each query.  The search
itself is HashIndex.search, batched: retrieve.py sends its queries in
batches, and evaluate.py runs the same search.  Retriever.on_milvus opens a
database loaded into Milvus instead (milvus_index: same search contract,
same answers).

The fine stage re-ranks by fc7, or by the database's PCA store when it has
one (compress.py; rerank="auto", the default), with the best exact_top
(rerank.DEFAULT_EXACT_TOP) ranked again by fc7: FINE_STAGES.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ..errors import UserError
from ..report import get_logger
from ..search.index import HashIndex
from ..search.params import SearchParams
from ..search.rerank import DEFAULT_EXACT_TOP, ReducedRows, describe
from ..store.database import FeatureStore, check_compatible

log = get_logger(__name__)

# What the fine stage ranks by: fc7, the PCA store, or the PCA store when
# the database has one (else fc7).
FINE_STAGES = ("auto", "fc7", "pca")


def index_cache_path(db_path):
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".index.npz")


@dataclass
class Query:
    """What a user asked about: `name` as shown (a file, or "id 17: path"),
    its label when known (-1 otherwise), its image file when it has one,
    and, for an image of the database used as the query, its id (left out
    of its own results)."""
    name: str
    label: int = -1
    path: str = ""
    exclude_id: int = None


@dataclass
class Hit:
    """One result.  l2 is the fc7 distance when `exact`, else the distance
    between compressed (PCA) rows that ranked it."""
    rank: int
    id: int
    path: str
    label: int
    hamming: int
    l2: float
    exact: bool = True


@dataclass
class Answer:
    query: Query
    hits: list
    candidates: int
    radius: int
    search_ms: float
    rerank: str = "fc7"

    def as_dict(self):
        return {"query": self.query.name, "query_path": self.query.path or self.query.name,
                "query_label": self.query.label,
                "candidates": self.candidates, "radius": self.radius,
                "search_ms": round(self.search_ms, 3), "rerank": self.rerank,
                "results": [h.__dict__ for h in self.hits]}


def load_matching_model(meta, db_path, deploy=None, weights=None, gpu=None):
    """A HashNet for queries of the database whose metadata is `meta`: the
    deploy/weights it records, unless others are given; either way they
    must match it (bits, fc7, preprocessing, and the weights' sha1)."""
    from ..nets.model import HashNet
    recorded = meta.get("model", {})
    deploy = deploy or recorded.get("deploy")
    weights = weights or recorded.get("weights")
    if not deploy or not weights:
        raise UserError("the database does not record its model: pass --deploy and --weights")
    for what, path in (("deploy", deploy), ("weights", weights)):
        if not Path(path).exists():
            raise UserError(f"the {what} file {path} (recorded in {db_path}) is gone: "
                            f"pass --{what} with the file the database was built with")
    prep = meta["preprocessing"]
    net = HashNet(deploy, weights, prep["mean_bgr"], gpu=gpu, resize=prep["resize"])
    described = net.describe()
    check_compatible(meta, dict(described, fc7_dtype=meta["fc7_dtype"]),
                     what=f"the model ({Path(deploy).name})")
    if recorded.get("weights_sha1") and described["model"]["weights_sha1"] != recorded["weights_sha1"]:
        raise UserError(f"{weights} are not the weights {db_path} was built with "
                        f"({recorded.get('weights')}): their codes would not be comparable")
    return net


class Retriever:
    """A database opened for search, with its index in memory.

    rerank: what the fine stage ranks by (FINE_STAGES): "fc7"; "pca", the
    database's PCA store (compress.py), the best exact_top (default
    rerank.DEFAULT_EXACT_TOP; 0: none) ranked again by fc7; "auto" (the
    default): "pca" when the database has a PCA store, else "fc7" (decided
    when the database is opened).  self.reduced is the rerank.ReducedRows
    the search uses (None for fc7)."""

    def __init__(self, db_path, rerank="auto", exact_top=None):
        self.db_path = Path(db_path)
        self.store = FeatureStore.open(self.db_path)
        if self.store.count == 0:
            raise UserError(f"{db_path} holds no images yet: run extract.py on a collection first")
        try:
            self._exact_top = self._fine_stage(rerank, exact_top)
        except UserError:
            self.store.close()
            raise
        self._take_index()
        self._net = None

    def _take_index(self):
        """Search with the index of the store's current revision from now on
        (index_time: when it was taken): the cached copy beside the database,
        else built (and cached when the folder is writable)."""
        start = time.monotonic()
        try:
            index, rebuilt = HashIndex.load_or_build(
                index_cache_path(self.db_path), self.store.revision(),
                self.store.codes, self.store.bits)
        except OSError:  # a read-only folder: build in memory, do not cache
            index, rebuilt = HashIndex.build(self.store.codes(), self.store.bits), True
        if rebuilt:
            log.info("built the search index of %d images (%d buckets) in %.1f s",
                     index.count, index.n_buckets, time.monotonic() - start)
        self.index, self.index_time = index, time.time()

    def refresh(self):
        """Take in what was appended to the database since it was opened
        (or last refreshed): True when a new index replaced the old one.

        The new index is built before it replaces the old one, and a search
        uses the index it started with, so searches running meanwhile answer
        from the previous state; every state is a whole number of committed
        batches (see FeatureStore.refresh)."""
        if not self.store.refresh() and self.index.count == self.store.count:
            return False
        self._take_index()
        return True

    @classmethod
    def on_milvus(cls, uri, collection):
        """A database loaded into Milvus (python/index_milvus.py), opened for
        search: the same answers, Milvus holding codes, re-rank vectors,
        paths and labels (milvus_index)."""
        from ..scale.milvus_index import MilvusCollection
        self = cls.__new__(cls)
        self.store = MilvusCollection(uri, collection)
        self.db_path = self.store.path
        self.index = self.store.index
        self._net = None
        self._exact_top = None   # re-ranked by the collection's vectors
        log.info("searching %d images in Milvus (%s, %s)", self.store.count, self.store.path,
                 self.store.search_settings["index_type"])
        return self

    def _fine_stage(self, rerank, exact_top):
        """(exact_top) when the search re-ranks by the PCA store, None for
        fc7; the store's PCA files are checked here, once."""
        if rerank not in FINE_STAGES:
            raise UserError(f"--rerank {rerank!r}: choose one of {', '.join(FINE_STAGES)}")
        if exact_top is not None and int(exact_top) < 0:
            raise UserError("--exact-top must be 0 or more")
        if rerank == "fc7" or (rerank == "auto" and self.store.pca_record is None):
            return None
        self.store.projection()   # checked against the database
        return DEFAULT_EXACT_TOP if exact_top is None else int(exact_top)

    @property
    def reduced(self):
        """The rerank.ReducedRows the search ranks by (None: fc7), over the
        store's PCA rows as they are now (a store that grew maps its new
        rows too)."""
        if self._exact_top is None:
            return None
        projection = self.store.projection()
        return ReducedRows(self.store.pca_rows(), projection.apply, self._exact_top,
                           projection.name())

    @property
    def rerank(self):
        """How the fine stage ranks: "fc7", "pca256", "pca256 + fc7 top 200"."""
        return describe(self.reduced)

    def close(self):
        self.store.close()

    # ---- the query's features ----------------------------------------------
    def load_model(self, deploy=None, weights=None, gpu=None):
        """The net that made the database (recorded in its metadata), unless
        another deploy/weights pair is given; either way it must match."""
        self._net = load_matching_model(self.store.meta, self.db_path, deploy, weights, gpu)
        return self._net

    def features_of_images(self, paths):
        if self._net is None:
            self.load_model()
        from ..images import BadImage
        try:
            fc7, _latent, codes = self._net.features_of_paths(paths)
        except BadImage as err:
            raise UserError(f"cannot read query image {err.path}: {err.reason}") from None
        return fc7, codes

    def features_of_ids(self, image_ids):
        """fc7 (Q, D) and codes (Q, B) of database images used as queries."""
        ids = np.asarray(image_ids, dtype=np.int64)
        bad = [int(i) for i in ids if not 0 <= i < self.store.count]
        if bad:
            raise UserError(f"--id {bad[0]}: the database holds ids 0..{self.store.count - 1}")
        return self.store.fc7(ids), self.store.code_rows(ids)

    def id_queries(self, image_ids):
        """Database images as queries: (Query objects, codes, fc7); each
        query leaves its own image out of its results."""
        fc7, codes = self.features_of_ids(image_ids)
        infos = self.store.infos(image_ids)
        queries = [Query(f"id {i}: {info['path']}", label=int(info["label"]), path=info["path"],
                         exclude_id=int(i))
                   for i, info in zip(image_ids, infos)]
        return queries, codes, fc7

    # ---- search ------------------------------------------------------------
    def search(self, queries, codes, fc7, params=None):
        """Answers for a batch of queries (Query objects) with their codes
        (Q, B) and fc7 (Q, D): HashIndex.search over the database's fc7 rows
        as params (a SearchParams; default SearchParams()) asks, then the
        results' paths and labels.  A query with exclude_id gets top_k
        results besides that image."""
        params = SearchParams() if params is None else params
        k = params.top_k
        # One more for queries that leave their own image out (None: all).
        excluding = any(q.exclude_id is not None for q in queries)
        want = k + 1 if excluding and k is not None else k
        # One index (and PCA rows) for the whole batch, even when refresh()
        # swaps them meanwhile.
        index, reduced = self.index, self.reduced
        found = index.search(np.asarray(codes), np.asarray(fc7), self.store.fc7, want,
                             min_candidates=params.candidates, max_radius=params.max_radius,
                             reduced=reduced)
        ranked_by = describe(reduced)      # one fine stage for the whole batch
        answers = []
        for i, query in enumerate(queries):
            result = found[i]
            keep = np.arange(len(result.ids)) if query.exclude_id is None else \
                np.flatnonzero(result.ids != query.exclude_id)
            keep = keep[:k]
            ids = result.ids[keep]
            infos = self.store.infos(ids) if len(keep) else []
            # Plain Python numbers, converted once per column (a top-1000
            # answer is built per request by serve.py).
            hits = [Hit(rank=r + 1, id=image_id, path=info["path"], label=int(info["label"]),
                        hamming=ham, l2=l2, exact=exact)
                    for r, (image_id, info, ham, l2, exact) in enumerate(zip(
                        ids.tolist(), infos, result.hamming[keep].tolist(),
                        result.l2[keep].astype(np.float64).tolist(),
                        (keep < result.exact).tolist()))]
            answers.append(Answer(query, hits, candidates=result.candidates,
                                  radius=result.radius, search_ms=1000 * result.seconds,
                                  rerank=ranked_by))
        return answers


# ---- showing results ---------------------------------------------------------

def format_table(answer, shown=10):
    query = answer.query
    lines = [f"query {query.name}" + (f" (label {query.label})" if query.label >= 0 else ""),
             f"{answer.candidates} candidates within Hamming radius {answer.radius}, "
             f"re-ranked by {answer.rerank}, search {answer.search_ms:.2f} ms",
             f"{'rank':>4}  {'id':>8}  {'ham':>3}  {'L2':>9}  {'label':>5}  path"]
    for hit in answer.hits[:shown]:
        # "~": a distance between compressed rows, not the fc7 distance
        l2 = f"{hit.l2:>9.3f}" if hit.exact else f"~{hit.l2:>8.3f}"
        lines.append(f"{hit.rank:>4}  {hit.id:>8}  {hit.hamming:>3}  {l2}  "
                     f"{hit.label:>5}  {hit.path}")
    if len(answer.hits) > shown:
        lines.append(f"... {len(answer.hits) - shown} more (--show N, or --json for all)")
    if any(not h.exact for h in answer.hits[:shown]):
        lines.append("~ ranked by the PCA rows beyond the exact top (--exact-top N)")
    return "\n".join(lines)


def to_json(answers, indent=2):
    """retrieve.py --json's text, which serve.py's API answers too (indent
    None: compact).  orjson: a top-1000 answer in 0.2 ms, where the json
    module took 7 ms (measured on the 2-core machine under load)."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps([a.as_dict() for a in answers], option=option).decode()


MONTAGE_TILE_INCHES = 1.6
MONTAGE_DPI = 100


def montage(answer, out_path, shown=10):
    """PNG grid: the query, then the top results with Hamming and L2 distance.
    A result's frame is green when its label equals the query's, red when it
    differs (no frame when labels are unknown)."""
    def frame(label):
        if label is None or answer.query.label < 0 or label < 0:
            return None
        return "tab:green" if label == answer.query.label else "tab:red"

    hits = answer.hits[:shown]
    tiles = [("query", answer.query.path or answer.query.name, None)] + \
        [(f"#{h.rank} H{h.hamming} L2 {h.l2:.1f}", h.path, frame(h.label)) for h in hits]
    return contact_sheet(tiles, out_path)


def contact_sheet(tiles, out_path, columns=None):
    """PNG grid of images: tiles are (title, image path, frame colour or
    None), `columns` per row (default: all in one row); an unreadable image
    is a grey tile marked so.  The one picture writer of retrieve.py's
    montage and duplicates.py's group sheets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..images import BadImage, read_image

    cols = max(1, min(columns or len(tiles), len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(MONTAGE_TILE_INCHES * cols,
                                                  (MONTAGE_TILE_INCHES + 0.5) * rows),
                             dpi=MONTAGE_DPI, squeeze=False)
    for ax in axes.ravel()[len(tiles):]:
        ax.axis("off")
    for ax, (title, path, color) in zip(axes.ravel(), tiles):
        try:
            img = read_image(path)
        except (BadImage, OSError):
            img = np.full((8, 8, 3), 200, dtype=np.uint8)
            title += " (unreadable)"
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if color is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
    fig.savefig(out_path, dpi=MONTAGE_DPI)
    plt.close(fig)
    return Path(out_path)
