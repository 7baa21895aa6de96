"""Answering queries over a feature database: the index cache, the query's
features, coarse-to-fine search (how answers are shown: display.py).

The index (packed codes + bucket table) is built once from the database and
cached beside it as `<db>.index.npz`; it is rebuilt whenever the database's
revision (creation time, image count, model) changes, e.g. after extract.py
appended images. Codes stay in RAM; fc7 rows are read from the database's
memory-mapped fc7 file only for the candidates of each query.  The search
itself is HashIndex.search, batched: retrieve.py sends its queries in
batches, and evaluate.py runs the same search.  Retriever.on_milvus opens a
database loaded into Milvus instead (milvus_index: same search contract,
same answers).

The fine stage (FINE_STAGES) re-ranks by fc7, the stored latent
activations, the query's latent against the stored codes ("asymmetric"),
the database's PCA store (compress.py; the best exact_top,
rerank.DEFAULT_EXACT_TOP, ranked again by fc7), or keeps the Hamming order
with the latent as tie-break ("none"; search.choice says what each is).
rerank="auto", the default, takes the stage recorded for the database's
model (nets.records: rerank.json, written by train.py, chosen with
search.choice's rule among the stages the database has); a model without a
record keeps the behaviour from before: the PCA store when the database has
one, else fc7.  Class names come from the model's record too (classes.txt):
answers carry them beside the label numbers.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..report import get_logger
from ..nets.records import class_name, read_class_names, read_rerank_record, record_folder
from ..search.choice import LATENT_STAGES, STAGES, choose, stage_rows
from ..search.index import HashIndex
from ..search.params import SearchParams
from ..search.rerank import DEFAULT_EXACT_TOP, describe
from ..store.database import FeatureStore, check_compatible

log = get_logger(__name__)

# What the fine stage ranks by: search.choice's stages, or "auto" (the
# stage recorded for the database's model; without a record, the PCA store
# when the database has one, else fc7).
FINE_STAGES = ("auto",) + STAGES


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
    class_name: str = None


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
    class_name: str = None


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
                "query_label": self.query.label, "query_class": self.query.class_name,
                "candidates": self.candidates, "radius": self.radius,
                "search_ms": round(self.search_ms, 3), "rerank": self.rerank,
                "results": [h.__dict__ for h in self.hits]}


def auto_stage(meta, has_pca):
    """What --rerank auto means for a database with metadata `meta` (and a
    PCA store when has_pca): (stage, a note saying why)."""
    record = read_rerank_record(record_folder(meta))
    if record is None:
        stage = "pca" if has_pca else "fc7"
        return stage, (f"no fine-stage record (rerank.json) for this model: re-ranking by "
                       f"{stage}, as before records (train.py writes one)")
    available = [name for name in STAGES if name != "pca" or has_pca]
    if not record.get("measured", True):
        # a run without labels states its stage and why (training/unsupervised.py)
        stage = record["choice"] if record["choice"] in available else "fc7"
        return stage, f"fine stage {stage}, as recorded for this model ({record['reason']})"
    stage = choose(record["map_at_k"], record["coarse"], available)
    scores = ", ".join(f"{name} {value:.3f}" for name, value in record["map_at_k"].items())
    note = (f"fine stage {stage}, as recorded for this model (held-out mAP@"
            f"{record.get('k', '?')}: coarse {record['coarse']:.3f}, {scores})")
    if record["choice"] == "pca" and not has_pca:
        note += "; the record prefers pca, which needs a PCA store (python/compress.py)"
    return stage, note


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

    rerank: what the fine stage ranks by (FINE_STAGES, see search.choice):
    "fc7", "latent", "asymmetric", "pca" (the database's PCA store, compress.py; the best
    exact_top, default rerank.DEFAULT_EXACT_TOP, 0: none, ranked again by
    fc7), "none" (Hamming order, latent tie-break), "hamming"; "auto" (the
    default): the stage recorded for the model (rerank.json), else "pca"
    when the database has a PCA store, else "fc7" (decided when the database
    is opened: self.stage; self.auto_note says why, for "auto").
    self.reduced is the rerank.ReducedRows the search uses (None for fc7);
    self.class_names the model's class names (None: labels as numbers)."""

    def __init__(self, db_path, rerank="auto", exact_top=None):
        self.db_path = Path(db_path)
        store = FeatureStore.open(self.db_path)
        self._view = (store, None)   # (store, index): swapped whole by refresh
        self._retired = None         # the store a compaction replaced, closed next time
        if store.count == 0:
            store.close()
            raise UserError(f"{db_path} holds no images yet: run extract.py on a collection first")
        self._latent = None
        try:
            self.stage, self.auto_note = self._fine_stage(rerank, exact_top)
            if self.auto_note:
                log.info("%s", self.auto_note)
            self.class_names = read_class_names(record_folder(self.store.meta))
        except UserError:
            store.close()
            raise
        self._exact_top = (DEFAULT_EXACT_TOP if exact_top is None else int(exact_top)) \
            if self.stage == "pca" else None
        self._take_index(store)
        self._net = None

    @property
    def store(self):
        return self._view[0]

    @property
    def index(self):
        return self._view[1]

    def _take_index(self, store):
        """Search `store` with the index of its current revision from now on
        (index_time: when it was taken): the cached copy beside the database,
        else built (and cached when the folder is writable).  The index holds
        the live rows only (removed images are never candidates)."""
        start = time.monotonic()
        live = store.live_rows() if store.removed_count else None

        def codes():
            every = store.codes()
            return every if live is None else every[live]
        try:
            index, rebuilt = HashIndex.load_or_build(
                index_cache_path(self.db_path), store.revision(), codes, store.bits, ids=live)
        except OSError:  # a read-only folder: build in memory, do not cache
            index, rebuilt = HashIndex.build(codes(), store.bits, ids=live), True
        if rebuilt:
            log.info("built the search index of %d images (%d buckets) in %.1f s",
                     index.count, index.n_buckets, time.monotonic() - start)
        self._set_view(store, index)

    def refresh(self):
        """Take in what was appended to or removed from the database since
        it was opened (or last refreshed), and a compaction's new copy:
        True when a new index replaced the old one.

        The new index is built before it replaces the old one, and a search
        uses the store and index it started with, so searches running
        meanwhile answer from the previous state; every state is a whole
        number of committed batches and removals (see FeatureStore.refresh)."""
        store = self.store
        if store.replaced():
            fresh = FeatureStore.open(self.db_path)
            self._take_index(fresh)
            if self._retired is not None:
                self._retired.close()
            self._retired = store
            return True
        state = self._state
        if not store.refresh() and self.index.count == store.live_count:
            return False
        if (store.count, store.meta.get("compactions", 0)) == state[:2] \
                and store.removed_count > state[2]:
            # Only removals since: the index less those rows, no rebuild.
            gone = store.rows_of_ids(store.removed_ids(since=state[2]), live=False)
            index = self.index.without(gone)
            try:
                index.save(index_cache_path(self.db_path), store.revision())
            except OSError:
                pass     # a read-only folder: not cached
            self._set_view(store, index)
            return True
        self._take_index(store)
        return True

    def _set_view(self, store, index):
        """Search `store` with `index` from now on; _state: what of the store
        the index reflects (rows, compactions, removals)."""
        self._state = (store.count, store.meta.get("compactions", 0), store.removed_count)
        self._view, self.index_time = (store, index), time.time()

    @classmethod
    def on_milvus(cls, uri, collection):
        """A database loaded into Milvus (python/index_milvus.py), opened for
        search: the same answers, Milvus holding codes, re-rank vectors,
        paths and labels (milvus_index)."""
        from ..scale.milvus_index import MilvusCollection
        self = cls.__new__(cls)
        store = MilvusCollection(uri, collection)
        self._view, self._retired = (store, store.index), None
        self.db_path = store.path
        self._net = None
        self._exact_top = None   # re-ranked by the collection's vectors
        self.stage, self.auto_note, self._latent = "fc7", None, None
        self.class_names = read_class_names(record_folder(self.store.meta))
        log.info("searching %d images in Milvus (%s, %s)", self.store.count, self.store.path,
                 self.store.search_settings["index_type"])
        return self

    def _fine_stage(self, rerank, exact_top):
        """(the stage, for "auto" a note on how it was chosen); the store's
        PCA files are checked here, once."""
        if rerank not in FINE_STAGES:
            raise UserError(f"--rerank {rerank!r}: choose one of {', '.join(FINE_STAGES)}")
        if exact_top is not None and int(exact_top) < 0:
            raise UserError("--exact-top must be 0 or more")
        note = None
        has_pca = self.store.pca_record is not None
        if rerank == "auto":
            rerank, note = auto_stage(self.store.meta, has_pca)
        if rerank == "pca":
            self.store.projection()   # there and checked against the database
        return rerank, note

    def latent_rows(self, store=None):
        """Every row's latent activations (count, bits) float32 of `store`
        (default the current one), read once when a fine stage ranks by them
        (then only the rows a refresh adds; all again for a compaction's new
        store): 4 x bits bytes per image in memory (50,000 x 48 bits: 0.2-0.5 s)."""
        store = self.store if store is None else store
        cached_store, have = self._latent or (None, None)
        count = store.count
        if cached_store is not store or have is None or len(have) > count:
            have = store.latent(np.arange(count))
        elif len(have) < count:
            have = np.concatenate([have, store.latent(np.arange(len(have), count))])
        self._latent = (store, have)
        return have

    @property
    def reduced(self):
        """The rerank.ReducedRows the search ranks by (None: fc7), over the
        store's rows as they are now (a store that grew maps its new rows
        too)."""
        return self._reduced(self.store)

    def _reduced(self, store):
        if self.stage == "pca":
            return stage_rows("pca", projection=store.projection(), pca_rows=store.pca_rows(),
                              exact_top=self._exact_top)
        latent = self.latent_rows(store) if self.stage in LATENT_STAGES else None
        return stage_rows(self.stage, latent=latent)

    @property
    def rerank(self):
        """How the fine stage ranks: "fc7", "pca256", "pca256 + fc7 top 200"."""
        return describe(self.reduced)

    def close(self):
        self.store.close()
        if self._retired is not None:
            self._retired.close()

    # ---- the query's features ----------------------------------------------
    def load_model(self, deploy=None, weights=None, gpu=None):
        """The net that made the database (recorded in its metadata), unless
        another deploy/weights pair is given; either way it must match."""
        self._net = load_matching_model(self.store.meta, self.db_path, deploy, weights, gpu)
        return self._net

    def features_of_images(self, paths):
        """fc7 (Q, D), codes (Q, B) and latent (Q, bits) of query images."""
        if self._net is None:
            self.load_model()
        from ..images import BadImage
        try:
            fc7, latent, codes = self._net.features_of_paths(paths)
        except BadImage as err:
            raise UserError(f"cannot read query image {err.path}: {err.reason}") from None
        return fc7, codes, latent

    def features_of_ids(self, image_ids):
        """fc7 (Q, D) and codes (Q, B) of database images used as queries
        (UserError for an id the database does not hold, or has removed)."""
        store = self.store
        rows = store.rows_of_ids(np.asarray(image_ids, dtype=np.int64))
        return store.fc7(rows), store.code_rows(rows)

    def image_info(self, image_id):
        """The info record (path, label, ...) of a live image by id."""
        store = self.store
        return store.infos(store.rows_of_ids([int(image_id)]))[0]

    def id_queries(self, image_ids):
        """Database images as queries: (Query objects, codes, fc7); each
        query leaves its own image out of its results."""
        fc7, codes = self.features_of_ids(image_ids)
        infos = self.store.infos(self.store.rows_of_ids(image_ids))
        queries = [Query(f"id {i}: {info['path']}", label=int(info["label"]), path=info["path"],
                         exclude_id=int(i))
                   for i, info in zip(image_ids, infos)]
        return queries, codes, fc7

    # ---- search ------------------------------------------------------------
    def search(self, queries, codes, fc7, params=None, latent=None):
        """Answers for a batch of queries (Query objects) with their codes
        (Q, B) and fc7 (Q, D): HashIndex.search over the database's fc7 rows
        as params (a SearchParams; default SearchParams()) asks, then the
        results' paths, labels and class names.  A query with exclude_id
        gets top_k results besides that image.  latent (Q, bits): the
        queries' latent activations, which the latent and none stages rank
        by (read from the store for database images used as queries)."""
        params = SearchParams() if params is None else params
        k = params.top_k
        # One more for queries that leave their own image out (None: all).
        excluding = any(q.exclude_id is not None for q in queries)
        want = k + 1 if excluding and k is not None else k
        # One store, index (and PCA or latent rows) for the whole batch, even
        # when refresh() swaps them meanwhile.  The index answers rows;
        # results show ids (the same until a compaction, live.py).
        store, index = self._view
        reduced = self._reduced(store)
        if latent is None and reduced is not None and reduced.project is None \
                and reduced.rows is not None \
                and all(q.exclude_id is not None for q in queries):
            latent = store.latent(store.rows_of_ids([q.exclude_id for q in queries]))
        for query in queries:
            query.class_name = class_name(self.class_names, query.label)
        found = index.search(np.asarray(codes), np.asarray(fc7), store.fc7, want,
                             min_candidates=params.candidates, max_radius=params.max_radius,
                             reduced=reduced, query_reduced=latent)
        ranked_by = describe(reduced)      # one fine stage for the whole batch
        answers = []
        for i, query in enumerate(queries):
            result = found[i]
            result_ids = store.ids_of_rows(result.ids)
            keep = np.arange(len(result.ids)) if query.exclude_id is None else \
                np.flatnonzero(result_ids != query.exclude_id)
            keep = keep[:k]
            ids = result_ids[keep]
            infos = store.infos(result.ids[keep]) if len(keep) else []
            # Plain Python numbers, converted once per column (a top-1000
            # answer is built per request by serve.py).
            hits = [Hit(rank=r + 1, id=image_id, path=info["path"], label=int(info["label"]),
                        hamming=ham, l2=l2, exact=exact,
                        class_name=class_name(self.class_names, info["label"]))
                    for r, (image_id, info, ham, l2, exact) in enumerate(zip(
                        ids.tolist(), infos, result.hamming[keep].tolist(),
                        result.l2[keep].astype(np.float64).tolist(),
                        (keep < result.exact).tolist()))]
            answers.append(Answer(query, hits, candidates=result.candidates,
                                  radius=result.radius, search_ms=1000 * result.seconds,
                                  rerank=ranked_by))
        return answers
