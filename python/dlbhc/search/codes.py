"""The binary code format, in one place: threshold, packing, width, checks
and Hamming distances.

A code is ``numpy.packbits(latent > CODE_THRESHOLD, axis=-1)``: bit j of a
code is bit ``7 - j % 8`` of byte ``j // 8`` (big-endian within each byte),
so a ``bits``-bit code takes ``code_bytes(bits) = ceil(bits / 8)`` bytes and
the unused low bits of the last byte ("pad bits") are zero.  The model
packs codes with pack_codes, the store records CODE_THRESHOLD and checks
widths with code_bytes, and the index, metrics and evaluate.py all measure
distances with the functions here.

For speed, codes are widened to whole 64-bit words (zero bytes appended:
``to_words``) so that one XOR and one popcount handle 64 bits; the word
byte order does not matter because XOR and popcount are bitwise.

The coarse stage's exhaustive scan (HammingBall) is the project's own C
kernel, csrc/hamming_ball.c, built and loaded by native.py; everything else
here is numpy.  Never imports Caffe, the feature store or faiss.
"""
import ctypes
import math
import threading

import numpy as np

from . import native

# The latent layer's sigmoid output above this is a 1 bit (the paper's rule).
CODE_THRESHOLD = 0.5
MAX_BITS = 1024


def code_bytes(bits):
    """Bytes in one packed code of `bits` bits (ValueError outside 1..MAX_BITS)."""
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    return (bits + 7) // 8


def pad_mask(bits):
    """Mask of the pad bits in the last byte of a packed code."""
    spare = 8 * code_bytes(bits) - bits
    return (1 << spare) - 1


def distance_dtype(bits):
    """Smallest unsigned type holding a Hamming distance of `bits`-bit codes:
    bitwise_count of a uint64 is uint8, sums of words need uint16 past 255."""
    return np.uint8 if int(bits) <= 255 else np.uint16


def pack_codes(latent):
    """Binary codes from latent activations: packbits(latent > CODE_THRESHOLD).

    latent (N, bits) -> uint8 (N, code_bytes(bits)); a 1-D latent gives one
    code of shape (code_bytes(bits),).  Big-endian bit order; pad bits zero.
    """
    latent = np.asarray(latent)
    if latent.ndim not in (1, 2):
        raise ValueError(f"latent must be 1-D or 2-D, got shape {latent.shape}")
    code_bytes(latent.shape[-1])
    return np.packbits(latent > CODE_THRESHOLD, axis=-1)


def code_bits(latent):
    """The codes of latent activations (N, bits) as float32 0/1 rows (the
    bits pack_codes packs): the database side of the asymmetric fine stage."""
    return (np.asarray(latent) > CODE_THRESHOLD).astype(np.float32)


def check_codes(codes, bits, what="codes"):
    """`codes` as a uint8 (N, code_bytes(bits)) array with zero pad bits, or
    ValueError naming `what` and the problem."""
    codes = np.asarray(codes)
    nbytes = code_bytes(bits)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != nbytes:
        raise ValueError(f"{what} must be uint8 (N, {nbytes}) for {bits} bits, "
                         f"got {codes.dtype} {codes.shape}")
    mask = pad_mask(bits)
    if mask and len(codes) and np.any(codes[:, -1] & mask):
        raise ValueError(f"{what} have pad bits set: they were not packed from "
                         f"{bits}-bit latents with pack_codes")
    return codes


def to_words(codes):
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


def query_bytes(query_code, bits):
    """One checked query code (B,) as bytes (what the C scan takes).

    Once per query on the search path: the common case (a uint8 code of the
    right width) costs a few attribute checks and one copy, and nothing of
    numpy's beyond tobytes (each numpy call costs microseconds with caches
    cold, as they are between queries); anything else goes through
    check_codes for its message."""
    nbytes = code_bytes(bits)
    if type(query_code) is np.ndarray and query_code.dtype == np.uint8 \
            and query_code.shape == (nbytes,):
        code = query_code.tobytes()
        if not code[-1] & pad_mask(bits):
            return code
    return check_codes(np.asarray(query_code, dtype=np.uint8).reshape(1, -1), bits,
                       "query code")[0].tobytes()


