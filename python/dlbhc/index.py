"""Packed binary codes, the bucket table, Hamming search and fc7 re-ranking.

Pure numpy: this module never imports caffe, the feature store or faiss, so
search can be tested and benchmarked without a net or a database.

Code convention
    A code is ``numpy.packbits(latent > 0.5, axis=1)``: bit j of a code is bit
    ``7 - j % 8`` of byte ``j // 8`` (big-endian within each byte), so a
    ``bits``-bit code takes ``code_bytes(bits) = ceil(bits / 8)`` bytes and the
    unused low bits of the last byte ("pad bits") are zero.  Internally codes
    are widened to whole 64-bit words (zero bytes appended) so that one XOR and
    one popcount handle 64 bits; the word byte order does not matter because
    XOR and popcount are bitwise.

Search (the paper's coarse-to-fine retrieval)
    coarse   all images within the smallest Hamming radius R that holds at
             least ``min_candidates`` images (R capped by ``max_radius``).
             The whole shell at distance R is always included, so images tied
             at the boundary are never cut by their position in the database.
    fine     the coarse candidates re-ranked by the Euclidean distance of
             their fc7 features to the query's fc7; top k returned.

Ordering rules (the brute-force functions follow the same rules, so the fast
path can be compared with them exactly)
    coarse   by (Hamming distance, image id).
    fine     by (squared fc7 distance, image id).  Distances are computed by
             ``fc7_sq_distances`` in float32, row by row (the same arithmetic
             for every row, wherever it sits in memory), so equal fc7 rows get
             equal distances and are ordered by id.

How the coarse stage avoids scanning everything
    Images with identical codes share a bucket: the table keeps the U unique
    codes and, per bucket, the ascending ids of its images (CSR layout).  Two
    exact strategies find the buckets within a radius r:

    probe  enumerate every code at distance exactly 0, 1, 2, ... from the
           query (C(bits, r) flip patterns) and look each up in a hash table
           of the unique codes.  Cheap when C(bits, r) is small.
    scan   compute the Hamming distance of the query to unique codes, with
           pivots to skip most of them: buckets are grouped by their nearest
           pivot p and sorted by their distance to it (their "band").  By the
           triangle inequality a bucket x can only be within r of query q if
           |d(q, p) - d(x, p)| <= r, so each group contributes one contiguous
           run of buckets.  Real hash codes cluster (images of one kind get
           nearly the same code), so the runs cover the query's own cluster
           and little else.  When the runs cover most buckets anyway a plain
           scan of all unique codes is used instead.

    Which one runs is decided per query by a cost model whose unit costs were
    measured (see _COST_NS).
"""
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MAX_BITS = 1024

# --- cost model -------------------------------------------------------------
# Unit costs of the coarse stage, in nanoseconds, by code width in 64-bit
# words, measured with `python benchmarks/bench_search.py --calibrate --sizes
# 1000000 --bits 48,128,256` (clustered synthetic codes, U ~ 0.7-0.8M unique)
# on the project's 2-core build machine, numpy 2.4.  Only their ratios
# matter: they decide which exact strategy runs, never what it returns.
#   probe   one enumerated flip pattern: XOR, hash (codes over 64 bits),
#           binary search among the unique codes, verify
#   gather  one unique code reached through the pivot runs: gather, XOR,
#           popcount, histogram
#   scan    one unique code in a contiguous scan of all of them
#   step    fixed overhead of one growing step of the pivot-run scan
# Other widths interpolate (and beyond 4 words keep the 4-word figures).
_COST_WORDS = (1, 2, 4)
_COST_NS = {"probe": (147.0, 402.0, 543.0),
            "gather": (12.0, 16.1, 31.4),
            "scan": (5.9, 7.9, 13.7),
            "step": (140e3, 119e3, 205e3)}


def _unit_costs(n_words):
    return {name: float(np.interp(n_words, _COST_WORDS, values))
            for name, values in _COST_NS.items()}


# Enumerating a shell costs memory for its flip masks; beyond this many
# patterns a scan is always cheaper anyway.
MAX_SHELL_PROBES = 1 << 18

