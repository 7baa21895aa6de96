"""The bucket table over binary codes and coarse-to-fine search, batched.

Numpy and the project's own C scan (codes.HammingBall): this module never
imports caffe, the feature store or faiss, so search can be tested and
benchmarked without a net or a database.  The code format (packing, width,
Hamming distance) is codes.py's; the fc7 distance and its tie rule are
rerank.py's.

Search (the paper's coarse-to-fine retrieval), HashIndex.search(query_codes,
query_fc7, fc7, k) for a batch of queries, like faiss's search(xq, k):
    coarse   all images within the smallest Hamming radius R that holds at
             least ``min_candidates`` images (R capped by ``max_radius``).
             The whole shell at distance R is always included, so images tied
             at the boundary are never cut by their position in the database.
    fine     the coarse candidates re-ranked by the Euclidean distance of
             their fc7 features to the query's fc7; top k returned (or every
             candidate, ranked, with k=None: the evaluation's full ranking).
             With reduced= (rerank.ReducedRows: the database's PCA store),
             ranked by the compressed rows instead, the best exact_top of
             them again by fc7 (rerank.fine_rank).
retrieve.py, the evaluation (metrics.evaluate) and the benchmarks all call
this one implementation.

Ordering rules (the brute-force functions of reference.py follow the same
rules, so the fast path can be compared with them exactly)
    coarse   by (Hamming distance, image id).
    fine     by (squared fc7 distance, image id): rerank.fc7_sq_distances.

How the coarse stage avoids scanning everything
    Images with identical codes share a bucket: the table keeps the U unique
    codes and, per bucket, the ascending ids of its images (CSR layout).  Two
    exact strategies find the buckets within a radius r:

    probe  enumerate every code at distance exactly 0, 1, 2, ... from the
           query (C(bits, r) flip patterns) and look each up in a hash table
           of the unique codes.  Cheap when C(bits, r) is small.
    scan   compute the Hamming distance of the query to unique codes, with
           pivots to skip most of them (pivots.py: each pivot's group of
           buckets contributes one contiguous run per radius).  When the
           runs cover most buckets anyway a plain scan of all unique codes
           is used instead: one call of a C kernel (codes.HammingBall) that
           reads every code once, applies the stopping rule as it goes and
           returns the ball sorted by (distance, position).  A small index
           (whose whole scan costs less than the runs' bookkeeping) is
           scanned that way directly, one row per image when images do not
           outnumber unique codes twice (the matches are then the images,
           already in (hamming, id) order), after a sample of its rows has
           said whether the few shells worth probing likely hold the ball.

    Which one runs is decided per query by a cost model whose unit costs were
    measured (see _COST_NS).
"""
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codes import (HammingBall, check_codes, code_bytes, code_words, distance_dtype,
                    group_equal_codes, query_bytes, to_words)
from ..files import atomic_write
from .pivots import PivotTable, first_true, pivot_layout
from .rerank import fine_rank

FORMAT_VERSION = 1

# --- cost model -------------------------------------------------------------
# Unit costs of the coarse stage, in nanoseconds, by code width in 64-bit
# words, measured with `python benchmarks/bench_search.py --calibrate --sizes
# 1000000 --bits 48,128,256` (clustered synthetic codes, U ~ 0.7-0.8M unique)
# on the project's 2-core build machine with nothing else running, numpy 2.4,
# after the exhaustive scan moved to the project's own C kernel
# (csrc/hamming_ball.c).  Only their ratios matter: they decide which exact
# strategy runs, never what it returns.
#   probe   one enumerated flip pattern: XOR, hash (codes over 64 bits),
#           binary search among the unique codes, verify
#   gather  one unique code reached through the pivot runs: gather, XOR,
#           popcount, histogram
#   scan    one unique code in the exhaustive scan (the C pass, the stopping
#           rule, the selection and expansion of the ball, per unique code,
#           for a 1000-candidate search)
#   step    fixed overhead of one growing step of the pivot-run scan
# Other widths interpolate (and beyond 4 words keep the 4-word figures).
_COST_WORDS = (1, 2, 4)
_COST_NS = {"probe": (62.0, 215.5, 225.7),
            "gather": (7.3, 12.5, 17.5),
            "scan": (0.8, 1.1, 1.8),
            "step": (59.5e3, 72.1e3, 108.8e3)}
