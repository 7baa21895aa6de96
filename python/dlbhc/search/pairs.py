"""All pairs of codes within a Hamming radius (a self-join), and the pairs
that also pass a distance threshold on the re-rank feature.

Images whose codes are equal share a bucket (one unique code); every pair
inside a bucket is at distance 0.  Pairs of distinct codes within radius r
are found bucket against bucket by probing: for each flip pattern of 1..r
bits (probing.flip_masks, C(bits, 1) + ... + C(bits, r) patterns) every
unique code is flipped at once and looked up among the unique codes
(sorted 64-bit keys, probing.probe_table).  The cost is U x (number of
patterns) lookups for U unique codes plus the pairs found: it grows with
the collection and with the near pairs, never with N^2.  (Splitting the
code into r + 1 substrings and joining on equal substrings, multi-index
hashing, costs the sum of the squared substring bucket sizes instead,
which on clustered codes is dominated by pairs that are far apart.)

Probing pays off while the patterns are few: C(48, <= 2) = 1,177, but
C(48, <= 8) is 377 million.  When the patterns outnumber the unique codes
(PROBE_SHARE), the pairs of unique codes are scanned instead, block by
block (U^2 / 2 distances of a few word operations each, over the unique
codes only); method="probe" or "scan" forces one.

NearPairs keeps the answer by bucket, so a bucket of s identical codes
costs one entry, not s^2 / 2 pairs; image pairs are expanded on demand,
in chunks (image_pairs).  close_pairs then keeps the image pairs whose
feature rows (fc7, normalised to unit length) are within a threshold.
"""
import math

import numpy as np

from .codes import check_codes, to_words, word_columns
from .probing import flip_masks, hash_words, probe_table

# Image pairs per chunk of NearPairs.image_pairs (two int64 ids + distance).
PAIR_CHUNK = 1 << 21
# Bytes of feature rows gathered at once by close_pairs.
ROWS_CHUNK_BYTES = 64 << 20
# Probe while the flip patterns are at most this share of the unique codes
# (a lookup costs several times a distance), else scan the unique pairs.
PROBE_SHARE = 0.25
# Distances held at once by the scan (a block of unique codes against all).
SCAN_BLOCK = 1 << 22
METHODS = ("auto", "probe", "scan")


