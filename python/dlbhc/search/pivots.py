"""Pivot runs: the coarse stage's pruned scan of the unique codes.

Buckets (unique codes) are grouped by their nearest pivot p and sorted by
their distance to it, their "band".  By the triangle inequality a bucket x
can only be within r of a query q if |d(q, p) - d(x, p)| <= r, so each group
contributes one contiguous run of buckets at radius r.  Real hash codes
cluster (images of one kind get nearly the same code), so the runs cover the
query's own cluster and little else.

pivot_layout chooses the pivots and the buckets' scan order when an index
is built; PivotTable holds what the index stores for this (pivots and band
offsets);
PivotTable.runs(qwords) gives the per-query view the coarse stage asks
for bounds and cell ranges.  Only speed depends on the pivots chosen: the
runs always contain every bucket within r, so results are exact.

Pure numpy, never imports Caffe.
"""
import numpy as np

from .codes import distance_dtype, distances_to_words, word_columns

# At most this many pivots (query overhead and build time grow with it) and
# about one per this many unique codes.
MAX_PIVOTS = 1024
CODES_PER_PIVOT = 64


def choose_pivots(unique_words, sizes, bits):
    """Pivot codes (G, W) for the pruned scan: the most populated buckets,
    kept only when far enough from the pivots already chosen.

    Hash codes cluster around modes (many images share the code of their
    kind), and the biggest buckets sit at those modes, so these pivots land
    near cluster centres.  The separation (bits // 8) keeps several pivots
    from crowding into one cluster.  Equal sizes are broken by a fixed-seed
    shuffle so indexes are reproducible.
    """
    u = len(unique_words)
    if u == 0:
        return np.zeros((1, unique_words.shape[1]), dtype=np.uint64)
    target = int(min(MAX_PIVOTS, max(1, u // CODES_PER_PIVOT)))
    separation = max(1, bits // 8)
    tie_break = np.random.default_rng(0).permutation(u)
    candidates = np.lexsort((tie_break, -sizes))[:max(20 * target, 1000)]
    cand_words = unique_words[candidates]
    chosen = np.empty((target, unique_words.shape[1]), dtype=np.uint64)
    n_chosen = 0
    for w in cand_words:
        if n_chosen:
            d = np.bitwise_count(chosen[:n_chosen] ^ w).sum(axis=1)
            if d.min() < separation:
                continue
        chosen[n_chosen] = w
        n_chosen += 1
        if n_chosen == target:
            break
    return chosen[:n_chosen]


def assign_to_pivots(unique_words, pivots, bits, chunk=4096):
    """Nearest pivot (group) and distance to it (band) for every unique code."""
    u = len(unique_words)
    dtype = distance_dtype(bits)
    group = np.empty(u, dtype=np.int32)
    band = np.empty(u, dtype=np.int64)
    pivot_cols = word_columns(pivots)
    tmp = np.empty((chunk, len(pivots)), dtype=np.uint64)
    for start in range(0, u, chunk):
        block = unique_words[start:start + chunk]
        t = tmp[:len(block)]
        d = np.zeros((len(block), len(pivots)), dtype=dtype)
        for j, col in enumerate(pivot_cols):
            np.bitwise_xor(block[:, j, None], col[None, :], out=t)
            d += np.bitwise_count(t).astype(dtype, copy=False)
        g = np.argmin(d, axis=1)
        group[start:start + chunk] = g
        band[start:start + chunk] = d[np.arange(len(block)), g]
    return group, band


def first_true(predicate, lo, hi):
    """Smallest r in [lo, hi] with predicate(r) true, for a predicate monotone
    in r; hi when none is.  Gallops up from lo (1, 2, 4, ... steps) before
    bisecting: the answer is usually a few steps above lo, and evaluating
    small radii is cheaper than large ones."""
    step = 1
    prev = lo - 1
    r = lo
    while r < hi and not predicate(r):
        prev = r
        r = min(hi, r + step)
        step *= 2
    # predicate(r) is true or r == hi; the answer lies in (prev, r].
    lo_r, hi_r = prev + 1, r
    while lo_r < hi_r:
        mid = (lo_r + hi_r) // 2
        if predicate(mid):
            hi_r = mid
        else:
            lo_r = mid + 1
    return lo_r


def pivot_layout(unique_words, sizes, bits):
    """Choose pivots for the unique codes (U, W) holding `sizes` images.

    Returns (pivot_words (W, G), band_cum, perm): perm is the scan order of
    the unique codes, by (group, band), which the index lays its buckets out
    in; band_cum counts buckets per cell in that order (see PivotTable)."""
    pivots = choose_pivots(unique_words, sizes, bits)
    group, band = assign_to_pivots(unique_words, pivots, bits)
    perm = np.lexsort((band, group))
    n_bands = int(bits) + 1
    cell_counts = np.bincount(group.astype(np.int64) * n_bands + band,
                              minlength=len(pivots) * n_bands)
    band_cum = np.zeros(len(pivots) * n_bands + 1, dtype=np.int64)
    np.cumsum(cell_counts, out=band_cum[1:])
    return np.ascontiguousarray(pivots.T), band_cum, perm


class PivotTable:
    """The pivots of an index and where each (group, band) cell of buckets
    starts in the index's scan order.

        pivot_words (W, G) uint64   pivot codes
        band_cum    (G*(bits+1)+1,) first bucket of (group g, band b) at
                                    g*(bits+1)+b; group g ends at b = bits+1
        img_cum     like band_cum, counting images instead of buckets
    """

    def __init__(self, bits, pivot_words, band_cum, bucket_offsets):
        self.bits = int(bits)
        self.n_bands = self.bits + 1
        self.pivot_words = pivot_words
        self.band_cum = band_cum
        self.img_cum = bucket_offsets[band_cum]
        self.columns = tuple(np.ascontiguousarray(w) for w in pivot_words)
        self.dtype = distance_dtype(self.bits)
        # First and last non-empty band of each group (see PivotRuns).
        filled = np.diff(band_cum).reshape(self.n_groups, self.n_bands) > 0
        any_filled = filled.any(axis=1)
        self.band_min = np.where(any_filled, np.argmax(filled, axis=1), self.n_bands)
        self.band_max = np.where(any_filled, self.bits - np.argmax(filled[:, ::-1], axis=1), -1)

    @property
    def n_groups(self):
        return self.pivot_words.shape[1]

    def nbytes(self):
        return int(sum(a.nbytes for a in (self.pivot_words, self.band_cum, self.img_cum,
                                          self.band_min, self.band_max)))

    def runs(self, qwords, costs, n_buckets):
        """The per-query view for the query code's words."""
        return PivotRuns(self, qwords, costs, n_buckets)


class PivotRuns:
    """Per-query view of the pivot runs.

    For a radius r, group g can only hold buckets within r of the query in
    bands [d(q, p_g) - r, d(q, p_g) + r] (triangle inequality), one contiguous
    run of buckets.  A group whose bands all lie outside that window for
    every r below its "gap" contributes nothing, and for hash codes most
    groups (other clusters) have gaps far above the radii a query needs; so
    groups are sorted by gap once and each radius only looks at the groups
    active at it.  Results are memoised: the coarse stage asks for the same
    radii several times while it decides and searches.
    """

    def __init__(self, table, qwords, costs, n_buckets):
        self.table = table
        self.costs = costs
        self.n_buckets = n_buckets
        dq = distances_to_words(table.columns, qwords, table.dtype).astype(np.int64)
        gap = np.maximum(np.maximum(dq - table.band_max, table.band_min - dq), 0)
        order = np.argsort(gap, kind="stable")
        self.gaps = gap[order]
        self.dq = dq[order]
        self.base = order * table.n_bands
        self._cells = {}
        self._ub = {}

    def active(self, r):
        """Number of groups (in gap order) that can hold buckets within r."""
        return int(np.searchsorted(self.gaps, r, side="right"))

    def cells(self, r, n_groups=None):
        """Flat (group, band) indices bounding the runs at radius r of the
        first n_groups groups in gap order (default: those active at r)."""
        if n_groups is None:
            n_groups = self.active(r)
        got = self._cells.get((r, n_groups))
        if got is None:
            dq = self.dq[:n_groups]
            base = self.base[:n_groups]
            lo = np.maximum(dq - r, 0) + base
            hi = np.minimum(dq + (r + 1), self.table.n_bands) + base
            got = self._cells[(r, n_groups)] = (lo, hi)
        return got

    def upper_bound(self, r):
        """Images in the runs at radius r: every image within r is among them."""
        got = self._ub.get(r)
        if got is None:
            lo, hi = self.cells(r)
            img_cum = self.table.img_cum
            got = self._ub[r] = int(img_cum[hi].sum() - img_cum[lo].sum())
        return got

    def radius_lower_bound(self, need, r_min, limit):
        """Smallest r in [r_min, limit] whose runs hold >= need images (else limit):
        no smaller radius can gather `need` images."""
        return first_true(lambda r: self.upper_bound(r) >= need, r_min, limit)

    def buckets_in_runs(self, r):
        """Number of buckets the runs at radius r cover."""
        lo, hi = self.cells(r)
        band_cum = self.table.band_cum
        return int(band_cum[hi].sum() - band_cum[lo].sum())

    def runs_cost(self, r):
        """Estimated cost of one step scanning the runs at radius r."""
        return self.costs["step"] + self.buckets_in_runs(r) * self.costs["gather"]

    def scan_cost(self, r):
        """Estimated cost of the cheaper scan (runs or all codes) at radius r."""
        return min(self.runs_cost(r), self.n_buckets * self.costs["scan"])
