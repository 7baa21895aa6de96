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
this one implementation; its parameters (k, min_candidates, max_radius) are
checked by params.SearchParams, and what it returns (ordering rules
included) is results.py's, shared with the Milvus path.

This module keeps the bucket table, its persistence and the choice among
the coarse strategies, the parts that need the whole table.  What each
strategy needs alone lives beside it: the measured costs that choose
(costs.py), probing's hash table and flip masks (probing.py), the pivot
runs (pivots.py) and the C scan (codes.HammingBall).

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
    measured (costs.COST_NS).
"""
import math
import time
import zipfile
from pathlib import Path

import numpy as np

from .codes import (HammingBall, check_codes, code_bytes, code_words, concat_ranges,
                    distance_dtype, group_equal_codes, query_bytes, to_words)
from .costs import MAX_SHELL_PROBES, RUNS_OVERHEAD_STEPS, unit_costs
from ..files import atomic_write
from .params import coarse_target, radius_limit
from .pivots import PivotTable, first_true, pivot_layout
from .probing import ProbedShells, ShellProber, probe_table
from .rerank import query_rows
from .results import CoarseResult, SearchResults, fine_stage, sorted_by_hamming

FORMAT_VERSION = 1

# A small index decides between probing shells and scanning every code from
# the distances of this many images, a fixed sample (the radius it suggests).
RADIUS_SAMPLE = 2048


def shell_radius(cum_counts, min_candidates, max_radius=None):
    """The coarse stage's stopping rule.

    cum_counts[..., r] = number of images within Hamming radius r (r = 0..bits).
    Returns the smallest r with cum_counts[r] >= min_candidates, or
    min(max_radius, bits) when no radius up to it gathers enough.
    """
    cum_counts = np.asarray(cum_counts)
    limit = radius_limit(max_radius, cum_counts.shape[-1] - 1)
    if cum_counts.ndim == 1:
        # One query (the search's case): counts never decrease with r.
        return min(int(np.searchsorted(cum_counts[:limit + 1], min_candidates)), limit)
    enough = cum_counts[..., :limit + 1] >= min_candidates
    first = np.argmax(enough, axis=-1)
    return np.where(enough.any(axis=-1), first, limit)


def check_queries(query_codes, query_fc7, bits, k):
    """A batch search's queries and k, checked: (codes, fc7) as arrays, or
    ValueError saying what does not fit.  (A user's parameters are checked
    before, by params.SearchParams.)"""
    query_codes = check_codes(query_codes, bits, "query codes")
    query_fc7 = np.asarray(query_fc7)
    if query_fc7.ndim != 2 or len(query_fc7) != len(query_codes):
        raise ValueError(f"query fc7 {query_fc7.shape} does not match "
                         f"{len(query_codes)} query codes")
    if k is not None and int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return query_codes, query_fc7


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
        # Images per bucket as bincount's weights (float64 anyway): converted
        # once, not per query.
        self.bucket_weights = self._sizes.astype(np.float64)
        # The probe strategy's lookups (probing.py).
        self.prober = ShellProber(self.bits, self._columns, probe_keys, probe_buckets,
                                  self.hash_seed)
        # Row-major copy for the exhaustive scan's C kernel (codes.HammingBall,
        # per-thread buffers: the service searches from several threads).
        self._rows = np.ascontiguousarray(bucket_words.T)
        self._ball = HammingBall(self._rows, self._sizes)
        self._small_ball = None   # the scan of small indexes, see _small_table
        self._affordable = {}     # see _affordable_shells
        self._dtype = distance_dtype(self.bits)
        self.costs = unit_costs(self.n_words)

    @property
    def pivot_words(self):
        return self.pivots.pivot_words

    @property
    def band_cum(self):
        return self.pivots.band_cum

    # ---- building ----------------------------------------------------------
    @classmethod
    def build(cls, codes, bits, ids=None):
        """Index packed codes (N, code_bytes(bits)) uint8; image id = row
        number, or ids[row] (ascending, e.g. a database's live rows)."""
        bits = int(bits)
        codes = check_codes(codes, bits)
        n = len(codes)
        words = to_words(codes)
        top = n if ids is None or not len(ids) else int(ids[-1]) + 1
        id_dtype = np.int32 if top < 2**31 else np.int64

        # Buckets of equal codes (ids ascending within each), then laid out
        # in the pivots' scan order.
        order, offsets = group_equal_codes(words)
        unique_words = words[order[offsets[:-1]]]
        sizes = np.diff(offsets)
        pivot_words, band_cum, perm = pivot_layout(unique_words, sizes, bits)
        new_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes[perm], out=new_offsets[1:])
        rows = order[concat_ranges(offsets[:-1][perm], offsets[1:][perm])]
        ids = (rows if ids is None else np.asarray(ids)[rows]).astype(id_dtype)
        bucket_words = np.ascontiguousarray(unique_words[perm].T)
        keys, key_order, seed = probe_table(tuple(bucket_words))
        return cls(bits, n, bucket_words, new_offsets, ids, pivot_words, band_cum,
                   keys, key_order.astype(id_dtype), seed)

    def without(self, ids):
        """This index less the images `ids` (those it does not hold are
        ignored): the same buckets, some left empty, each one's images
        filtered.  O(N) array work, no rebuild: how a database's removals
        reach a live index.  Searches answer as an index built over the
        remaining images would (tested against that)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if not len(ids) or not self.count:
            return self
        top = max(int(self.ids.max()), int(ids.max())) + 1
        gone = np.zeros(top, dtype=bool)
        gone[ids[ids >= 0]] = True
        keep = ~gone[self.ids]
        if keep.all():
            return self
        bucket_of = np.repeat(np.arange(self.n_buckets), self._sizes)
        offsets = np.zeros(self.n_buckets + 1, dtype=np.int64)
        np.cumsum(np.bincount(bucket_of[keep], minlength=self.n_buckets), out=offsets[1:])
        return type(self)(self.bits, int(keep.sum()), self.bucket_words, offsets,
                          self.ids[keep], self.pivot_words, self.band_cum, self.probe_keys,
                          self.probe_buckets, self.hash_seed)

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
    def load_or_build(cls, path, revision, get_codes, bits, ids=None):
        """Cached index at `path` if saved for this revision, else build it
        from get_codes() (with ids: see build) and save it there.  Returns
        (index, rebuilt: bool)."""
        index = cls.load(path, revision)
        if index is not None and index.bits == int(bits):
            return index, False
        index = cls.build(get_codes(), bits, ids)
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
                  self.probe_buckets, self._sizes, self.bucket_weights, self._rows,
                  *(() if self._small_ball is None else
                    (self._small_ball.rows, *self._small_ball.sample))]
        unique = {id(a): a for a in arrays if a is not None}
        return int(sum(a.nbytes for a in unique.values())) + self.pivots.nbytes()

    # ---- coarse-to-fine search ---------------------------------------------
    def search(self, query_codes, query_fc7, fc7, k, min_candidates=None, max_radius=None,
               reduced=None, query_reduced=None):
        """Coarse-to-fine top-k of a batch of queries: each query's coarse
        candidates re-ranked by fc7 distance (ties by id).

        query_codes (Q, B) uint8 packed codes, query_fc7 (Q, D).  fc7 is the
        database's rows: an array (N, D) (ndarray or the store's memory map)
        or a function ids -> rows, called once per query with its candidates'
        ids in ascending order (friendlier to a B-tree or a file).
        k: results per query; None ranks every candidate (rows as wide as the
        largest candidate set).  min_candidates defaults to
        params.default_min_candidates(k); max_radius caps the Hamming radius
        (the parameters a params.SearchParams holds, checked there).
        reduced: a rerank.ReducedRows (the database's PCA store) to rank by
        compressed rows, the best reduced.exact_top again by fc7 (fc7 is
        only read for those; it may be None when exact_top is 0); a stage
        whose rows are no projection (the latent: reduced.project None) takes
        the queries' rows as query_reduced (Q, d); rerank.query_rows.
        Returns SearchResults.
        """
        query_codes, query_fc7 = check_queries(query_codes, query_fc7, self.bits, k)
        need = coarse_target(k, min_candidates)
        # Every query's projection at once (a row's projection depends on
        # that row alone, pca.Projection.apply).
        query_reduced = query_rows(reduced, query_fc7, query_reduced)
        ranked = []
        for code, q_fc7, q_red in zip(query_codes, query_fc7, query_reduced):
            start = time.perf_counter()
            coarse = self.coarse(code, need, max_radius)
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
        limit = radius_limit(max_radius, self.bits)
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
        probed = ProbedShells(self.prober, self._sizes)
        bounds = None
        r = 0
        while True:
            probed.add(qwords, r)
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
            return self.full_scan(code, need, limit)

        lo, hi = bounds.cells(r_s)
        band_cum = self.pivots.band_cum
        scanned_b = [concat_ranges(band_cum[lo], band_cum[hi])]
        scanned_d = [self.bucket_distances(scanned_b[0], qwords)]
        hist = np.zeros(self.bits + 1)
        while True:
            hist += np.bincount(scanned_d[-1], weights=self.bucket_weights[scanned_b[-1]],
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
                return self.full_scan(code, need, limit)
            new_b = concat_ranges(starts, stops)
            scanned_b.append(new_b)
            scanned_d.append(self.bucket_distances(new_b, qwords))
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
                probed = ProbedShells(self.prober, self._sizes)
                for r in range(min(probe_radius, limit) + 1):
                    probed.add(qwords, r)
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

    def full_scan(self, code, need, limit):
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
            # (ids 0..count-1 only: an index of some rows has gaps)
            dense = self.count == 0 or int(self.ids.max()) == self.count - 1
            if dense and self.count <= 2 * self.n_buckets:
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

    def bucket_distances(self, buckets, qwords):
        """Hamming distances of the query (its words) to the given buckets' codes."""
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
        ids = self.ids[concat_ranges(starts, stops)]
        return CoarseResult(*sorted_by_hamming(ids, np.repeat(dists, stops - starts)),
                            int(radius))