# Pivot selection: at most this many pivots (query overhead and build time
# grow with it) and about one per this many unique codes.
MAX_PIVOTS = 1024
CODES_PER_PIVOT = 64

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def code_bytes(bits):
    """Bytes in one packed code of `bits` bits."""
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    return (bits + 7) // 8


def _pad_mask(bits):
    """Mask of the pad bits in the last byte of a packed code."""
    spare = 8 * code_bytes(bits) - bits
    return (1 << spare) - 1


def _dist_dtype(bits):
    # bitwise_count of a uint64 is uint8; sums of words need uint16 past 255.
    return np.uint8 if bits <= 255 else np.uint16


def default_min_candidates(k):
    """Coarse candidates gathered for a top-k fine search: 2 * k.

    The fine stage can only return what the coarse stage found.  Gathering
    twice k lets fc7 promote images from just beyond the k-th Hamming rank
    (the paper's reason for re-ranking), while the re-rank cost (one fc7 read
    per candidate) stays proportional to k.  The whole boundary shell is
    added on top, so the actual pool is often larger.
    """
    return 2 * int(k)


def pack_codes(latent, threshold=0.5):
    """Binary codes from latent activations: packbits(latent > threshold).

    latent (N, bits) -> uint8 (N, code_bytes(bits)); a 1-D latent gives one
    code of shape (code_bytes(bits),).  Big-endian bit order; pad bits zero.
    """
    latent = np.asarray(latent)
    if latent.ndim not in (1, 2):
        raise ValueError(f"latent must be 1-D or 2-D, got shape {latent.shape}")
    code_bytes(latent.shape[-1])
    return np.packbits(latent > threshold, axis=-1)


def _check_codes(codes, bits, what="codes"):
    codes = np.asarray(codes)
    nbytes = code_bytes(bits)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != nbytes:
        raise ValueError(f"{what} must be uint8 (N, {nbytes}) for {bits} bits, "
                         f"got {codes.dtype} {codes.shape}")
    mask = _pad_mask(bits)
    if mask and len(codes) and np.any(codes[:, -1] & mask):
        raise ValueError(f"{what} have pad bits set: they were not packed from "
                         f"{bits}-bit latents with pack_codes")
    return codes


def _to_words(codes):
    """(N, B) uint8 codes -> (N, W) uint64, W = ceil(B / 8), zero padded.

    A view when B is a multiple of 8 and rows are contiguous, else a copy.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape
    n_words = (nbytes + 7) // 8
    if nbytes == 8 * n_words and codes.flags.c_contiguous:
        return codes.view(np.uint64).reshape(n, n_words)
    padded = np.zeros((n, 8 * n_words), dtype=np.uint8)
    padded[:, :nbytes] = codes
    return padded.view(np.uint64).reshape(n, n_words)


def _query_words(query_code, bits):
    q = np.asarray(query_code, dtype=np.uint8).reshape(1, -1)
    _check_codes(q, bits, "query code")
    return _to_words(q)[0].copy()


def _word_columns(words):
    """(N, W) uint64 -> tuple of W contiguous (N,) arrays (fast per-word ops)."""
    return tuple(np.ascontiguousarray(words[:, j]) for j in range(words.shape[1]))


def _distances_to(columns, qwords, dtype):
    """Hamming distances of the codes held in word columns to a query."""
    out = np.bitwise_count(np.bitwise_xor(columns[0], qwords[0]))
    if dtype != out.dtype:
        out = out.astype(dtype)
    tmp = np.empty_like(columns[0])
    for col, qw in zip(columns[1:], qwords[1:]):
        np.bitwise_xor(col, qw, out=tmp)
        out += np.bitwise_count(tmp)
    return out


def hamming_distances(codes, query_code, bits=None):
    """Hamming distance of every code (N, B) to query_code (B,).

    Returns uint8 (uint16 for codes over 255 bits) of shape (N,).  `bits`
    only serves validation; by default it is 8 * B.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, bytes), got shape {codes.shape}")
    bits = 8 * codes.shape[1] if bits is None else int(bits)
    _check_codes(codes, bits)
    qwords = _query_words(query_code, bits)
    if not len(codes):
        return np.empty(0, dtype=_dist_dtype(bits))
    # Strided columns of the (N, W) view: no copy of the database.
    words = _to_words(codes)
    columns = tuple(words[:, j] for j in range(words.shape[1]))
    return _distances_to(columns, qwords, _dist_dtype(bits))


