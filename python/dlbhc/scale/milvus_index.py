"""The index on Milvus: a feature database's codes, re-rank vectors, paths
and labels in a Milvus server or cluster, and the coarse-to-fine search
answered there.

    python python/index_milvus.py DB --uri http://HOST:19530 [--collection NAME]
    python python/retrieve.py query.jpg --milvus http://HOST:19530 --collection NAME

A thin adapter: the search rule is index.py's and the ranking rerank.py's;
Milvus stands in for the bucket table (coarse stage) and for the fc7 file
(the candidates' re-rank vectors).  pymilvus is imported only when a
function here talks to a server.  Removed images (store.live) are never
loaded; a rerun of the load deletes those removed since (_delete_removed).

Two collections per database (Milvus 2.3, which the PyPI `milvus` server
runs, allows one vector field per collection):
    NAME         id (INT64, the database's image id), code (BINARY_VECTOR of
                 8 * code_bytes bits, HAMMING; BIN_FLAT or BIN_IVF_FLAT),
                 label (INT64), path (VARCHAR); the database's metadata and
                 the index settings are the collection's properties.
    NAME_rerank  id, vector (FLOAT_VECTOR, the re-rank rows: fc7 as stored,
                 float16 widened exactly to float32).

Search, for a batch of queries (MilvusIndex.search, the same call and
answer as HashIndex.search):
    coarse   a Hamming top-N search with N = min_candidates gives the radius
             R (the N-th distance, capped by max_radius): the smallest
             radius holding N images, as the local index's rule; then a range
             search fetches every image within R, the whole boundary shell
             (split by id ranges when it holds more than Milvus's top-k cap).
    fine     the candidates' re-rank vectors are fetched and ranked by
             results.fine_stage: squared L2 in float32, ties by id.
Its defaults and radius clamp are search.params's, as the local index's are.
With an exact Milvus index (BIN_FLAT, or BIN_IVF_FLAT searched with nprobe =
nlist) the candidate set is exactly the local index's and the ranking is the
same code, so results equal HashIndex.search's, ties included (by id).  With
BIN_IVF_FLAT and a smaller nprobe, Milvus may miss near codes: recall < 1.
"""
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..search.codes import code_bytes
from ..errors import UserError
from ..search.index import check_queries
from ..search.params import coarse_target, radius_limit
from ..search.results import CoarseResult, SearchResults, fine_stage, sorted_by_hamming
from ..store.database import MetaFields

# Milvus refuses a top-k (and a range search's limit) above this.
TOPK_CAP = 16384
META_PROPERTY = "dlbhc.meta"
COUNT_PROPERTY = "dlbhc.count"          # set when a load has finished
ID_TOP_PROPERTY = "dlbhc.id_top"        # every id is below it (ids have gaps)
DELETED_PROPERTY = "dlbhc.deleted"      # the database's removals applied here
SEARCH_PROPERTY = "dlbhc.search"        # index type and search params
RERANK_SUFFIX = "_rerank"
INDEX_TYPES = ("BIN_FLAT", "BIN_IVF_FLAT")
MAX_PATH = 65535                        # Milvus's VARCHAR limit
CONNECT_SECONDS = 10.0
# Searches read at Milvus's "Bounded" consistency: a collection loaded by
# load_database is static, and "Strong" would wait for the next time tick
# (~0.2-0.4 s a call measured here); the loader declares a load finished
# only once a Bounded read sees every row.
SEARCH_CONSISTENCY = "Bounded"
# Rows per insert and per vector fetch: ~16 MB of re-rank vectors each.
BATCH_BYTES = 16 << 20
MAX_FETCH_IDS = 4096


