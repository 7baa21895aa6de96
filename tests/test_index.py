"""dlbhc.search.index: the bucket table's coarse search (every strategy), the
batched coarse-to-fine search against the brute-force reference, and the
cached index file (the code format's own tests are in test_codes.py)."""
import os

import numpy as np
import pytest

from dlbhc.search.codes import code_bytes, pack_codes
from dlbhc.search.index import HashIndex
from dlbhc.search.params import default_min_candidates
from dlbhc.search.results import SearchResults
from dlbhc_testing.reference import brute_force_search, reference_coarse
from dlbhc.search.rerank import fc7_sq_distances, rank_by_distance
from helpers import clustered_codes, codes_from_ints

# Cost tables that force one coarse strategy (the results must not change).
STRATEGIES = {
    "default": None,
    # enumerate flip patterns as far as MAX_SHELL_PROBES allows
    "probe": {"probe": 1e-9, "gather": 1.0, "scan": 1.0, "step": 0.0},
    # pivot runs, never the full scan
    "runs": {"probe": 1e12, "gather": 0.0, "scan": 1.0, "step": 0.0},
    # contiguous scan of every unique code
    "full": {"probe": 1e12, "gather": 1.0, "scan": 0.0, "step": 0.0},
    # runs whose growing steps soon cost more than a full scan: switch midway
    "switch": {"probe": 1e12, "gather": 1.0, "scan": 20.0, "step": 500.0},
}


def _with_strategy(index, strategy):
    if STRATEGIES[strategy] is not None:
        index.costs = dict(STRATEGIES[strategy])
    return index