# Searching through the pivot runs costs several growing steps plus the
# bounds search that sizes them, and more than the unit costs say with
# caches cold between queries (as in a service, or bench_search's shuffled
# methods).  Measured that way, quiet, per query at 48 / 128 bits: at 1M
# codes the runs took 1.08 / 1.28 ms where one C scan took 0.79 / 0.91; at
# 2.5M the runs 0.92 / 1.39 ms, the scan 1.45 / 1.98.  The crossover lies
# between 9-15 and 20-28 steps' worth: when a scan of every unique code
# costs less than this many steps, the runs are not even considered.
RUNS_OVERHEAD_STEPS = 16


def _unit_costs(n_words):
    return {name: float(np.interp(n_words, _COST_WORDS, values))
            for name, values in _COST_NS.items()}


# Enumerating a shell costs memory for its flip masks; beyond this many
# patterns a scan is always cheaper anyway.
MAX_SHELL_PROBES = 1 << 18
# A small index decides between probing shells and scanning every code from
# the distances of this many images, a fixed sample (the radius it suggests).
RADIUS_SAMPLE = 2048

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def default_min_candidates(k):
    """Coarse candidates gathered for a top-k fine search: 2 * k.

    The fine stage can only return what the coarse stage found.  Gathering
    twice k lets fc7 promote images from just beyond the k-th Hamming rank
    (the paper's reason for re-ranking), while the re-rank cost (one fc7 read
    per candidate) stays proportional to k.  The whole boundary shell is
    added on top, so the actual pool is often larger.
    """
    return 2 * int(k)


def shell_radius(cum_counts, min_candidates, max_radius=None):
    """The coarse stage's stopping rule.

    cum_counts[..., r] = number of images within Hamming radius r (r = 0..bits).
    Returns the smallest r with cum_counts[r] >= min_candidates, or
    min(max_radius, bits) when no radius up to it gathers enough.
    """
    cum_counts = np.asarray(cum_counts)
    top = cum_counts.shape[-1] - 1
    limit = top if max_radius is None else max(0, min(int(max_radius), top))
    if cum_counts.ndim == 1:
        # One query (the search's case): counts never decrease with r.
        return min(int(np.searchsorted(cum_counts[:limit + 1], min_candidates)), limit)
    enough = cum_counts[..., :limit + 1] >= min_candidates
    first = np.argmax(enough, axis=-1)
    return np.where(enough.any(axis=-1), first, limit)


def _concat_ranges(starts, stops):
    """Concatenation of arange(starts[i], stops[i]) for all i (vectorised)."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(stops, dtype=np.int64) - starts
    keep = lengths > 0
    if not keep.all():
        starts, lengths = starts[keep], lengths[keep]
    if not len(lengths):
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    # Position i of range j is (ends[j] - lengths[j]) + offset; shift maps it
    # to starts[j] + offset.
    shift = starts - (ends - lengths)
    return np.arange(ends[-1], dtype=np.int64) + np.repeat(shift, lengths)


def _flip_masks(bits, r, n_words):
    """All codes with exactly r of the first `bits` bits set, as (W, C(bits, r)) words."""
    combos = np.arange(bits, dtype=np.int64)[:, None]
    for _ in range(r - 1):
        # Extend each combination by every position after its last one.
        last = combos[:, -1]
        counts = bits - 1 - last
        base = np.repeat(combos, counts, axis=0)
        starts = np.repeat(last + 1, counts)
        within = np.arange(len(base)) - np.repeat(np.cumsum(counts) - counts, counts)
        combos = np.column_stack([base, starts + within])
    n = len(combos)
    masks = np.zeros((n, 8 * n_words), dtype=np.uint8)
    rows = np.repeat(np.arange(n), r)
    flat = combos.ravel()
    np.bitwise_or.at(masks, (rows, flat // 8), (1 << (7 - flat % 8)).astype(np.uint8))
    words = masks.view(np.uint64).reshape(n, n_words)
    return tuple(np.ascontiguousarray(words[:, j]) for j in range(n_words))


def _mix64(x):
    """splitmix64's finaliser: a bijection on uint64 with full avalanche (in place)."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


_U64 = (1 << 64) - 1
# Sort keys of the coarse result: (hamming << _ID_BITS) | id in an int64
# (ids below 2**40, distances up to MAX_BITS = 1024 < 2**23).
_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