def collection_name(db_path):
    """A Milvus collection name from a database folder (letters, digits, _)."""
    stem = Path(db_path).name
    for suffix in (".lmdb", ".leveldb"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    return name if re.match(r"[A-Za-z_]", name) else "db_" + name


def check_uri(uri):
    """Refuse what cannot be a Milvus server's address, and an address
    nothing answers on, with what to do (pymilvus would wait or talk of
    gRPC)."""
    if not uri:
        raise UserError("no Milvus URI given: pass the server's address, e.g. "
                        "http://localhost:19530")
    parsed = urlparse(uri if "://" in uri else f"http://{uri}")
    if parsed.scheme not in ("http", "https", "tcp", "grpc") or not parsed.hostname:
        raise UserError(f"{uri!r} is not a Milvus server address (http://HOST:PORT). A file "
                        "name would mean Milvus Lite, which cannot hold the binary codes "
                        "(no BINARY_VECTOR fields): start a Milvus server instead "
                        "(see README, 'Milvus')")
    port = parsed.port or 19530
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise UserError(f"cannot reach a Milvus server at {uri} ({err}): start one (README, "
                        "'Milvus': their docker compose file, or `milvus-server` from the "
                        "PyPI package milvus) or check the address") from None


def connect(uri):
    """A pymilvus MilvusClient for `uri`, or a UserError saying what is wrong."""
    check_uri(uri)
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("Milvus needs the `pymilvus` package: pip install -r requirements.txt "
                        "(or `make venv`)") from None
    try:
        return MilvusClient(uri=uri if "://" in uri else f"http://{uri}",
                            timeout=CONNECT_SECONDS)
    except Exception as err:    # pymilvus raises MilvusException and plain errors
        raise UserError(f"{uri} answered, but not as a Milvus server: "
                        f"{type(err).__name__}: {err}") from None


def _properties(client, name):
    return client.describe_collection(name).get("properties", {}) or {}


# ---- loading a database ------------------------------------------------------

def load_database(store, uri, name, index_type="BIN_FLAT", nlist=1024, nprobe=None,
                  replace=False, progress=None):
    """Put FeatureStore `store` into collections NAME and NAME_rerank at
    `uri`.  Resumable: a rerun loads what is missing (the ids past what each
    collection holds: every insert is one whole batch); a collection of
    another database is refused unless replace=True.  Returns the number of
    images loaded by this call."""
    from pymilvus import DataType, MilvusClient
    if index_type not in INDEX_TYPES:
        raise UserError(f"index type {index_type}: use one of {', '.join(INDEX_TYPES)}")
    if nlist < 1 or (nprobe is not None and not 1 <= nprobe <= nlist):
        raise UserError("--nlist must be >= 1 and --nprobe between 1 and --nlist")
    client = connect(uri)
    rerank = name + RERANK_SUFFIX
    meta = {k: v for k, v in store.meta.items()
            if k not in ("count", "removed", "id_map", "compactions", "compacted")}
    search = {"index_type": index_type, "metric_type": "HAMMING",
              "params": {"nprobe": nprobe or nlist} if index_type == "BIN_IVF_FLAT" else {}}
    try:
        if replace:
            for coll in (name, rerank):
                if client.has_collection(coll):
                    client.drop_collection(coll)
        if client.has_collection(name):
            props = _properties(client, name)
            theirs = json.loads(props.get(META_PROPERTY, "{}"))
            if (theirs.get("created"), theirs.get("model")) != (meta.get("created"),
                                                                 meta.get("model")):
                raise UserError(
                    f"collection {name} at {uri} holds another database "
                    f"({theirs.get('created')}, {theirs.get('model', {}).get('weights')}): "
                    "pass --replace to drop it, or --collection NEW")
        else:
            _create(client, DataType, MilvusClient, name, rerank, store, meta, search,
                    index_type, nlist)
        client.load_collection(name)
        codes_have = _row_count(client, name)
        if client.has_collection(rerank):
            client.load_collection(rerank)
            vectors_have = _row_count(client, rerank)
        else:
            vectors_have = 0
            _create_rerank(client, DataType, MilvusClient, rerank, store.fc7_dim)
        client.alter_collection_properties(name, properties={COUNT_PROPERTY: "-1"})
        if _delete_removed(client, store, name, rerank):
            codes_have, vectors_have = _row_count(client, name), _row_count(client, rerank)
        loaded = _insert_rows(client, store, name, rerank, codes_have, vectors_have,
                              progress)
        live = store.live_count
        for coll in (name, rerank):
            client.flush(coll)
            client.load_collection(coll)
            _wait_visible(client, coll, live)
        client.alter_collection_properties(name, properties={
            COUNT_PROPERTY: str(live), ID_TOP_PROPERTY: str(store.next_id)})
        return loaded
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"Milvus at {uri} refused the load: {type(err).__name__}: {err}") \
            from None
    finally:
        client.close()


def _create(client, DataType, MilvusClient, name, rerank, store, meta, search, index_type,
            nlist):
    schema = MilvusClient.create_schema(auto_id=False,
                                        description="dlbhc binary hash codes")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=8 * code_bytes(store.bits))
    schema.add_field("label", DataType.INT64)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    params = client.prepare_index_params()
    params.add_index("code", index_type=index_type, metric_type="HAMMING",
                     params={"nlist": nlist} if index_type == "BIN_IVF_FLAT" else {})
    client.create_collection(name, schema=schema, index_params=params,
                             consistency_level="Strong")
    client.alter_collection_properties(name, properties={
        META_PROPERTY: json.dumps(meta, sort_keys=True),
        SEARCH_PROPERTY: json.dumps(search, sort_keys=True)})
    if client.has_collection(rerank):
        client.drop_collection(rerank)     # left by a replaced database