class NearPairs:
    """The pairs of images within `radius`, held by bucket of equal codes.

    members: image ids bucket by bucket (ascending within a bucket); sizes
    (U,): images per bucket; a, b, dist: the pairs of distinct buckets
    (a < b) at Hamming distance dist (1..radius)."""

    def __init__(self, radius, members, sizes, a, b, dist):
        self.radius = int(radius)
        self.members, self.sizes = members, sizes.astype(np.int64)
        self.a, self.b, self.dist = a, b, dist
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def n_code_pairs(self):
        return len(self.a)

    def count(self):
        """The number of image pairs within the radius (computed, not listed)."""
        s = self.sizes
        return int((s * (s - 1) // 2).sum()) + int((s[self.a] * s[self.b]).sum())

    def image_pairs(self, chunk=PAIR_CHUNK):
        """(i, j, hamming) arrays of image pairs, i < j, in chunks of at most
        `chunk` pairs: first the pairs inside buckets, then across."""
        multi = np.flatnonzero(self.sizes > 1)
        yield from self._expand(multi, multi, np.zeros(len(multi), np.int32), chunk, True)
        yield from self._expand(self.a, self.b, self.dist, chunk, False)

    def _expand(self, a, b, dist, chunk, inside):
        work = self.sizes[a] * self.sizes[b]
        ends = np.cumsum(work)
        start = 0
        while start < len(a):
            if work[start] > chunk:
                # one big pair of buckets, cut into ranges of its products
                for lo in range(0, int(work[start]), chunk):
                    t = np.arange(lo, min(lo + chunk, int(work[start])), dtype=np.int64)
                    yield self._pairs_of(a[start:start + 1], b[start:start + 1],
                                         dist[start:start + 1], np.zeros(len(t), np.int64), t,
                                         inside)
                start += 1
                continue
            stop = int(np.searchsorted(ends, ends[start] - work[start] + chunk, side="right"))
            w = work[start:stop]
            k = np.repeat(np.arange(stop - start), w)
            t = np.arange(len(k)) - np.repeat(np.cumsum(w) - w, w)
            yield self._pairs_of(a[start:stop], b[start:stop], dist[start:stop], k, t, inside)
            start = stop

    def _pairs_of(self, a, b, dist, k, t, inside):
        """Image pairs number t (of sizes[a] x sizes[b]) of bucket pairs k."""
        sb = self.sizes[b][k]
        ti, tj = t // sb, t % sb
        if inside:
            keep = ti < tj
            k, ti, tj = k[keep], ti[keep], tj[keep]
        i = self.members[self.offsets[a[k]] + ti]
        j = self.members[self.offsets[b[k]] + tj]
        return np.minimum(i, j), np.maximum(i, j), dist[k]


def near_pairs(codes, bits, radius, ids=None, method="auto"):
    """NearPairs of `codes` (uint8 (N, B), packed) within Hamming `radius`.

    ids: the images to consider (e.g. the live ones), positions in `codes`;
    the pairs name positions in `codes` either way.  method: "probe" (flip
    patterns), "scan" (all pairs of unique codes) or "auto" (the cheaper,
    by pattern_count and PROBE_SHARE)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    codes = check_codes(codes, bits)
    radius = int(radius)
    if not 0 <= radius <= bits:
        raise ValueError(f"radius must be in 0..{bits}, got {radius}")
    chosen = np.arange(len(codes)) if ids is None else np.asarray(ids, dtype=np.int64)
    words = to_words(codes[chosen])
    if words.shape[1] == 1:
        unique, inverse, sizes = np.unique(words[:, 0], return_inverse=True, return_counts=True)
        columns = (unique,)
    else:
        unique, inverse, sizes = np.unique(words, axis=0, return_inverse=True,
                                           return_counts=True)
        columns = word_columns(unique)
    members = chosen[np.argsort(inverse.ravel(), kind="stable")]
    if method == "auto":
        method = "probe" if pattern_count(bits, radius) <= PROBE_SHARE * len(sizes) else "scan"
    a, b, dist = (_bucket_pairs if method == "probe" else _scanned_pairs)(columns, bits, radius)
    return NearPairs(radius, members, sizes, a, b, dist)


def _bucket_pairs(columns, bits, radius):
    """Pairs (a < b) of unique codes within radius 1..radius, by flipping
    every unique code with each pattern and looking the result up."""
    found_a, found_b, found_d = [], [], []
    if len(columns[0]) < 2:
        radius = 0
    else:
        keys, order, seed = probe_table(columns)
    for r in range(1, radius + 1):
        masks = flip_masks(bits, r, len(columns))
        for m in range(len(masks[0])):
            probes = tuple(col ^ mask[m] for col, mask in zip(columns, masks))
            probe_keys = hash_words(probes, seed)
            pos = np.searchsorted(keys, probe_keys)
            np.minimum(pos, len(keys) - 1, out=pos)
            src = np.flatnonzero(keys[pos] == probe_keys)
            dst = order[pos[src]]
            if len(columns) > 1:
                same = np.ones(len(src), dtype=bool)
                for col, probe in zip(columns, probes):
                    same &= col[dst] == probe[src]
                src, dst = src[same], dst[same]
            keep = src < dst           # each pair is found from both ends
            found_a.append(src[keep])
            found_b.append(dst[keep])
            found_d.append(np.full(int(keep.sum()), r, dtype=np.int32))
    if not found_a:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.int32)
    return (np.concatenate(found_a).astype(np.int64), np.concatenate(found_b).astype(np.int64),
            np.concatenate(found_d))


def pattern_count(bits, radius):
    """Flip patterns of 1..radius bits: C(bits, 1) + ... + C(bits, radius)."""
    return sum(math.comb(int(bits), r) for r in range(1, int(radius) + 1))


def _scanned_pairs(columns, bits, radius):
    """Pairs (a < b) of unique codes within radius 1..radius, by computing
    the distance of every unique code to every later one, block by block."""
    n = len(columns[0])
    block = max(1, SCAN_BLOCK // max(n, 1))
    found_a, found_b, found_d = [], [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        dist = np.zeros((hi - lo, n - lo), dtype=np.uint16)
        for col in columns:
            dist += np.bitwise_count(col[lo:hi, None] ^ col[None, lo:])
        row, col = np.nonzero((dist <= radius) & (dist > 0))
        keep = col > row                 # later codes only (the block's own triangle)
        row, col = row[keep], col[keep]
        found_a.append(row + lo)
        found_b.append(col + lo)
        found_d.append(dist[row, col].astype(np.int32))
    if not found_a:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.int32)
    return (np.concatenate(found_a).astype(np.int64), np.concatenate(found_b).astype(np.int64),
            np.concatenate(found_d))


def unit_rows(rows):
    """Rows (n, d) as float32 scaled to unit length (zero rows stay zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


def pair_distances(rows, i, j):
    """Euclidean distances between the unit-length feature rows of images i
    and j (rows: (N, d), a memory map is fine; 0 = same direction, at most 2)."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out = np.empty(len(i), dtype=np.float32)
    step = max(1, ROWS_CHUNK_BYTES // max(1, 8 * rows.shape[1]))
    for lo in range(0, len(i), step):
        x = unit_rows(rows[i[lo:lo + step]])
        y = unit_rows(rows[j[lo:lo + step]])
        out[lo:lo + step] = np.sqrt(np.maximum(((x - y) ** 2).sum(axis=1), 0))
    return out


def close_pairs(pairs, rows, threshold, near=None, ratio=1.0, k=0):
    """(i, j, hamming, distance) of the NearPairs that pass the distance rule
    on unit-length feature rows (pair_distances), i < j, by (i, j).

    A pair passes when its distance d is at most `near`, or at most
    `threshold` and at most ratio x min(scale(i), scale(j)): an image's scale
    is the distance to its k-th nearest image within the Hamming radius,
    capped at threshold / ratio (the cap when it has fewer).  With k = 0 (or
    ratio 1) the rule is d <= threshold.  The scale makes the threshold
    local: a copy is much closer to its original than the original's k-th
    neighbour is, wherever in the feature space the two lie."""
    near = 0.0 if near is None else float(near)
    local = k > 0 and ratio < 1
    cap = threshold / ratio if local else threshold
    parts = []
    for i, j, d in pairs.image_pairs():
        dist = pair_distances(rows, i, j)
        keep = dist <= max(cap, near)
        parts.append((i[keep], j[keep], d[keep], dist[keep]))
    if not parts:
        return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32),
                np.empty(0, np.float32))
    i, j, d, dist = (np.concatenate(p) for p in zip(*parts))
    keep = dist <= threshold
    if local:
        scale = kth_distances(i, j, dist, k, cap)
        keep &= dist <= ratio * np.minimum(scale[i], scale[j])
    keep |= dist <= near
    i, j, d, dist = i[keep], j[keep], d[keep], dist[keep]
    order = np.lexsort((j, i))
    return i[order], j[order], d[order], dist[order]


def kth_distances(i, j, dist, k, cap):
    """Per image (up to the largest id), the k-th smallest distance of its
    pairs (i, j, dist), or `cap` for an image with fewer than k pairs."""
    n = int(max(i.max(initial=-1), j.max(initial=-1))) + 1
    ends = np.concatenate([i, j])
    both = np.concatenate([dist, dist])
    order = np.lexsort((both, ends))
    counts = np.bincount(ends, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    scale = np.full(n, cap, dtype=np.float64)
    enough = np.flatnonzero(counts >= k)
    scale[enough] = np.minimum(both[order][starts[enough] + k - 1], cap)
    return scale