def hamming_matrix(db_codes, query_codes, bits=None):
    """Hamming distances (Q, N) between query codes (Q, B) and database codes (N, B).

    uint8 (uint16 over 255 bits).  Memory is Q * N * 9 bytes at the peak:
    callers with large Q pass batches of queries.
    """
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    query_codes = np.asarray(query_codes, dtype=np.uint8)
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    _check_codes(db_codes, bits, "database codes")
    _check_codes(query_codes, bits, "query codes")
    dtype = _dist_dtype(bits)
    db_cols = _word_columns(_to_words(db_codes))
    q_words = _to_words(query_codes)
    out = np.zeros((len(query_codes), len(db_codes)), dtype=dtype)
    tmp = np.empty(out.shape, dtype=np.uint64)
    for j, col in enumerate(db_cols):
        np.bitwise_xor(q_words[:, j, None], col[None, :], out=tmp)
        out += np.bitwise_count(tmp).astype(dtype, copy=False)
    return out


def shell_radius(cum_counts, min_candidates, max_radius=None):
    """The coarse stage's stopping rule, shared with metrics.fine_ranking.

    cum_counts[..., r] = number of images within Hamming radius r (r = 0..bits).
    Returns the smallest r with cum_counts[r] >= min_candidates, or
    min(max_radius, bits) when no radius up to it gathers enough.
    """
    cum_counts = np.asarray(cum_counts)
    top = cum_counts.shape[-1] - 1
    limit = top if max_radius is None else max(0, min(int(max_radius), top))
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
    """Top-k of a coarse-to-fine search, ordered by (fc7 distance, id).

    l2 is the Euclidean fc7 distance: the float64 square root of the float32
    squared distance the ranking uses (so equal l2 values are exactly the
    ties ordered by id); candidates is how many images the coarse stage
    passed to the re-rank, radius where it stopped."""
    ids: np.ndarray
    hamming: np.ndarray
    l2: np.ndarray
    candidates: int
    radius: int