def _mix_int(x):
    """_mix64 for one Python int."""
    x ^= x >> 30
    x = (x * int(_MIX1)) & _U64
    x ^= x >> 27
    x = (x * int(_MIX2)) & _U64
    return x ^ (x >> 31)


def _hash_int(words, seed):
    """_hash_words for one code given as Python ints (same keys)."""
    h = seed
    for w in words:
        h ^= _mix_int((w + int(_HASH_MULT)) & _U64)
        h = _mix_int(h)
    return h


def _hash_words(columns, seed):
    """64-bit keys for multi-word codes (single-word codes are their own key).

    Collisions between distinct codes are possible in principle; build()
    checks the table for them and picks another seed, and lookups confirm
    the full code, so a collision can cost time but never a wrong answer.
    """
    if len(columns) == 1:
        return columns[0]
    if len(columns[0]) == 1:
        # One probe (the query's own bucket): Python ints avoid ~20 numpy
        # calls of fixed overhead each.
        return np.array([_hash_int([int(c[0]) for c in columns], seed)], dtype=np.uint64)
    h = np.full(columns[0].shape, seed, dtype=np.uint64)
    for col in columns:
        h ^= _mix64(col + _HASH_MULT)
        h = _mix64(h)
    return h


@dataclass
class CoarseResult:
    """Coarse candidates: ids (int64) ordered by (hamming, id), their Hamming
    distances (int32), and the radius the search stopped at."""
    ids: np.ndarray
    hamming: np.ndarray
    radius: int


@dataclass
class SearchResult:
    """Top-k of one query's coarse-to-fine search, ordered by (fc7 distance, id).

    l2 is the Euclidean fc7 distance: the float64 square root of the float32
    squared distance the ranking uses (so equal l2 values are exactly the
    ties ordered by id); candidates is how many images the coarse stage
    passed to the re-rank, radius where it stopped; seconds the time the
    query's coarse and fine stages took.  With a compressed (PCA) re-rank,
    only the first `exact` results are ranked and measured by fc7; the rest
    by the distance between compressed rows (in their l2)."""
    ids: np.ndarray
    hamming: np.ndarray
    l2: np.ndarray
    candidates: int
    radius: int
    seconds: float = 0.0
    exact: int = None

    def __post_init__(self):
        if self.exact is None:
            self.exact = len(self.ids)


@dataclass
class SearchResults:
    """A batch of searches in faiss's layout: row i is query i's top k.

        ids        (Q, k) int64    -1 where a query found fewer than k images
        hamming    (Q, k) int32    Hamming distance to the query, -1 padding
        l2         (Q, k) float64  fc7 distance (see SearchResult), inf padding
        candidates (Q,)   int64    images the coarse stage passed to the re-rank
        radius     (Q,)   int32    Hamming radius the coarse stage stopped at
        seconds    (Q,)   float64  time of each query's search
        exact      (Q,)   int64    leading results ranked and measured by fc7
                                   (all found, unless a compressed re-rank
                                   ranked the rest: see SearchResult)

    results[i] is query i's SearchResult, without the padding."""
    ids: np.ndarray
    hamming: np.ndarray
    l2: np.ndarray
    candidates: np.ndarray
    radius: np.ndarray
    seconds: np.ndarray
    exact: np.ndarray = None

    def __post_init__(self):
        if self.exact is None:
            self.exact = np.count_nonzero(self.ids >= 0, axis=1).astype(np.int64)

    @classmethod
    def empty(cls, n_queries, k):
        return cls(np.full((n_queries, k), -1, dtype=np.int64),
                   np.full((n_queries, k), -1, dtype=np.int32),
                   np.full((n_queries, k), np.inf),
                   np.zeros(n_queries, dtype=np.int64), np.zeros(n_queries, dtype=np.int32),
                   np.zeros(n_queries))

    @classmethod
    def from_ranked(cls, ranked, k):
        """Rows from per-query (ids, hamming, sq_distances, candidates,
        radius, exact, seconds), as fine_stage (+ the time) gives them;
        k=None: rows as wide as the longest."""
        width = max((len(r[0]) for r in ranked), default=0) if k is None else int(k)
        out = cls.empty(len(ranked), width)
        for i, (ids, ham, d2, n_cand, radius, n_exact, seconds) in enumerate(ranked):
            out.ids[i, :len(ids)] = ids
            out.hamming[i, :len(ids)] = ham
            out.l2[i, :len(ids)] = np.sqrt(d2.astype(np.float64))
            out.candidates[i], out.radius[i], out.seconds[i] = n_cand, radius, seconds
            out.exact[i] = n_exact
        return out

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        found = int(np.count_nonzero(self.ids[i] >= 0))
        return SearchResult(self.ids[i, :found], self.hamming[i, :found], self.l2[i, :found],
                            int(self.candidates[i]), int(self.radius[i]), float(self.seconds[i]),
                            int(self.exact[i]))


