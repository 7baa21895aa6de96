"""Probing: the buckets at Hamming distance exactly r from a query, found by
enumerating every code at that distance and looking each up.

The cheap coarse strategy when C(bits, r) is small.  Its machinery (flip
masks, a 64-bit hash of multi-word codes, the sorted key table, the shells
enumerated so far) is self-contained: it needs the unique codes as word
columns and nothing else of the index, so it lives apart from the bucket
table (index.py) and the other strategies (pivots.py, codes.HammingBall).
"""
import numpy as np

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


def flip_masks(bits, r, n_words):
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


def _mix_int(x):
    """_mix64 for one Python int."""
    x ^= x >> 30
    x = (x * int(_MIX1)) & _U64
    x ^= x >> 27
    x = (x * int(_MIX2)) & _U64
    return x ^ (x >> 31)


def _hash_int(words, seed):
    """hash_words for one code given as Python ints (same keys)."""
    h = seed
    for w in words:
        h ^= _mix_int((w + int(_HASH_MULT)) & _U64)
        h = _mix_int(h)
    return h


def hash_words(columns, seed):
    """64-bit keys for multi-word codes (single-word codes are their own key).

    Collisions between distinct codes are possible in principle; probe_table
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


def probe_table(columns):
    """Sorted 64-bit keys of the unique codes (word columns), the bucket of
    each key, and the hash seed: a seed under which no two codes share a key
    (tried from 0 upwards)."""
    for seed in range(17):
        keys = hash_words(columns, seed)
        key_order = np.argsort(keys, kind="stable")
        sorted_keys = keys[key_order]
        if not np.any(sorted_keys[1:] == sorted_keys[:-1]):
            return np.ascontiguousarray(sorted_keys), key_order, seed
        # Two distinct codes with one 64-bit key: try another hash.
    raise RuntimeError("cannot find a collision-free hash for the codes")


class ShellProber:
    """Lookups of enumerated codes among the unique codes.

    columns: the unique codes as word columns (bucket b's code is
    columns[j][b]); keys, buckets, seed: probe_table's sorted keys, the
    bucket of each key and the hash seed.  The flip masks of each radius
    are made on first use and kept."""

    def __init__(self, bits, columns, keys, buckets, seed):
        self.bits = int(bits)
        self.columns = columns
        self.keys, self.buckets, self.seed = keys, buckets, int(seed)
        self.masks = {}

    def shell(self, qwords, r):
        """Buckets at Hamming distance exactly r, by enumerating flip patterns."""
        if r == 0:
            probes = tuple(np.array([w], dtype=np.uint64) for w in qwords)
        else:
            masks = self.masks.get(r)
            if masks is None:
                masks = flip_masks(self.bits, r, len(self.columns))
                self.masks[r] = masks
            probes = tuple(np.bitwise_xor(m, w) for m, w in zip(masks, qwords))
        keys = hash_words(probes, self.seed)
        pos = np.searchsorted(self.keys, keys)
        np.minimum(pos, len(self.keys) - 1, out=pos)
        hit = np.flatnonzero(self.keys[pos] == keys)
        buckets = self.buckets[pos[hit]]
        if len(self.columns) > 1:
            # Keys are hashes: confirm that the bucket's code is the probe.
            same = np.ones(len(hit), dtype=bool)
            for col, probe in zip(self.columns, probes):
                same &= col[buckets] == probe[hit]
            buckets = buckets[same]
        return buckets


class ProbedShells:
    """The shells enumerated so far for one query: their buckets, distances
    and image count (sizes: images per bucket)."""

    def __init__(self, prober, sizes):
        self.prober, self.sizes = prober, sizes
        self.buckets, self.dists, self.images = [], [], 0

    def add(self, qwords, r):
        """Enumerate shell r and take in its buckets."""
        b = self.prober.shell(qwords, r)
        if len(b):
            self.buckets.append(b)
            self.dists.append(np.full(len(b), r, dtype=np.int32))
            self.images += int(self.sizes[b].sum())