class HashIndex:
    """Bucket table over packed codes with exact radius-growing Hamming search.

    Build once with HashIndex.build(codes, bits) (or load a cached copy);
    query with coarse() and search().  Arrays (all plain numpy, saved as .npz):

        bucket_words  (W, U) uint64   unique codes, in scan order (pivot, band)
        bucket_offsets (U+1,) int64   CSR: images of bucket b are
                                      ids[bucket_offsets[b]:bucket_offsets[b+1]]
        ids           (N,) int32/64   image ids, ascending within a bucket
        pivot_words   (W, G) uint64   pivot codes
        band_cum      (G*(bits+1)+1,) first bucket of (group g, band b) at
                                      index g*(bits+1)+b; group ends at b=bits+1
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
        self.n_words = (self.nbytes + 7) // 8
        self.bucket_words = bucket_words
        self.bucket_offsets = bucket_offsets
        self.ids = ids
        self.pivot_words = pivot_words
        self.band_cum = band_cum
        self.probe_keys = probe_keys
        self.probe_buckets = probe_buckets
        self.hash_seed = int(hash_seed)
        self._columns = tuple(np.ascontiguousarray(w) for w in bucket_words)
        self._pivot_columns = tuple(np.ascontiguousarray(w) for w in pivot_words)
        self._sizes = np.diff(bucket_offsets).astype(ids.dtype)
        # bincount's weights are float64 anyway: converted once, not per query.
        self._sizes_f = self._sizes.astype(np.float64)
        self._img_cum = bucket_offsets[band_cum]
        # First and last non-empty band of each group (see _PivotBounds).
        n_groups = self.pivot_words.shape[1]
        filled = np.diff(band_cum).reshape(n_groups, self.bits + 1) > 0
        any_filled = filled.any(axis=1)
        self._band_min = np.where(any_filled, np.argmax(filled, axis=1), self.bits + 1)
        self._band_max = np.where(any_filled, self.bits - np.argmax(filled[:, ::-1], axis=1), -1)
        self._dtype = _dist_dtype(self.bits)
        self._shell_masks = {}
        self.costs = _unit_costs(self.n_words)

    # ---- building ----------------------------------------------------------
    @classmethod
    def build(cls, codes, bits):
        """Index packed codes (N, code_bytes(bits)) uint8; image id = row number."""
        bits = int(bits)
        codes = _check_codes(codes, bits)
        n = len(codes)
        words = _to_words(codes)
        n_words = words.shape[1]
        id_dtype = np.int32 if n < 2**31 else np.int64

        # Group equal codes: a stable sort keeps ids ascending within a bucket.
        if n_words == 1:
            order = np.argsort(words[:, 0], kind="stable")
        else:
            order = np.lexsort(tuple(words[:, j] for j in range(n_words - 1, -1, -1)))
        sorted_words = words[order]
        if n:
            new_bucket = np.ones(n, dtype=bool)
            new_bucket[1:] = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
            starts = np.flatnonzero(new_bucket)
        else:
            starts = np.empty(0, dtype=np.int64)
        unique_words = sorted_words[starts]
        offsets = np.append(starts, n).astype(np.int64)
        sizes = np.diff(offsets)
        u = len(starts)

        pivots = _choose_pivots(unique_words, sizes, bits)
        group, band = _assign_to_pivots(unique_words, pivots, bits)

        # Scan order: by (group, band); within a cell keep code order.
        perm = np.lexsort((band, group))
        new_sizes = sizes[perm]
        new_offsets = np.zeros(u + 1, dtype=np.int64)
        np.cumsum(new_sizes, out=new_offsets[1:])
        ids = order[_concat_ranges(offsets[:-1][perm], offsets[1:][perm])].astype(id_dtype)
        bucket_words = np.ascontiguousarray(unique_words[perm].T)

        n_bands = bits + 1
        cell_counts = np.bincount(group.astype(np.int64) * n_bands + band,
                                  minlength=len(pivots) * n_bands)
        band_cum = np.zeros(len(pivots) * n_bands + 1, dtype=np.int64)
        np.cumsum(cell_counts, out=band_cum[1:])

        columns = tuple(bucket_words)
        seed = 0
        while True:
            keys = _hash_words(columns, seed)
            key_order = np.argsort(keys, kind="stable")
            sorted_keys = keys[key_order]
            if not np.any(sorted_keys[1:] == sorted_keys[:-1]):
                break
            # Two distinct codes with one 64-bit key: pick another hash.
            seed += 1
            if seed > 16:
                raise RuntimeError("cannot find a collision-free hash for the codes")
        return cls(bits, n, bucket_words, new_offsets, ids,
                   np.ascontiguousarray(pivots.T), band_cum,
                   np.ascontiguousarray(sorted_keys), key_order.astype(id_dtype), seed)

    # ---- persistence -------------------------------------------------------
    def save(self, path, fingerprint):
        """Write the index to `path` (.npz) atomically, tagged with `fingerprint`.

        The fingerprint is any string the caller derives from the database
        (count, modification time, ...); load() compares it to decide whether
        the cached index is still valid.
        """
        path = Path(path)
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays.update(format_version=np.array(FORMAT_VERSION), bits=np.array(self.bits),
                      count=np.array(self.count), hash_seed=np.array(self.hash_seed),
                      fingerprint=np.array(str(fingerprint)))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path, expected_fingerprint):
        """The index saved at `path`, or None when it is missing, unreadable,
        from another format version or built for another fingerprint (the
        caller then rebuilds and saves)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format_version"]) != FORMAT_VERSION:
                    return None
                if str(data["fingerprint"]) != str(expected_fingerprint):
                    return None
                arrays = {name: data[name] for name in cls._ARRAYS}
                return cls(int(data["bits"]), int(data["count"]),
                           hash_seed=int(data["hash_seed"]), **arrays)
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
            # A truncated or foreign file is a stale cache, not a user error.
            return None

    @classmethod
    def load_or_build(cls, path, fingerprint, get_codes, bits):
        """Cached index at `path` if its fingerprint matches, else build it from
        get_codes() and save it there.  Returns (index, rebuilt: bool)."""
        index = cls.load(path, fingerprint)
        if index is not None and index.bits == int(bits):
            return index, False
        index = cls.build(get_codes(), bits)
        index.save(path, fingerprint)
        return index, True

    # ---- introspection -----------------------------------------------------
    @property
    def n_buckets(self):
        return len(self._sizes)

    @property
    def n_pivots(self):
        return self.pivot_words.shape[1]

    def memory_bytes(self):
        """Bytes held by the index's arrays, derived ones included."""
        arrays = [getattr(self, name) for name in self._ARRAYS]
        arrays += [self._sizes, self._sizes_f, self._img_cum, self._band_min, self._band_max]
        return int(sum(a.nbytes for a in arrays))

    # ---- coarse stage ------------------------------------------------------
    def coarse(self, query_code, min_candidates, max_radius=None):
        """Images within the smallest radius holding >= min_candidates images.

        Grows the radius 0, 1, 2, ... and stops at the first radius R whose
        ball holds at least min_candidates images, or at max_radius (default:
        no limit; the whole index when min_candidates > count).  All images at
        distance <= R are returned, ordered by (hamming, id).
        """
        qwords = _query_words(query_code, self.bits)
        limit = self.bits if max_radius is None else max(0, min(int(max_radius), self.bits))
        need = max(0, int(min_candidates))
        if self.count == 0:
            return CoarseResult(np.empty(0, np.int64), np.empty(0, np.int32), 0)

        # Shell 0 (one probe) then further shells while enumerating them is
        # cheaper than the scan that would otherwise be needed.
        found_buckets, found_dist = [], []
        found = 0
        bounds = None
        r = 0
        while True:
            b = self._probe_shell(qwords, r)
            if len(b):
                found_buckets.append(b)
                found_dist.append(np.full(len(b), r, dtype=np.int32))
                found += int(self._sizes[b].sum())
            if found >= need or r >= limit:
                return self._expand(found_buckets, found_dist, r)
            r += 1
            n_probes = math.comb(self.bits, r)
            if n_probes > MAX_SHELL_PROBES:
                break
            if bounds is None:
                bounds = _PivotBounds(self, qwords)
            r_lb = bounds.radius_lower_bound(need, r, limit)
            if n_probes * self.costs["probe"] >= bounds.scan_cost(r_lb):
                break
        if bounds is None:
            bounds = _PivotBounds(self, qwords)
        return self._scan(qwords, bounds, need, r, limit)

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

    def _scan(self, qwords, bounds, need, r_min, limit):
        """Exact coarse search by scanning unique codes (pivot runs or all)."""
        r_s = bounds.radius_lower_bound(need, r_min, limit)
        # The runs may need several growing steps; once they have cost as
        # much as one contiguous scan of every code would, switch to that
        # scan: total work stays within about twice the cheaper strategy.
        costs = self.costs
        full_cost = self.n_buckets * costs["scan"]
        spent = bounds.runs_cost(r_s)
        if spent >= full_cost:
            return self._full_scan(qwords, need, limit)

        lo, hi = bounds.cells(r_s)
        scanned_b = [_concat_ranges(self.band_cum[lo], self.band_cum[hi])]
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
            r_next = _first_true(
                lambda r: cum[r] + bounds.upper_bound(r) - base_ub >= need, r_s + 1, limit)
            new_lo, new_hi = bounds.cells(r_next)
            # Old runs over the same (possibly larger) set of groups.
            lo, hi = bounds.cells(r_s, len(new_lo))
            starts = np.concatenate([self.band_cum[new_lo], self.band_cum[hi]])
            stops = np.concatenate([self.band_cum[lo], self.band_cum[new_hi]])
            spent += costs["step"] + costs["gather"] * int(stops.sum() - starts.sum())
            if spent >= full_cost:
                return self._full_scan(qwords, need, limit)
            new_b = _concat_ranges(starts, stops)
            scanned_b.append(new_b)
            scanned_d.append(self._bucket_distances(new_b, qwords))
            lo, hi, r_s = new_lo, new_hi, r_next
        keep = [d <= radius for d in scanned_d]
        return self._expand([b[m] for b, m in zip(scanned_b, keep)],
                            [d[m] for d, m in zip(scanned_d, keep)], radius)

    def _full_scan(self, qwords, need, limit):
        d = _distances_to(self._columns, qwords, self._dtype)
        cum = np.cumsum(np.bincount(d, weights=self._sizes_f, minlength=self.bits + 1))
        radius = int(shell_radius(cum, need, limit))
        b = np.flatnonzero(d <= radius)
        return self._expand([b], [d[b]], radius)

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
        buckets = np.concatenate(bucket_parts)
        dists = np.concatenate(dist_parts).astype(np.int32)
        starts = self.bucket_offsets[buckets]
        stops = self.bucket_offsets[buckets + 1]
        ids = self.ids[_concat_ranges(starts, stops)].astype(np.int64)
        ham = np.repeat(dists, stops - starts)
        order = np.lexsort((ids, ham))
        return CoarseResult(ids[order], ham[order], int(radius))

    # ---- fine stage ----------------------------------------------------------
    def search(self, query_code, query_fc7, fc7_lookup, k, min_candidates=None,
               max_radius=None):
        """Coarse-to-fine top-k: coarse candidates re-ranked by fc7 distance.

        fc7_lookup(ids) must return the fc7 rows (len(ids), D), float32 or
        float16, for an int64 id array; it is called once per query, with the
        ids in ascending order (friendlier to a B-tree store).  min_candidates
        defaults to default_min_candidates(k).  Ties in fc7 distance are
        ordered by id ascending.
        """
        k = int(k)
        if min_candidates is None:
            min_candidates = default_min_candidates(k)
        coarse = self.coarse(query_code, min_candidates, max_radius)
        order = np.argsort(coarse.ids, kind="stable")
        ids = coarse.ids[order]
        ham = coarse.hamming[order]
        if len(ids):
            rows = fc7_lookup(ids)
            d2 = fc7_sq_distances(rows, query_fc7)
        else:
            d2 = np.empty(0, dtype=np.float32)
        if len(d2) != len(ids):
            raise ValueError(f"fc7_lookup returned {len(d2)} rows for {len(ids)} ids")
        top = np.lexsort((ids, d2))[:max(k, 0)]
        return SearchResult(ids[top], ham[top], np.sqrt(d2[top].astype(np.float64)), len(ids),
                            coarse.radius)


