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

Pure numpy: never imports Caffe or the feature store.
"""
import threading

import numpy as np

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


def query_words(query_code, bits):
    """One checked query code (B,) as its W words (a copy)."""
    q = np.asarray(query_code, dtype=np.uint8).reshape(1, -1)
    check_codes(q, bits, "query code")
    return to_words(q)[0].copy()


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


_FAISS = []


def scan_kernel():
    """faiss, whose C Hamming kernels the exhaustive scan uses (imported
    once; an index loads it when built, so no query pays the import)."""
    if not _FAISS:
        import faiss
        _FAISS.append(faiss)
    return _FAISS[0]


def scan_distances(rows, qwords, out=None):
    """Hamming distances (int32) of every code of `rows` to one query.

    rows: (U, W) uint64, C-contiguous (whole words, zero padded); qwords:
    the query's W words.  The popcount loop is faiss's C kernel
    (faiss.hammings; faiss-cpu is a pinned requirement): one pass over the
    codes, where numpy needs an XOR, a popcount and an add pass per word and
    took ~5-10x as long for a full scan of 100k codes.  Exact either way:
    only the exhaustive strategy of the coarse stage calls it.
    """
    faiss = scan_kernel()
    rows = np.ascontiguousarray(rows, dtype=np.uint64)
    q = np.ascontiguousarray(qwords, dtype=np.uint64)
    n, n_words = rows.shape
    if out is None:
        out = np.empty(n, dtype=np.int32)
    if n:
        faiss.hammings(faiss.swig_ptr(q.view(np.uint8)), faiss.swig_ptr(rows.view(np.uint8)),
                       1, n, 8 * n_words, faiss.swig_ptr(out))
    return out


# Words per code faiss's threshold kernel (match_hamming_thres) takes.
THRESHOLD_KERNEL_WORDS = (1, 2, 4, 8)


def codes_within(rows, qwords, radius, buffers=None):
    """The codes of `rows` within Hamming `radius` of one query: their
    positions (int64, ascending) and distances (int32).

    rows, qwords as in scan_distances.  For 1, 2, 4 or 8 words per code it
    is one pass of faiss's C kernel that keeps only the matches
    (match_hamming_thres), so nothing of the size of `rows` goes through
    numpy; other widths compute every distance (scan_distances) and select.
    buffers: a ScanBuffers to reuse (the kernel needs room for every code).
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint64)
    q = np.ascontiguousarray(qwords, dtype=np.uint64)
    n, n_words = rows.shape
    if n_words not in THRESHOLD_KERNEL_WORDS:
        d = scan_distances(rows, q)
        pos = np.flatnonzero(d <= radius)
        return pos, d[pos]
    faiss = scan_kernel()
    pairs, dist = (buffers or ScanBuffers()).get(n)
    found = faiss.match_hamming_thres(faiss.swig_ptr(q.view(np.uint8)),
                                      faiss.swig_ptr(rows.view(np.uint8)), 1, n, int(radius),
                                      8 * n_words, faiss.swig_ptr(pairs), faiss.swig_ptr(dist))
    # pairs holds (query, code) per match
    return pairs[1:2 * found:2].copy(), dist[:found].copy()


class ScanBuffers(threading.local):
    """Per-thread output room of codes_within's kernel (one slot per code:
    pages never written cost nothing, but a fresh allocation per query costs
    a map and unmap of that size)."""

    def get(self, n):
        if getattr(self, "n", -1) < n:
            self.pairs = np.empty(2 * n, dtype=np.int64)
            self.dist = np.empty(n, dtype=np.int32)
            self.n = n
        return self.pairs, self.dist


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