# ---- coarse stage ------------------------------------------------------------
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("bits", [5, 12, 20, 48, 128, 200])
def test_coarse_equals_exhaustive_rule(bits, strategy):
    rng = np.random.default_rng(1000 + bits)
    codes = clustered_codes(rng, 1500, bits)
    index = _with_strategy(HashIndex.build(codes, bits), strategy)
    queries = np.concatenate([clustered_codes(rng, 10, bits), codes[:5]])
    for i, query in enumerate(queries):
        for min_candidates, max_radius in ((1, None), (40, None), (700, None), (5000, None),
                                           (300, bits // 4), (0, None)):
            ids, ham, radius = reference_coarse(codes, query, bits, min_candidates, max_radius)
            got = index.coarse(query, min_candidates, max_radius)
            assert got.radius == radius, (i, min_candidates, max_radius)
            assert np.array_equal(got.ids, ids)
            assert np.array_equal(got.hamming, ham)
            assert got.ids.dtype == np.int64


@pytest.mark.parametrize("strategy", ["default", "full", "switch"])
@pytest.mark.parametrize("sample", [3, 300, 100000])
@pytest.mark.parametrize("bits", [20, 128, 200])
def test_small_index_is_exact_whatever_its_sample_suggests(monkeypatch, bits, sample, strategy):
    """A small index probes the shells up to the radius a sample of its
    codes suggests, else scans every image's code: a sample of 3 images
    misjudges the radius either way, and the result must still be the
    rule's (the scans of unique codes after pivot runs, in "switch", too)."""
    import dlbhc.search.index as index_module
    monkeypatch.setattr(index_module, "RADIUS_SAMPLE", sample)
    rng = np.random.default_rng(bits)
    codes = clustered_codes(rng, 4000, bits, n_centres=30, flip_p=0.05)
    index = _with_strategy(HashIndex.build(codes, bits), strategy)
    for query in np.concatenate([clustered_codes(rng, 6, bits), codes[:3]]):
        for need, max_radius in ((1, None), (200, None), (3000, None), (500, bits // 8)):
            ids, ham, radius = reference_coarse(codes, query, bits, need, max_radius)
            got = index.coarse(query, need, max_radius)
            assert got.radius == radius
            assert np.array_equal(got.ids, ids) and np.array_equal(got.hamming, ham)


def test_coarse_growth_stops_at_the_first_radius_with_enough_images():
    # 8-bit codes, query 0; distances by id: 3, 0, 1, 1, 2, 3, 5
    codes = codes_from_ints([0b00000111, 0, 0b10000000, 0b00000001, 0b00011000,
                             0b11100000, 0b11111000], 8)
    index = HashIndex.build(codes, 8)
    q = codes_from_ints([0], 8)[0]
    # radius 0 holds 1 image, radius 1 holds 3, radius 2 holds 4, radius 3 holds 6
    r = index.coarse(q, 3)
    assert (r.radius, r.ids.tolist(), r.hamming.tolist()) == (1, [1, 2, 3], [0, 1, 1])
    r = index.coarse(q, 4)
    assert (r.radius, r.ids.tolist()) == (2, [1, 2, 3, 4])
    # 5 wanted: radius 3, and both images at distance 3 (ids 0 and 5) come
    # in, ordered by id, although one would have been enough
    r = index.coarse(q, 5)
    assert (r.radius, r.ids.tolist(), r.hamming.tolist()) == (3, [1, 2, 3, 4, 0, 5],
                                                             [0, 1, 1, 2, 3, 3])
    # more than the index holds: everything, radius grown to the code length
    r = index.coarse(q, 100)
    assert (r.radius, r.ids.tolist()) == (8, [1, 2, 3, 4, 0, 5, 6])
    # ... unless max_radius stops the growth first
    r = index.coarse(q, 100, max_radius=2)
    assert (r.radius, r.ids.tolist()) == (2, [1, 2, 3, 4])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_empty_neighbourhood_still_returns_the_nearest_images(strategy):
    # 16-bit codes; nothing within distance 9 of the query 0
    values = [0b1111111111000000, 0b0000001111111111, 0b1111111111110000,
              0b1111111111111111, 0b0101010101111111]
    codes = codes_from_ints(values, 16)
    index = _with_strategy(HashIndex.build(codes, 16), strategy)
    q = codes_from_ints([0], 16)[0]
    r = index.coarse(q, 1)
    assert (r.radius, r.ids.tolist(), r.hamming.tolist()) == (10, [0, 1], [10, 10])
    r = index.coarse(q, 3)
    assert (r.radius, r.ids.tolist()) == (11, [0, 1, 4])
    r = index.coarse(q, 1, max_radius=5)
    assert (r.radius, len(r.ids)) == (5, 0)


def test_empty_index_returns_nothing():
    index = HashIndex.build(np.zeros((0, 6), np.uint8), 48)
    r = index.coarse(np.zeros(6, np.uint8), 10)
    assert len(r.ids) == 0 and len(r.hamming) == 0
    s = index.search(np.zeros((1, 6), np.uint8), np.zeros((1, 4), np.float32),
                     lambda ids: np.zeros((len(ids), 4), np.float32), k=5)[0]
    assert len(s.ids) == 0 and s.candidates == 0


# ---- fine stage --------------------------------------------------------------
def _tied_data(rng, n, bits, dim):
    """Few distinct codes (big buckets, Hamming ties) and duplicated fc7 rows
    (exact fc7 ties), float16 like a half-precision store."""
    distinct = pack_codes(rng.random((7, bits)).astype(np.float32))
    codes = distinct[rng.integers(0, 7, n)]
    pool = rng.standard_normal((n // 3, dim)).astype(np.float16)
    fc7 = pool[rng.integers(0, len(pool), n)]
    return codes, fc7


@pytest.mark.parametrize("bits", [12, 20, 48, 128])
def test_search_covering_everything_equals_brute_force_ties_included(bits):
    rng = np.random.default_rng(bits)
    codes, fc7 = _tied_data(rng, 600, bits, 24)
    index = HashIndex.build(codes, bits)
    for i in range(8):
        q_code, q_fc7 = codes[i * 11], fc7[i * 7].astype(np.float32)
        fast = index.search(q_code[None], q_fc7[None], lambda ids: fc7[ids], k=600,
                            min_candidates=600)[0]
        slow = brute_force_search(codes, fc7, q_code, q_fc7, k=600, bits=bits)[0]
        assert fast.candidates == 600
        assert np.array_equal(fast.ids, slow.ids)
        assert np.array_equal(fast.hamming, slow.hamming)
        assert np.array_equal(fast.l2, slow.l2)
        # the duplicated fc7 rows produce real ties, and they are in id order
        tied = np.flatnonzero(np.diff(fast.l2) == 0)
        assert len(tied) > 0
        assert np.all(fast.ids[tied] < fast.ids[tied + 1])


def test_search_with_a_radius_equals_brute_force_within_that_radius():
    rng = np.random.default_rng(7)
    bits = 20
    codes = clustered_codes(rng, 2000, bits)
    fc7 = rng.standard_normal((2000, 16)).astype(np.float32)
    index = HashIndex.build(codes, bits)
    for i in range(10):
        q_code, q_fc7 = codes[i], rng.standard_normal(16).astype(np.float32)
        fast = index.search(q_code[None], q_fc7[None], lambda ids: fc7[ids], k=50)[0]
        assert fast.candidates >= default_min_candidates(50)
        slow = brute_force_search(codes, fc7, q_code, q_fc7, k=50, max_radius=fast.radius)[0]
        assert slow.candidates == fast.candidates
        assert np.array_equal(fast.ids, slow.ids)
        assert np.array_equal(fast.l2, slow.l2)


def test_batched_search_equals_brute_force_for_every_query_and_source():
    """Many queries at once, faiss-style: row i equals query i's brute-force
    answer within the radius the index stopped at, whether the fc7 rows come
    as an array, a float16 memory map or a lookup function."""
    rng = np.random.default_rng(21)
    bits, n, dim = 48, 1500, 12
    codes = clustered_codes(rng, n, bits)
    fc7 = rng.standard_normal((n, dim)).astype(np.float16)
    q_codes = np.concatenate([clustered_codes(rng, 20, bits), codes[:5]])
    q_fc7 = rng.standard_normal((len(q_codes), dim)).astype(np.float32)
    index = HashIndex.build(codes, bits)
    sources = {"array": fc7, "function": lambda ids: fc7[ids].astype(np.float32)}
    results = {name: index.search(q_codes, q_fc7, src, k=30) for name, src in sources.items()}
    first = results["array"]
    assert isinstance(first, SearchResults) and first.ids.shape == (len(q_codes), 30)
    for other in results.values():
        assert np.array_equal(other.ids, first.ids) and np.array_equal(other.l2, first.l2)
    for i in range(len(q_codes)):
        slow = brute_force_search(codes, fc7, q_codes[i], q_fc7[i], k=30,
                                  max_radius=int(first.radius[i]))
        assert np.array_equal(first.ids[i], slow.ids[0])
        assert np.array_equal(first.hamming[i], slow.hamming[0])
        assert np.array_equal(first.l2[i], slow.l2[0])
        assert first.candidates[i] == slow.candidates[0] >= default_min_candidates(30)
        assert first[i].seconds == first.seconds[i] > 0


def test_search_pads_short_rows_and_k_none_ranks_every_candidate():
    rng = np.random.default_rng(22)
    codes = clustered_codes(rng, 300, 20)
    fc7 = rng.standard_normal((300, 6)).astype(np.float32)
    index = HashIndex.build(codes, 20)
    q_codes, q_fc7 = codes[:4], fc7[:4]
    # max_radius 0: only the query's own bucket, often fewer than k images
    res = index.search(q_codes, q_fc7, fc7, k=50, max_radius=0)
    for i in range(4):
        n = int(res.candidates[i])
        assert n >= 1 and (res.hamming[i, :min(n, 50)] == 0).all()
        assert (res.ids[i, n:] == -1).all() and np.isinf(res.l2[i, n:]).all()
        assert (res.hamming[i, n:] == -1).all()
        assert len(res[i].ids) == min(n, 50)
    # k=None: every candidate, ranked; the width is the largest candidate set
    full = index.search(q_codes, q_fc7, fc7, None, min_candidates=60)
    assert full.ids.shape[1] == full.candidates.max()
    for i in range(4):
        n = int(full.candidates[i])
        ids, _, _ = reference_coarse(codes, q_codes[i], 20, 60)
        assert sorted(full.ids[i, :n].tolist()) == sorted(ids.tolist())
        assert np.all(np.diff(full.l2[i, :n]) >= 0)
        top = index.search(q_codes[i:i + 1], q_fc7[i:i + 1], fc7, 10, min_candidates=60)
        assert np.array_equal(top.ids[0], full.ids[i, :10])


def test_search_rejects_mismatched_queries():
    codes = clustered_codes(np.random.default_rng(23), 50, 12)
    index = HashIndex.build(codes, 12)
    fc7 = np.zeros((50, 4), np.float32)
    with pytest.raises(ValueError, match="query fc7"):
        index.search(codes[:3], fc7[:2], fc7, 5)
    with pytest.raises(ValueError, match="query codes must be uint8"):
        index.search(codes[0], fc7[:1], fc7, 5)   # one code, not a batch (1, B)
    with pytest.raises(ValueError, match="do not match the query"):
        index.search(codes[:1], np.zeros((1, 5), np.float32), fc7, 5)


def test_fc7_lookup_is_called_once_with_the_candidates_in_ascending_order():
    rng = np.random.default_rng(3)
    codes = clustered_codes(rng, 800, 48)
    fc7 = rng.standard_normal((800, 8)).astype(np.float32)
    index = HashIndex.build(codes, 48)
    calls = []

    def lookup(ids):
        calls.append(ids.copy())
        return fc7[ids]
    result = index.search(codes[:1], fc7[:1], lookup, k=10, min_candidates=100)[0]
    coarse = index.coarse(codes[0], 100)
    assert len(calls) == 1
    assert calls[0].dtype == np.int64
    assert np.array_equal(calls[0], np.sort(coarse.ids))
    assert result.ids[0] == 0 and result.l2[0] == 0   # the query's own image
    assert len(result.ids) == 10


def test_fc7_distances_do_not_depend_on_where_a_row_sits():
    rng = np.random.default_rng(5)
    row = rng.standard_normal(4099).astype(np.float32)
    q = rng.standard_normal(4099).astype(np.float32)
    block = rng.standard_normal((9, 4099)).astype(np.float32)
    block[[2, 7]] = row
    # an odd byte offset makes the buffer unaligned
    raw = np.zeros(4099 * 4 + 1, np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(1, 4099)
    unaligned[0] = row
    d = fc7_sq_distances(block, q)
    assert d[2] == d[7] == fc7_sq_distances(row[None, :], q)[0] == \
        fc7_sq_distances(unaligned, q)[0]
    np.testing.assert_allclose(d, ((block.astype(np.float64) - q) ** 2).sum(axis=1), rtol=1e-5)


def test_top_k_selection_equals_the_full_sort_with_ties_at_the_boundary():
    rng = np.random.default_rng(6)
    ids = np.sort(rng.choice(10_000, 600, replace=False))
    d2 = rng.integers(0, 40, 600).astype(np.float32)   # many equal distances
    full = np.lexsort((ids, d2))
    for k in (0, 1, 7, 15, 16, 17, 299, 599, 600, 1000, None):
        want = full if k is None else full[:k]
        assert np.array_equal(rank_by_distance(ids, d2, k), want), k


def test_default_min_candidates_is_twice_k():
    assert default_min_candidates(1000) == 2000
    assert default_min_candidates(1) == 2


# ---- the cached index file ---------------------------------------------------
def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(11)
    codes = clustered_codes(rng, 1200, 20)
    index = HashIndex.build(codes, 20)
    path = tmp_path / "db.lmdb.index.npz"
    index.save(path, "count=1200|mtime=42")
    assert os.listdir(tmp_path) == ["db.lmdb.index.npz"]   # no temp file left
    loaded = HashIndex.load(path, "count=1200|mtime=42")
    assert loaded is not None
    assert (loaded.bits, loaded.count, loaded.n_buckets) == (20, 1200, index.n_buckets)
    for name in HashIndex._ARRAYS:
        assert np.array_equal(getattr(loaded, name), getattr(index, name)), name
    for query in codes[:20]:
        a, b = index.coarse(query, 150), loaded.coarse(query, 150)
        assert np.array_equal(a.ids, b.ids) and a.radius == b.radius
    with open(path, "rb") as f:
        assert f.read(2) == b"PK"   # a plain .npz (zip of .npy), no pickle
    np.load(path, allow_pickle=False).close()


def test_stale_missing_or_damaged_cache_loads_as_none_and_is_rebuilt(tmp_path):
    rng = np.random.default_rng(12)
    codes = clustered_codes(rng, 300, 12)
    path = tmp_path / "idx.npz"
    assert HashIndex.load(path, "v1") is None   # missing
    HashIndex.build(codes, 12).save(path, "v1")
    assert HashIndex.load(path, "v1") is not None
    assert HashIndex.load(path, "v2") is None   # the database changed

    built = []

    def get_codes():
        built.append(1)
        return codes
    index, rebuilt = HashIndex.load_or_build(path, "v2", get_codes, 12)
    assert rebuilt and built == [1] and index.count == 300
    index, rebuilt = HashIndex.load_or_build(path, "v2", get_codes, 12)
    assert not rebuilt and built == [1]

    path.write_bytes(path.read_bytes()[:100])   # truncated by a crash
    assert HashIndex.load(path, "v2") is None
    path.write_bytes(b"not an index at all")
    assert HashIndex.load(path, "v2") is None


def test_memory_bytes_counts_the_tables():
    rng = np.random.default_rng(13)
    codes = clustered_codes(rng, 1000, 128)
    index = HashIndex.build(codes, 128)
    assert index.memory_bytes() >= index.bucket_words.nbytes + index.ids.nbytes
    assert index.n_buckets <= 1000 and index.n_pivots >= 1
    assert code_bytes(128) == 16 and code_bytes(12) == 2