def _first_true(predicate, lo, hi):
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


class _PivotBounds:
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

    def __init__(self, index, qwords):
        self.index = index
        self.n_bands = index.bits + 1
        dq = _distances_to(index._pivot_columns, qwords, index._dtype).astype(np.int64)
        gap = np.maximum(np.maximum(dq - index._band_max, index._band_min - dq), 0)
        order = np.argsort(gap, kind="stable")
        self.gaps = gap[order]
        self.dq = dq[order]
        self.base = order * self.n_bands
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
            hi = np.minimum(dq + (r + 1), self.n_bands) + base
            got = self._cells[(r, n_groups)] = (lo, hi)
        return got

    def upper_bound(self, r):
        """Images in the runs at radius r: every image within r is among them."""
        got = self._ub.get(r)
        if got is None:
            lo, hi = self.cells(r)
            img_cum = self.index._img_cum
            got = self._ub[r] = int(img_cum[hi].sum() - img_cum[lo].sum())
        return got

    def radius_lower_bound(self, need, r_min, limit):
        """Smallest r in [r_min, limit] whose runs hold >= need images (else limit):
        no smaller radius can gather `need` images."""
        return _first_true(lambda r: self.upper_bound(r) >= need, r_min, limit)

    def runs_cost(self, r):
        """Estimated cost of one step scanning the runs at radius r."""
        lo, hi = self.cells(r)
        band_cum = self.index.band_cum
        in_runs = int(band_cum[hi].sum() - band_cum[lo].sum())
        costs = self.index.costs
        return costs["step"] + in_runs * costs["gather"]

    def scan_cost(self, r):
        """Estimated cost of the cheaper scan (runs or all codes) at radius r."""
        return min(self.runs_cost(r), self.index.n_buckets * self.index.costs["scan"])