def check_search_args(query_codes, query_fc7, bits, k, min_candidates):
    """The arguments of a batched search, checked: (codes, fc7, min_candidates
    with its default_min_candidates(k) default)."""
    query_codes = check_codes(query_codes, bits, "query codes")
    query_fc7 = np.asarray(query_fc7)
    if query_fc7.ndim != 2 or len(query_fc7) != len(query_codes):
        raise ValueError(f"query fc7 {query_fc7.shape} does not match "
                         f"{len(query_codes)} query codes")
    if k is not None and int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if min_candidates is None:
        min_candidates = default_min_candidates(k if k is not None else 0)
    return query_codes, query_fc7, min_candidates


def fine_stage(coarse, query_fc7, fc7, k, reduced=None, query_reduced=None):
    """One query's fine stage over its CoarseResult: the candidates ranked
    by rerank.fine_rank (fc7 distance, or the compressed rows of `reduced`
    then exact fc7 on its best exact_top; ties by id), top k (all with None).
    Returns (ids, hamming, sq_distances, candidates, radius, exact).  Every
    coarse stage (this index's, or an engine's such as milvus_index's)
    ends here, so they rank alike."""
    # Ascending ids: one sequential pass over the rows.
    by_id = np.argsort(coarse.ids, kind="stable")
    ids, ham = coarse.ids[by_id], coarse.hamming[by_id]
    if not len(ids):
        return ids, ham, np.empty(0, np.float32), 0, coarse.radius, 0
    top, d2, n_exact = fine_rank(ids, query_fc7, fc7, k, reduced, query_reduced)
    return ids[top], ham[top], d2, len(ids), coarse.radius, n_exact