def _create_rerank(client, DataType, MilvusClient, rerank, dim):
    schema = MilvusClient.create_schema(auto_id=False, description="dlbhc re-rank vectors")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    # Searched by id only (the fine stage is computed here), but Milvus
    # loads a collection only with an index on its vector field.
    params = client.prepare_index_params()
    params.add_index("vector", index_type="FLAT", metric_type="L2")
    client.create_collection(rerank, schema=schema, index_params=params,
                             consistency_level="Strong")


def _row_count(client, name, consistency="Strong"):
    """Rows of a loaded collection, as a query at `consistency` sees them."""
    rows = client.query(name, filter="", output_fields=["count(*)"],
                        consistency_level=consistency)
    return int(rows[0]["count(*)"])


def _wait_visible(client, name, count, seconds=120):
    """Wait until searches at SEARCH_CONSISTENCY see all `count` rows: the
    load is declared finished only then, so a search right after it finds
    everything."""
    deadline = time.monotonic() + seconds
    while _row_count(client, name, SEARCH_CONSISTENCY) < count:
        if time.monotonic() > deadline:
            raise UserError(f"Milvus still shows fewer than {count} rows in {name} "
                            f"{seconds} s after the load: rerun index_milvus.py")
        time.sleep(0.5)


def _delete_removed(client, store, name, rerank):
    """Delete (idempotent) from both collections the ids removed since the
    last load (DELETED_PROPERTY: the removals applied; after a compaction,
    every id below next_id not live); True when some were deleted."""
    done = json.loads(_properties(client, name).get(DELETED_PROPERTY, "null") or "null")
    now = {"compactions": int(store.meta.get("compactions", 0)), "removed": store.removed_count}
    if done == now:
        return False
    if done is None and _row_count(client, name) == 0:
        dead = np.empty(0, np.int64)         # a new collection: nothing loaded yet
    elif done is not None and done["compactions"] == now["compactions"]:
        dead = store.removed_ids(since=done["removed"])
    else:
        dead = np.setdiff1d(np.arange(store.next_id), store.live_ids())
    for lo in range(0, len(dead), MAX_FETCH_IDS):
        part = dead[lo:lo + MAX_FETCH_IDS].tolist()
        for coll in (name, rerank):
            client.delete(coll, ids=part)
    client.alter_collection_properties(name, properties={DELETED_PROPERTY: json.dumps(now)})
    return len(dead) > 0