# Rows per block of fc7_sq_distances's work buffer: ~1 MB of float32, so the
# differences are written and read back in cache (and the buffer is reused)
# instead of a new (M, D) array going through memory.
_FC7_BLOCK_BYTES = 1 << 20


def fc7_sq_distances(rows, query_fc7):
    """Squared Euclidean distances (float32) of fc7 rows (M, D) to a query (D,).

    Every row goes through the same float32 arithmetic: its difference to the
    query (float16 rows are widened first) is written to a contiguous float32
    buffer and reduced by numpy.vecdot, a generalized ufunc whose core is one
    whole row, i.e. one call of the same dot routine (BLAS sdot) per row.  So
    identical rows give identical distances wherever they sit in memory or in
    the block: the basis of the exact tie rules.  (einsum is not safe here: it
    splits rows longer than numpy's buffer, 8192 values, at offsets that
    depend on the row's position.)
    """
    q = np.asarray(query_fc7, dtype=np.float32).ravel()
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != q.shape[0]:
        raise ValueError(f"fc7 rows {rows.shape} do not match the query's {q.shape[0]} values")
    m, dim = rows.shape
    out = np.empty(m, dtype=np.float32)
    step = max(1, _FC7_BLOCK_BYTES // (4 * max(dim, 1)))
    buf = np.empty((min(step, m), dim), dtype=np.float32)
    for lo in range(0, m, step):
        diff = buf[:min(m - lo, step)]
        np.subtract(rows[lo:lo + len(diff)], q, out=diff, dtype=np.float32)
        np.vecdot(diff, diff, out=out[lo:lo + len(diff)])
    return out


def brute_force_search(codes, fc7_all, query_code, query_fc7, k, max_radius=None, bits=None):
    """The slow reference: exhaustive Hamming over all N codes, keep those
    within max_radius (all when None), rank them by fc7 distance with ties by
    id.  Returns a SearchResult like HashIndex.search."""
    codes = np.asarray(codes, dtype=np.uint8)
    bits = 8 * codes.shape[1] if bits is None else int(bits)
    ham = hamming_distances(codes, query_code, bits).astype(np.int32)
    ids = np.arange(len(codes), dtype=np.int64)
    if max_radius is not None:
        keep = ham <= int(max_radius)
        ids, ham = ids[keep], ham[keep]
    d2 = fc7_sq_distances(np.asarray(fc7_all)[ids], query_fc7)
    top = np.lexsort((ids, d2))[:max(int(k), 0)]
    # The radius of the ball searched: max_radius, or the farthest code.
    radius = int(max_radius) if max_radius is not None else int(ham.max()) if len(ham) else 0
    return SearchResult(ids[top], ham[top], np.sqrt(d2[top].astype(np.float64)), len(ids),
                        radius)


# ---- pivots ------------------------------------------------------------------
def _choose_pivots(unique_words, sizes, bits):
    """Pivot codes for the pruned scan: the most populated buckets, kept only
    when far enough from the pivots already chosen.

    Hash codes cluster around modes (many images share the code of their
    kind), and the biggest buckets sit at those modes, so these pivots land
    near cluster centres.  The separation (bits // 8) keeps several pivots
    from crowding into one cluster.  Equal sizes are broken by a fixed-seed
    shuffle so indexes are reproducible.  Only speed depends on this choice.
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


def _assign_to_pivots(unique_words, pivots, bits, chunk=4096):
    """Nearest pivot (group) and distance to it (band) for every unique code."""
    u = len(unique_words)
    dtype = _dist_dtype(bits)
    group = np.empty(u, dtype=np.int32)
    band = np.empty(u, dtype=np.int64)
    pivot_cols = [np.ascontiguousarray(pivots[:, j]) for j in range(pivots.shape[1])]
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
