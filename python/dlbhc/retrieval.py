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
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from .errors import UserError
from .index import HashIndex
from .store import FeatureStore, check_compatible


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
    rank: int
    id: int
    path: str
    label: int
    hamming: int
    l2: float


@dataclass
class Answer:
    query: Query
    hits: list
    candidates: int
    radius: int
    search_ms: float

    def as_dict(self):
        return {"query": self.query.name, "query_path": self.query.path or self.query.name,
                "query_label": self.query.label,
                "candidates": self.candidates, "radius": self.radius,
                "search_ms": round(self.search_ms, 3),
                "results": [h.__dict__ for h in self.hits]}


def check_search_parameters(top_k, candidates=None, max_radius=None, max_top_k=None,
                            max_candidates=None):
    """The rules of a search's parameters (retrieve.py's options, serve.py's
    API): UserError naming the first one broken."""
    def bounded(name, value, low, high):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{name} must be an integer (got {value!r})")
        if value < low or (high is not None and value > high):
            rule = f"at least {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{name} must be {rule} (got {value})")
    if top_k is None:
        raise UserError("top_k must be given")
    bounded("top_k", top_k, 1, max_top_k)
    bounded("candidates", candidates, 1, max_candidates)
    bounded("max_radius", max_radius, 0, None)


def load_matching_model(meta, db_path, deploy=None, weights=None, gpu=None):
    """A HashNet for queries of the database whose metadata is `meta`: the
    deploy/weights it records, unless others are given; either way they
    must match it (bits, fc7, preprocessing, and the weights' sha1)."""
    from .model import HashNet
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
    """A database opened for search, with its index in memory."""

    def __init__(self, db_path, log=sys.stderr):
        self.db_path = Path(db_path)
        self.log = log
        self.store = FeatureStore.open(self.db_path)
        if self.store.count == 0:
            raise UserError(f"{db_path} holds no images yet: run extract.py on a collection first")
        self.index = self._load_index()
        self.index_time = time.time()
        self._net = None

    def _load_index(self):
        """The index of the store's current revision: the cached copy beside
        the database, else built (and cached when the folder is writable)."""
        start = time.monotonic()
        try:
            index, rebuilt = HashIndex.load_or_build(
                index_cache_path(self.db_path), self.store.revision(),
                self.store.codes, self.store.bits)
        except OSError:  # a read-only folder: build in memory, do not cache
            index, rebuilt = HashIndex.build(self.store.codes(), self.store.bits), True
        if rebuilt:
            print(f"built the search index of {index.count} images "
                  f"({index.n_buckets} buckets) in {time.monotonic() - start:.1f} s",
                  file=self.log)
        return index

    def refresh(self):
        """Take in what was appended to the database since it was opened
        (or last refreshed): True when a new index replaced the old one.

        The new index is built before it replaces the old one, and a search
        uses the index it started with, so searches running meanwhile answer
        from the previous state; every state is a whole number of committed
        batches (see FeatureStore.refresh)."""
        if not self.store.refresh() and self.index.count == self.store.count:
            return False
        self.index = self._load_index()
        self.index_time = time.time()
        return True

    @classmethod
    def on_milvus(cls, uri, collection, log=sys.stderr):
        """A database loaded into Milvus (python/index_milvus.py), opened for
        search: the same answers, Milvus holding codes, re-rank vectors,
        paths and labels (milvus_index)."""
        from .milvus_index import MilvusCollection
        self = cls.__new__(cls)
        self.store = MilvusCollection(uri, collection)
        self.db_path = self.store.path
        self.index = self.store.index
        self._net = None
        print(f"searching {self.store.count} images in Milvus ({self.store.path}, "
              f"{self.store.search_settings['index_type']})", file=log)
        return self

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
        from .images import BadImage
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
    def search(self, queries, codes, fc7, k=10, candidates=None, max_radius=None):
        """Answers for a batch of queries (Query objects) with their codes
        (Q, B) and fc7 (Q, D): HashIndex.search over the database's fc7 rows,
        then the results' paths and labels.  A query with exclude_id gets
        k results besides that image."""
        want = k + (1 if any(q.exclude_id is not None for q in queries) else 0)
        # One index for the whole batch, even when refresh() swaps it meanwhile.
        index = self.index
        found = index.search(np.asarray(codes), np.asarray(fc7), self.store.fc7, want,
                                  min_candidates=candidates, max_radius=max_radius)
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
                        hamming=ham, l2=l2)
                    for r, (image_id, info, ham, l2) in enumerate(zip(
                        ids.tolist(), infos, result.hamming[keep].tolist(),
                        result.l2[keep].astype(np.float64).tolist()))]
            answers.append(Answer(query, hits, candidates=result.candidates,
                                  radius=result.radius, search_ms=1000 * result.seconds))
        return answers


# ---- showing results ---------------------------------------------------------

def format_table(answer, shown=10):
    query = answer.query
    lines = [f"query {query.name}" + (f" (label {query.label})" if query.label >= 0 else ""),
             f"{answer.candidates} candidates within Hamming radius {answer.radius}, "
             f"search {answer.search_ms:.2f} ms",
             f"{'rank':>4}  {'id':>8}  {'ham':>3}  {'L2':>9}  {'label':>5}  path"]
    for hit in answer.hits[:shown]:
        lines.append(f"{hit.rank:>4}  {hit.id:>8}  {hit.hamming:>3}  {hit.l2:>9.3f}  "
                     f"{hit.label:>5}  {hit.path}")
    if len(answer.hits) > shown:
        lines.append(f"... {len(answer.hits) - shown} more (--show N, or --json for all)")
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .images import BadImage, read_image

    hits = answer.hits[:shown]
    cols = len(hits) + 1
    fig, axes = plt.subplots(1, cols, figsize=(MONTAGE_TILE_INCHES * cols, MONTAGE_TILE_INCHES + 0.5),
                             dpi=MONTAGE_DPI, squeeze=False)
    tiles = [("query", answer.query.path or answer.query.name, None)] + \
        [(f"#{h.rank} H{h.hamming} L2 {h.l2:.1f}", h.path, h.label) for h in hits]
    for ax, (title, path, label) in zip(axes[0], tiles):
        try:
            img = read_image(path)
        except (BadImage, OSError):
            img = np.full((8, 8, 3), 200, dtype=np.uint8)
            title += " (unreadable)"
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if label is not None and answer.query.label >= 0 and label >= 0:
            color = "tab:green" if label == answer.query.label else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
    fig.savefig(out_path, dpi=MONTAGE_DPI)
    plt.close(fig)
    return Path(out_path)