def _insert_rows(client, store, name, rerank, codes_from, vectors_from, progress):
    """Insert the live rows codes_from.. (counted among the live rows) into
    NAME and vectors_from.. into NAME_rerank, with their ids, in batches of
    whole rows (an insert is all or nothing)."""
    live = store.live_rows()
    n = len(live)
    batch = max(1, min(TOPK_CAP, BATCH_BYTES // max(1, store.fc7_dim * 4)))
    start = min(codes_from, vectors_from)
    for lo in range(start, n, batch):
        hi = min(n, lo + batch)
        if hi > codes_from:
            part = live[max(lo, codes_from):hi]
            ids = store.ids_of_rows(part)
            codes = store.code_rows(part)
            rows = []
            for i, code, info in zip(ids, codes, store.infos(part)):
                if len(info["path"].encode()) > MAX_PATH:
                    raise UserError(f"image {i}: its path is longer than Milvus's "
                                    f"{MAX_PATH}-byte limit: {info['path'][:80]}...")
                rows.append({"id": int(i), "code": code.tobytes(), "label": int(info["label"]),
                             "path": info["path"]})
            client.insert(name, rows)
        if hi > vectors_from:
            part = live[max(lo, vectors_from):hi]
            vectors = np.asarray(store.fc7_rows()[part], dtype=np.float32)
            client.insert(rerank, [{"id": int(i), "vector": v}
                                   for i, v in zip(store.ids_of_rows(part), vectors)])
        if progress is not None:
            progress.update(hi - lo)
    return n - start


# ---- searching ---------------------------------------------------------------

class MilvusCollection(MetaFields):
    """A database loaded into Milvus, opened for queries: what retrieval's
    Retriever reads from a FeatureStore (meta, count, bits, infos, fc7,
    code_rows), answered by Milvus, and `index`, its MilvusIndex."""

    def __init__(self, uri, name):
        self.uri, self.name = uri, name
        self.path = f"{uri} collection {name}"      # how messages name it
        self.client = connect(uri)
        try:
            if not self.client.has_collection(name):
                found = [c for c in self.client.list_collections()
                         if not c.endswith(RERANK_SUFFIX)]
                raise UserError(f"Milvus at {uri} has no collection {name!r} (it has: "
                                f"{', '.join(sorted(found)) or 'none'}); load a database with "
                                f"`python python/index_milvus.py DB --uri {uri} "
                                f"--collection {name}`")
            props = _properties(self.client, name)
            count = int(props.get(COUNT_PROPERTY, "-1"))
            if count < 0 or META_PROPERTY not in props:
                raise UserError(f"collection {name} at {uri} is not completely loaded (an "
                                "interrupted index_milvus.py?): rerun it to finish")
            self.meta = dict(json.loads(props[META_PROPERTY]), count=count)
            self.id_top = int(props.get(ID_TOP_PROPERTY, count))
            self.search_settings = json.loads(props[SEARCH_PROPERTY])
            self.rerank = name + RERANK_SUFFIX
            for coll in (name, self.rerank):
                self.client.load_collection(coll)
        except UserError:
            self.client.close()
            raise
        self.index = MilvusIndex(self)

    def close(self):
        self.client.close()

    def _check_ids(self, ids):
        if len(ids) and (ids.min() < 0 or ids.max() >= self.id_top):
            raise UserError(f"image id out of range: the collection holds ids "
                            f"below {self.id_top}")

    def ids_of_rows(self, rows):    # primary keys are the database's ids: rows are ids
        return np.asarray(rows, dtype=np.int64)

    def rows_of_ids(self, ids, live=True):
        self._check_ids(ids := np.asarray(ids, dtype=np.int64).ravel())
        return ids

    def _rows(self, collection, ids, fields, **kw):
        """Records of `ids` (in the order of ids) from one collection."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._check_ids(ids)
        unique = np.unique(ids)
        found = {}
        for lo in range(0, len(unique), MAX_FETCH_IDS):
            part = unique[lo:lo + MAX_FETCH_IDS].tolist()
            for row in self.client.query(collection, filter=f"id in {part}",
                                         output_fields=["id", *fields],
                                         consistency_level=SEARCH_CONSISTENCY, **kw):
                found[int(row["id"])] = row
        missing = [int(i) for i in unique if int(i) not in found]
        if missing:
            raise UserError(f"{self.path}: ids {missing[:5]} are not in {collection} (removed "
                            "images, or a load to finish with index_milvus.py)")
        return [found[int(i)] for i in ids]

    def fc7(self, ids):
        """Re-rank vectors of ids, float32 (len(ids), fc7_dim)."""
        if len(ids) == 0:
            return np.empty((0, self.fc7_dim), dtype=np.float32)
        rows = self._rows(self.rerank, ids, ["vector"], strict_float32=True)
        return np.stack([np.asarray(r["vector"], dtype=np.float32) for r in rows])

    def code_rows(self, ids):
        rows = self._rows(self.name, ids, ["code"])
        out = np.empty((len(rows), code_bytes(self.bits)), dtype=np.uint8)
        for j, row in enumerate(rows):
            code = row["code"]
            out[j] = np.frombuffer(code[0] if isinstance(code, list) else code, dtype=np.uint8)
        return out

    def infos(self, ids):
        return [{"path": r["path"], "label": int(r["label"])}
                for r in self._rows(self.name, ids, ["path", "label"])]


class MilvusIndex:
    """HashIndex.search's contract, answered by Milvus (module docstring)."""

    def __init__(self, collection):
        self.collection = collection
        self.client, self.name = collection.client, collection.name
        self.bits = collection.bits
        self.count = collection.count
        self.id_top = collection.id_top
        settings = collection.search_settings
        self.params = {"metric_type": "HAMMING", "params": dict(settings.get("params", {}))}

    def _search(self, codes, limit, radius=None, range_filter=None, id_range=None):
        params = {"metric_type": "HAMMING", "params": dict(self.params["params"])}
        if radius is not None:
            params["params"]["radius"] = radius
            if range_filter is not None:
                params["params"]["range_filter"] = range_filter
        expr = "" if id_range is None else f"id >= {id_range[0]} and id < {id_range[1]}"
        hits = self.client.search(self.name, data=[c.tobytes() for c in codes],
                                  anns_field="code", limit=limit, filter=expr,
                                  search_params=params, output_fields=[],
                                  consistency_level=SEARCH_CONSISTENCY)
        return [(np.array([h["id"] for h in q], dtype=np.int64),
                 np.array([h["distance"] for h in q], dtype=np.float64).round().astype(np.int32))
                for q in hits]

    def _within(self, code, lo, hi, id_range=None):
        """Every image at Hamming distance lo <= d <= hi: range searches,
        split by id ranges while one holds Milvus's cap of results."""
        id_range = id_range or (0, self.id_top)
        ids, dist = self._search([code], TOPK_CAP, radius=hi + 1,
                                 range_filter=lo if lo > 0 else None, id_range=id_range)[0]
        if len(ids) < TOPK_CAP or id_range[1] - id_range[0] <= 1:
            return ids, dist
        mid = (id_range[0] + id_range[1]) // 2
        a = self._within(code, lo, hi, (id_range[0], mid))
        b = self._within(code, lo, hi, (mid, id_range[1]))
        return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    def coarse_many(self, codes, min_candidates, max_radius=None):
        """CoarseResults of a batch of query codes: the local index's rule
        (smallest radius holding min_candidates images, whole last shell)."""
        limit = radius_limit(max_radius, self.bits)
        need = max(0, int(min_candidates))
        results = []
        if need == 0 or self.count == 0:
            first = [None] * len(codes)
        else:
            # Twice the N nearest: when the last of them lies beyond the N-th
            # distance R, they hold the whole shell R and no range search is
            # needed (BIN_FLAT's top-L are exactly the L nearest).
            top = min(need, TOPK_CAP, self.count)
            first = self._search(codes, min(TOPK_CAP, self.count, 2 * top))
        for code, hits in zip(codes, first):
            if hits is None:
                radius = 0
                ids, dist = self._within(code, 0, 0) if self.count else (
                    np.empty(0, np.int64), np.empty(0, np.int32))
            else:
                ids, dist = hits
                order = np.argsort(dist, kind="stable")
                ids, dist = ids[order], dist[order]
                if len(ids) < min(top, self.count):
                    raise UserError(f"{self.collection.path}: Milvus returned {len(ids)} of "
                                    f"the {top} nearest codes of {self.count} images: the "
                                    "index is not exact (BIN_IVF_FLAT with nprobe < nlist?)")
                radius = limit if need > self.count else min(int(dist[top - 1]), limit)
                complete = len(ids) == self.count or dist[-1] > radius
                if complete:
                    keep = dist <= radius
                    ids, dist = ids[keep], dist[keep]
                else:
                    ids, dist = self._within(code, 0, radius)
                if need > TOPK_CAP:
                    # N beyond Milvus's top-k: grow shell by shell, as the
                    # local index does.
                    while len(ids) < need and radius < limit:
                        radius += 1
                        more = self._within(code, radius, radius)
                        ids = np.concatenate([ids, more[0]])
                        dist = np.concatenate([dist, more[1]])
            results.append(CoarseResult(*sorted_by_hamming(ids, dist), int(radius)))
        return results

    def search(self, query_codes, query_fc7, fc7, k, min_candidates=None, max_radius=None,
               reduced=None, query_reduced=None):
        """Coarse stage on Milvus, fine stage by results.fine_stage over the
        candidates' re-rank vectors; fc7 is a function ids -> rows
        (MilvusCollection.fc7), fetched once for all queries' candidates.
        Returns SearchResults; seconds: each query's share of the batch's
        coarse time plus its fine stage.  (HashIndex.search's signature;
        `reduced` must be None, so query_reduced is unused: the collection
        holds one kind of re-rank vectors, the ones index_milvus.py loaded.)"""
        if reduced is not None:
            raise ValueError("a Milvus collection re-ranks by the vectors it holds: no reduced rows")
        query_codes, query_fc7 = check_queries(query_codes, query_fc7, self.bits, k)
        if len(query_codes) == 0:
            return SearchResults.from_ranked([], k)
        start = time.perf_counter()
        coarse = self.coarse_many(query_codes, coarse_target(k, min_candidates), max_radius)
        every = np.unique(np.concatenate([c.ids for c in coarse]))
        rows = fc7(every) if callable(fc7) else np.asarray(fc7[every], dtype=np.float32)
        shared = (time.perf_counter() - start) / len(coarse)

        def lookup(ids):
            return rows[np.searchsorted(every, ids)]

        ranked = []
        for result, q_fc7 in zip(coarse, query_fc7):
            t = time.perf_counter()
            ranked.append(fine_stage(result, q_fc7, lookup, k)
                          + (shared + time.perf_counter() - t,))
        return SearchResults.from_ranked(ranked, k)