class HashIndex:
    """Bucket table over packed codes with exact radius-growing Hamming search.

    Build once with HashIndex.build(codes, bits) (or load a cached copy);
    query with search() (coarse-to-fine, batched) or coarse() (one query's
    candidates).  Arrays (all plain numpy, saved as .npz):

        bucket_words  (W, U) uint64   unique codes, in scan order (pivot, band)
        bucket_offsets (U+1,) int64   CSR: images of bucket b are
                                      ids[bucket_offsets[b]:bucket_offsets[b+1]]
        ids           (N,) int32/64   image ids, ascending within a bucket
        pivot_words   (W, G) uint64   pivot codes        } pivots.PivotTable
        band_cum      (G*(bits+1)+1,) bucket cell bounds }
        probe_keys    (U,) uint64     sorted hash keys of the unique codes
        probe_buckets (U,) int32/64   bucket of each sorted key
    """

    _ARRAYS = ("bucket_words", "bucket_offsets", "ids", "pivot_words", "band_cum",
               "probe_keys", "probe_buckets")

    def __init__(self, bits, count, bucket_words, bucket_offsets, ids, pivot_words,
                 band_cum, probe_keys, probe_buckets, hash_seed):
        self.bits = int(bits)
        self.nbytes = code_bytes(self.bits)
        self.count = int(count)
        self.n_words = bucket_words.shape[0]
        self.bucket_words = bucket_words
        self.bucket_offsets = bucket_offsets
        self.ids = ids
        self.probe_keys = probe_keys
        self.probe_buckets = probe_buckets
        self.hash_seed = int(hash_seed)
        self.pivots = PivotTable(self.bits, pivot_words, band_cum, bucket_offsets)
        self._columns = tuple(np.ascontiguousarray(w) for w in bucket_words)
        self._sizes = np.diff(bucket_offsets).astype(ids.dtype)
        # bincount's weights are float64 anyway: converted once, not per query.
        self._sizes_f = self._sizes.astype(np.float64)
        # Row-major copy for the exhaustive scan's C kernel (codes.HammingBall,
        # per-thread buffers: the service searches from several threads).
        self._rows = np.ascontiguousarray(bucket_words.T)
        self._ball = HammingBall(self._rows, self._sizes)
        self._small_ball = None   # the scan of small indexes, see _small_table
        self._affordable = {}     # see _affordable_shells
        self._dtype = distance_dtype(self.bits)
        self._shell_masks = {}
        self.costs = _unit_costs(self.n_words)

    @property
    def pivot_words(self):
        return self.pivots.pivot_words

    @property
    def band_cum(self):
        return self.pivots.band_cum

    # ---- building ----------------------------------------------------------
    @classmethod
    def build(cls, codes, bits):
        """Index packed codes (N, code_bytes(bits)) uint8; image id = row number."""
        bits = int(bits)
        codes = check_codes(codes, bits)
        n = len(codes)
        words = to_words(codes)
        id_dtype = np.int32 if n < 2**31 else np.int64

        # Buckets of equal codes (ids ascending within each), then laid out
        # in the pivots' scan order.
        order, offsets = group_equal_codes(words)
        unique_words = words[order[offsets[:-1]]]
        sizes = np.diff(offsets)
        pivot_words, band_cum, perm = pivot_layout(unique_words, sizes, bits)
        new_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes[perm], out=new_offsets[1:])
        ids = order[_concat_ranges(offsets[:-1][perm], offsets[1:][perm])].astype(id_dtype)
        bucket_words = np.ascontiguousarray(unique_words[perm].T)
        keys, key_order, seed = _probe_table(tuple(bucket_words))
        return cls(bits, n, bucket_words, new_offsets, ids, pivot_words, band_cum,
                   keys, key_order.astype(id_dtype), seed)

    # ---- persistence -------------------------------------------------------
    def save(self, path, revision):
        """Write the index to `path` (.npz) atomically, tagged with `revision`.

        The revision is any string the caller derives from the database's
        state (FeatureStore.revision(): creation time, count, model); load()
        compares it to decide whether the cached index is still valid.
        """
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays.update(format_version=np.array(FORMAT_VERSION), bits=np.array(self.bits),
                      count=np.array(self.count), hash_seed=np.array(self.hash_seed),
                      revision=np.array(str(revision)))
        atomic_write(path, lambda f: np.savez(f, **arrays), fsync=True)

    @classmethod
    def load(cls, path, expected_revision):
        """The index saved at `path`, or None when it is missing, unreadable,
        from another format version or saved for another revision of the
        database (the caller then rebuilds and saves)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format_version"]) != FORMAT_VERSION:
                    return None
                if str(data["revision"]) != str(expected_revision):
                    return None
                arrays = {name: data[name] for name in cls._ARRAYS}
                return cls(int(data["bits"]), int(data["count"]),
                           hash_seed=int(data["hash_seed"]), **arrays)
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
            # A truncated or foreign file is a stale cache, not a user error.
            return None

    @classmethod
    def load_or_build(cls, path, revision, get_codes, bits):
        """Cached index at `path` if saved for this revision, else build it
        from get_codes() and save it there.  Returns (index, rebuilt: bool)."""
        index = cls.load(path, revision)
        if index is not None and index.bits == int(bits):
            return index, False
        index = cls.build(get_codes(), bits)
        index.save(path, revision)
        return index, True

    # ---- introspection -----------------------------------------------------
    @property
    def n_buckets(self):
        return len(self._sizes)

    @property
    def n_pivots(self):
        return self.pivots.n_groups

    def memory_bytes(self):
        """Bytes held by the index's arrays, derived ones included."""
        arrays = [self.bucket_words, self.bucket_offsets, self.ids, self.probe_keys,
                  self.probe_buckets, self._sizes, self._sizes_f, self._rows,
                  *(() if self._small_ball is None else
                    (self._small_ball.rows, *self._small_ball.sample))]
        unique = {id(a): a for a in arrays if a is not None}
        return int(sum(a.nbytes for a in unique.values())) + self.pivots.nbytes()

    # ---- coarse-to-fine search ---------------------------------------------
    def search(self, query_codes, query_fc7, fc7, k, min_candidates=None, max_radius=None,
               reduced=None):
        """Coarse-to-fine top-k of a batch of queries: each query's coarse
        candidates re-ranked by fc7 distance (ties by id).

        query_codes (Q, B) uint8 packed codes, query_fc7 (Q, D).  fc7 is the
        database's rows: an array (N, D) (ndarray or the store's memory map)
        or a function ids -> rows, called once per query with its candidates'
        ids in ascending order (friendlier to a B-tree or a file).
        k: results per query; None ranks every candidate (rows as wide as the
        largest candidate set).  min_candidates defaults to
        default_min_candidates(k); max_radius caps the Hamming radius.
        reduced: a rerank.ReducedRows (the database's PCA store) to rank by
        compressed rows, the best reduced.exact_top again by fc7 (fc7 is
        only read for those; it may be None when exact_top is 0).
        Returns SearchResults.
        """
        query_codes, query_fc7, min_candidates = check_search_args(
            query_codes, query_fc7, self.bits, k, min_candidates)
        # Every query's projection at once (a row's projection depends on
        # that row alone, pca.Projection.apply).
        query_reduced = reduced.project(query_fc7) if reduced is not None else query_fc7
        ranked = []
        for code, q_fc7, q_red in zip(query_codes, query_fc7, query_reduced):
            start = time.perf_counter()
            coarse = self.coarse(code, min_candidates, max_radius)
            ranked.append(fine_stage(coarse, q_fc7, fc7, k, reduced, q_red)
                          + (time.perf_counter() - start,))
        return SearchResults.from_ranked(ranked, k)

    # ---- coarse stage ------------------------------------------------------
    def coarse(self, query_code, min_candidates, max_radius=None):
        """Images within the smallest radius holding >= min_candidates images.

        Grows the radius 0, 1, 2, ... and stops at the first radius R whose
        ball holds at least min_candidates images, or at max_radius (default:
        no limit; the whole index when min_candidates > count).  All images at
        distance <= R are returned, ordered by (hamming, id).
        """
        code = query_bytes(query_code, self.bits)
        limit = self.bits if max_radius is None else max(0, min(int(max_radius), self.bits))
        need = max(0, int(min_candidates))
        if self.count == 0:
            return CoarseResult(np.empty(0, np.int64), np.empty(0, np.int32), 0)

        # Shell 0 (one probe) then further shells while enumerating them is
        # cheaper than the scan that would otherwise be needed.  When a scan
        # of every unique code costs less than the pivot runs' bookkeeping
        # (small indexes: RUNS_OVERHEAD_STEPS), the choice is between
        # probing and one C scan alone.
        full_cost = self.n_buckets * self.costs["scan"]
        if full_cost <= RUNS_OVERHEAD_STEPS * self.costs["step"]:
            return self._small_index_search(code, need, limit, full_cost)
        qwords = code_words(code)
        probed = _Probed()
        bounds = None
        r = 0
        while True:
            self._probe_into(probed, qwords, r)
            if probed.images >= need or r >= limit:
                return self._expand(probed.buckets, probed.dists, r)
            r += 1
            n_probes = math.comb(self.bits, r)
            if n_probes > MAX_SHELL_PROBES or n_probes * self.costs["probe"] >= full_cost:
                break
            if bounds is None:
                bounds = self.pivots.runs(qwords, self.costs, self.n_buckets)
            r_lb = bounds.radius_lower_bound(need, r, limit)
            if n_probes * self.costs["probe"] >= bounds.scan_cost(r_lb):
                break
        if bounds is None:
            bounds = self.pivots.runs(qwords, self.costs, self.n_buckets)
        return self._scan(code, qwords, bounds, need, r, limit)

    def _probe_into(self, probed, qwords, r):
        """Enumerate shell r and add its buckets to `probed` (a _Probed)."""
        b = self._probe_shell(qwords, r)
        if len(b):
            probed.buckets.append(b)
            probed.dists.append(np.full(len(b), r, dtype=np.int32))
            probed.images += int(self._sizes[b].sum())

    def _probe_shell(self, qwords, r):
        """Buckets at Hamming distance exactly r, by enumerating flip patterns."""
        if r == 0:
            probes = tuple(np.array([w], dtype=np.uint64) for w in qwords)
        else:
            masks = self._shell_masks.get(r)
            if masks is None:
                masks = _flip_masks(self.bits, r, self.n_words)
                self._shell_masks[r] = masks
            probes = tuple(np.bitwise_xor(m, w) for m, w in zip(masks, qwords))
        keys = _hash_words(probes, self.hash_seed)
        pos = np.searchsorted(self.probe_keys, keys)
        np.minimum(pos, len(self.probe_keys) - 1, out=pos)
        hit = np.flatnonzero(self.probe_keys[pos] == keys)
        buckets = self.probe_buckets[pos[hit]]
        if self.n_words > 1:
            # Keys are hashes: confirm that the bucket's code is the probe.
            same = np.ones(len(hit), dtype=bool)
            for col, probe in zip(self._columns, probes):
                same &= col[buckets] == probe[hit]
            buckets = buckets[same]
        return buckets

    def _scan(self, code, qwords, bounds, need, r_min, limit):
        """Exact coarse search by scanning unique codes (pivot runs or all)."""
        r_s = bounds.radius_lower_bound(need, r_min, limit)
        # The runs may need several growing steps; once they have cost as
        # much as one contiguous scan of every code would, switch to that
        # scan: total work stays within about twice the cheaper strategy.
        costs = self.costs
        full_cost = self.n_buckets * costs["scan"]
        spent = bounds.runs_cost(r_s)
        if spent >= full_cost:
            return self._full_scan(code, need, limit)

        lo, hi = bounds.cells(r_s)
        band_cum = self.pivots.band_cum
        scanned_b = [_concat_ranges(band_cum[lo], band_cum[hi])]
        scanned_d = [self._bucket_distances(scanned_b[0], qwords)]
        hist = np.zeros(self.bits + 1)
        while True:
            hist += np.bincount(scanned_d[-1], weights=self._sizes_f[scanned_b[-1]],
                                minlength=self.bits + 1)
            cum = np.cumsum(hist)
            # Every image within r_s lies in the runs, so cum[:r_s+1] is exact.
            if cum[r_s] >= need or r_s >= limit:
                radius = int(shell_radius(cum[:r_s + 1], need))
                break
            # Next radius worth scanning: the smallest where the exact counts
            # plus the images of the runs not scanned yet could reach `need`
            # (monotone in r).
            base_ub = bounds.upper_bound(r_s)
            r_next = first_true(
                lambda r: cum[r] + bounds.upper_bound(r) - base_ub >= need, r_s + 1, limit)
            new_lo, new_hi = bounds.cells(r_next)
            # Old runs over the same (possibly larger) set of groups.
            lo, hi = bounds.cells(r_s, len(new_lo))
            starts = np.concatenate([band_cum[new_lo], band_cum[hi]])
            stops = np.concatenate([band_cum[lo], band_cum[new_hi]])
            spent += costs["step"] + costs["gather"] * int(stops.sum() - starts.sum())
            if spent >= full_cost:
                return self._full_scan(code, need, limit)
            new_b = _concat_ranges(starts, stops)
            scanned_b.append(new_b)
            scanned_d.append(self._bucket_distances(new_b, qwords))
            lo, hi, r_s = new_lo, new_hi, r_next
        keep = [d <= radius for d in scanned_d]
        return self._expand([b[m] for b, m in zip(scanned_b, keep)],
                            [d[m] for d, m in zip(scanned_d, keep)], radius)

    def _small_index_search(self, code, need, limit, full_cost):
        """A small index's coarse stage: one C scan of every code (its
        table: _small_table) unless a sample of it says the ball likely
        lies within the shells that cost less to enumerate than the scan
        (then those are probed, and the scan runs only if they fall short)."""
        ball = self._small_table()
        probe_radius = self._affordable_shells(full_cost)
        found = None
        if probe_radius >= 0:
            if limit > probe_radius:
                found = ball.search(code, need, limit, probe_radius)
            if found is None:
                qwords = code_words(code)
                probed = _Probed()
                for r in range(min(probe_radius, limit) + 1):
                    self._probe_into(probed, qwords, r)
                    if probed.images >= need or r >= limit:
                        return self._expand(probed.buckets, probed.dists, r)
        if found is None:
            found = ball.search(code, need, limit)
        if ball.rows is self._rows:   # buckets: expanded to their images
            return self._expand([found[0]], [found[1]], found[2])
        # One row per image, in id order: the scan's row positions are the ids.
        return CoarseResult(*found)

    def _affordable_shells(self, full_cost):
        """The largest r whose shells 0..r cost less to enumerate than a
        scan costing full_cost (-1: not even shell 0); remembered per cost
        (the cost table may be replaced, as the tests do)."""
        key = (self.costs["probe"], full_cost)
        r = self._affordable.get(key)
        if r is None:
            n_probes, r = 0, -1
            while r < self.bits:
                n_probes += math.comb(self.bits, r + 1)
                if n_probes > MAX_SHELL_PROBES or n_probes * self.costs["probe"] >= full_cost:
                    break
                r += 1
            self._affordable[key] = r
        return r

    def _full_scan(self, code, need, limit):
        """Every unique code (the bucket table's rows) through the C scan,
        the buckets within the stopping radius then expanded to their images."""
        buckets, dist, radius = self._ball.search(code, need, limit)
        return self._expand([buckets], [dist], radius)

    def _small_table(self):
        """The scan of a small index, with a fixed sample of RADIUS_SAMPLE
        rows: every image's code, one row per image in id order (its matches
        are the images, no expansion or sort), when that is at most twice the
        unique codes; else the unique codes (the bucket table), their ball
        then expanded.  Built on first use (a few MB)."""
        if self._small_ball is None:
            rng = np.random.default_rng(0)
            if self.count <= 2 * self.n_buckets:
                rows = np.empty((self.count, self.n_words), dtype=np.uint64)
                rows[self.ids] = np.repeat(self._rows, self._sizes, axis=0)
                sample = rng.choice(self.count, size=min(self.count, RADIUS_SAMPLE),
                                    replace=False)
                self._small_ball = HammingBall(rows, None, sample)
            else:
                sample = rng.choice(self.n_buckets, size=min(self.n_buckets, RADIUS_SAMPLE),
                                    replace=False)
                self._small_ball = HammingBall(self._rows, self._sizes, sample)
        return self._small_ball

    def _bucket_distances(self, buckets, qwords):
        if not len(buckets):
            return np.empty(0, dtype=self._dtype)
        out = np.bitwise_count(np.bitwise_xor(self._columns[0][buckets], qwords[0]))
        if out.dtype != self._dtype:
            out = out.astype(self._dtype)
        for col, qw in zip(self._columns[1:], qwords[1:]):
            out += np.bitwise_count(np.bitwise_xor(col[buckets], qw))
        return out

    def _expand(self, bucket_parts, dist_parts, radius):
        """Buckets -> images, ordered by (hamming, id)."""
        if not bucket_parts:
            return CoarseResult(np.empty(0, np.int64), np.empty(0, np.int32), int(radius))
        buckets = bucket_parts[0] if len(bucket_parts) == 1 else np.concatenate(bucket_parts)
        dists = dist_parts[0] if len(dist_parts) == 1 else np.concatenate(dist_parts)
        starts = self.bucket_offsets[buckets]
        stops = self.bucket_offsets[buckets + 1]
        ids = self.ids[_concat_ranges(starts, stops)]
        return CoarseResult(*sorted_by_hamming(ids, np.repeat(dists, stops - starts)),
                            int(radius))


class _Probed:
    """The shells enumerated so far: their buckets, distances, image count."""

    def __init__(self):
        self.buckets, self.dists, self.images = [], [], 0


def sorted_by_hamming(ids, dist):
    """(ids int64, distances int32) in the coarse stage's (hamming, id)
    order: one sort of int64 keys hamming << _ID_BITS | id, without
    lexsort's two passes and gathers."""
    keys = dist.astype(np.int64) << _ID_BITS
    keys |= ids
    keys.sort()
    return keys & _ID_MASK, (keys >> _ID_BITS).astype(np.int32)


def _probe_table(columns):
    """Sorted 64-bit keys of the unique codes (word columns), the bucket of
    each key, and the hash seed: a seed under which no two codes share a key
    (tried from 0 upwards)."""
    for seed in range(17):
        keys = _hash_words(columns, seed)
        key_order = np.argsort(keys, kind="stable")
        sorted_keys = keys[key_order]
        if not np.any(sorted_keys[1:] == sorted_keys[:-1]):
            return np.ascontiguousarray(sorted_keys), key_order, seed
        # Two distinct codes with one 64-bit key: try another hash.
    raise RuntimeError("cannot find a collision-free hash for the codes")