def code_words(code):
    """A packed code as bytes (query_bytes') -> its W words, zero padded (a
    copy), as to_words widens the database's codes."""
    return np.frombuffer(code.ljust(8 * ((len(code) + 7) // 8), b"\0"), np.uint64).copy()


def query_words(query_code, bits):
    """One checked query code (B,) as its W words (a copy)."""
    return code_words(query_bytes(query_code, bits))


def word_columns(words):
    """(N, W) uint64 -> tuple of W contiguous (N,) arrays (fast per-word ops)."""
    return tuple(np.ascontiguousarray(words[:, j]) for j in range(words.shape[1]))


def distances_to_words(columns, qwords, dtype):
    """Hamming distances of the codes held in word columns to a query's words."""
    out = np.bitwise_count(np.bitwise_xor(columns[0], qwords[0]))
    if dtype != out.dtype:
        out = out.astype(dtype)
    tmp = np.empty_like(columns[0])
    for col, qw in zip(columns[1:], qwords[1:]):
        np.bitwise_xor(col, qw, out=tmp)
        out += np.bitwise_count(tmp)
    return out


class HammingBall:
    """The coarse stage's exhaustive scan over a fixed table of codes, one C
    call per query (csrc/hamming_ball.c, built by native.py): the stopping
    radius (the smallest Hamming radius whose ball holds `need` images, at
    most `limit`: index.shell_radius's rule) and every code within it, in
    (distance, position) order.

        ball = HammingBall(rows, weights, sample)
        positions, distances, radius = ball.search(query_bytes(q, bits), need, limit)

    rows: (N, W) uint64, C-contiguous (codes as whole words, zero padded);
    weights: (N,) images per row, e.g. a bucket's size (None: one each);
    sample: positions of a fixed sample of rows, for search's probe_radius.
    Exact: distances equal hamming_distances'.  Scratch and output room are
    per thread (the service searches from several threads; the C call
    releases the GIL) and reused across queries: a fresh allocation per
    query would cost a map and unmap of the table's size.
    """

    def __init__(self, rows, weights=None, sample=None):
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint64 or rows.ndim != 2 \
                or not rows.flags.c_contiguous:
            raise ValueError("rows must be a C-contiguous uint64 (N, W) array")
        self.rows = rows
        self.n, self.n_words = rows.shape
        self.weights = None
        if weights is not None:
            self.weights = np.ascontiguousarray(weights, dtype=np.int64)
            if self.weights.shape != (self.n,):
                raise ValueError(f"{len(self.weights)} weights for {self.n} rows")
        self._search = _ball_library().dlbhc_ball_search
        self._table = (rows.ctypes.data, self.n,
                       None if self.weights is None else self.weights.ctypes.data)
        self.sample = None
        self._sample = (None, 0, None, 0.0)   # rows, count, weights, share of images
        if sample is not None:
            images = self.n if weights is None else int(self.weights.sum())
            sample = np.unique(np.asarray(sample, dtype=np.int64))
            self.sample = (np.ascontiguousarray(rows[sample]),
                           None if weights is None else self.weights[sample].copy())
            sampled = len(sample) if weights is None else int(self.sample[1].sum())
            self._sample = (self.sample[0].ctypes.data, len(sample),
                            None if weights is None else self.sample[1].ctypes.data,
                            sampled / max(images, 1))
        self._local = threading.local()

    def _buffers(self):
        """This thread's room: kept codes (scratch), the ball's positions and
        distances (arrays, their addresses), and the radius (a ctypes int)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            room = max(self.n, 1)
            arrays = (np.empty(room, np.int64), np.empty(room, np.uint16),
                      np.empty(room, np.int64), np.empty(room, np.int32))
            radius = ctypes.c_int32(0)
            buf = self._local.buf = (arrays, tuple(a.ctypes.data for a in arrays),
                                     radius, ctypes.addressof(radius))
        return buf

    def search(self, code, need, limit, probe_radius=-1):
        """(positions int64, distances int32, radius): the codes within the
        stopping radius, ordered by (distance, position).

        code: the query's packed code as bytes (query_bytes), widened to the
        rows' words in C.  probe_radius >= 0 (with a sample): first the
        sample's radius for `need` scaled to its size; when that is at most
        probe_radius the ball is likely within a few shells of the query
        (cheaper to enumerate than this scan), and None is returned
        without scanning."""
        if len(code) > 8 * self.n_words:
            raise ValueError(f"a {len(code)}-byte code for {8 * self.n_words}-byte rows")
        (_, _, pos, dist), ptrs, radius, radius_ptr = self._buffers()
        rows, n, weights = self._table
        sample_rows, sample_n, sample_weights, share = self._sample
        if sample_rows is None:
            probe_radius = -1
        total = self._search(rows, n, weights, self.n_words, code, len(code), need, limit,
                             sample_rows, sample_n, sample_weights, math.ceil(need * share),
                             probe_radius, ptrs[0], ptrs[1], ptrs[2], ptrs[3], radius_ptr)
        if total < 0:
            return None
        return pos[:total].copy(), dist[:total].copy(), radius.value


_BALL_LIBRARY = []


def _ball_library():
    """csrc/hamming_ball.c, loaded and its signature declared (once)."""
    if not _BALL_LIBRARY:
        lib = native.load("hamming_ball")
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.dlbhc_ball_search.argtypes = (ptr, i64, ptr, i32, ctypes.c_char_p, i32, i64, i32,
                                          ptr, i64, ptr, i64, i32,
                                          ptr, ptr, ptr, ptr, ptr)
        lib.dlbhc_ball_search.restype = i64
        _BALL_LIBRARY.append(lib)
    return _BALL_LIBRARY[0]


def hamming_distances(codes, query_code, bits=None):
    """Hamming distance of every code (N, B) to query_code (B,).

    Returns uint8 (uint16 for codes over 255 bits) of shape (N,).  `bits`
    only serves validation; by default it is 8 * B.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, bytes), got shape {codes.shape}")
    bits = 8 * codes.shape[1] if bits is None else int(bits)
    check_codes(codes, bits)
    qwords = query_words(query_code, bits)
    if not len(codes):
        return np.empty(0, dtype=distance_dtype(bits))
    # Strided columns of the (N, W) view: no copy of the database.
    words = to_words(codes)
    columns = tuple(words[:, j] for j in range(words.shape[1]))
    return distances_to_words(columns, qwords, distance_dtype(bits))


def hamming_matrix(db_codes, query_codes, bits=None):
    """Hamming distances (Q, N) between query codes (Q, B) and database codes (N, B).

    uint8 (uint16 over 255 bits).  Memory is Q * N * 9 bytes at the peak:
    callers with large Q pass batches of queries.
    """
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    query_codes = np.asarray(query_codes, dtype=np.uint8)
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    check_codes(db_codes, bits, "database codes")
    check_codes(query_codes, bits, "query codes")
    dtype = distance_dtype(bits)
    db_cols = word_columns(to_words(db_codes))
    q_words = to_words(query_codes)
    out = np.zeros((len(query_codes), len(db_codes)), dtype=dtype)
    tmp = np.empty(out.shape, dtype=np.uint64)
    for j, col in enumerate(db_cols):
        np.bitwise_xor(q_words[:, j, None], col[None, :], out=tmp)
        out += np.bitwise_count(tmp).astype(dtype, copy=False)
    return out


def group_equal_codes(words):
    """Group identical codes: (order, starts) such that words[order] is sorted
    with equal codes adjacent, ids ascending within a group (a stable sort),
    and group g spans order[starts[g]:starts[g+1]] (starts ends with N).

    words: (N, W) uint64 from to_words.  The bucket table of the index is
    built from these groups.
    """
    n, n_words = words.shape
    if n_words == 1:
        order = np.argsort(words[:, 0], kind="stable")
    else:
        order = np.lexsort(tuple(words[:, j] for j in range(n_words - 1, -1, -1)))
    sorted_words = words[order]
    if n:
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
        starts = np.flatnonzero(new_group)
    else:
        starts = np.empty(0, dtype=np.int64)
    return order, np.append(starts, n).astype(np.int64)


def concat_ranges(starts, stops):
    """Concatenation of arange(starts[i], stops[i]) for all i (vectorised):
    the members of groups laid out as group_equal_codes's (CSR offsets), or
    of the pivot runs' cells."""
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
