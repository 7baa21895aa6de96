"""dlbhc.search.codes: the code format (threshold, packing, width, pad bits) and
Hamming distances, against the bit-by-bit reference."""
import numpy as np
import pytest

from dlbhc.search.codes import (CODE_THRESHOLD, HammingBall, code_bytes, group_equal_codes,
                         hamming_distances, hamming_matrix, pack_codes, to_words)
from dlbhc.search.index import HashIndex
from dlbhc_testing.reference import naive_hamming


def test_pack_codes_is_big_endian_threshold_half_with_zero_pad_bits():
    latent = np.array([[0.9, 0.1, 0.5, 0.51, 0, 0, 0, 0, 1.0, 0.7],
                       [0.0] * 10], dtype=np.float32)
    codes = pack_codes(latent)
    assert codes.dtype == np.uint8 and codes.shape == (2, 2)
    # bits 0 and 3 set in byte 0 (bit 0 is the most significant); 0.5 is not > 0.5
    assert codes[0, 0] == 0b10010000
    # bits 8, 9 -> the two high bits of byte 1; the 6 pad bits stay zero
    assert codes[0, 1] == 0b11000000
    assert not codes[1].any()
    assert np.array_equal(pack_codes(latent[0]), codes[0])


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 20, 48, 64, 65, 128, 300])
def test_hamming_distances_match_bit_by_bit_reference(bits):
    rng = np.random.default_rng(bits)
    codes = pack_codes(rng.random((257, bits)).astype(np.float32))
    query = pack_codes(rng.random(bits).astype(np.float32))
    expected = naive_hamming(codes, query, bits)
    got = hamming_distances(codes, query, bits)
    assert np.array_equal(got.astype(np.int64), expected)
    queries = codes[:5]
    matrix = hamming_matrix(codes, queries, bits)
    for i in range(5):
        assert np.array_equal(matrix[i].astype(np.int64), naive_hamming(codes, queries[i], bits))


def test_codes_with_wrong_width_or_pad_bits_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        HashIndex.build(np.zeros((3, 3), np.uint8), 12)
    bad = np.zeros((2, 2), np.uint8)
    bad[1, 1] = 0b00000001   # a pad bit of a 12-bit code
    with pytest.raises(ValueError, match="pad bits"):
        HashIndex.build(bad, 12)
    index = HashIndex.build(np.zeros((2, 2), np.uint8), 12)
    with pytest.raises(ValueError, match="pad bits"):
        index.coarse(bad[1], 1)


def test_threshold_and_width_are_the_papers():
    assert CODE_THRESHOLD == 0.5
    assert [code_bytes(b) for b in (1, 8, 9, 12, 48, 128)] == [1, 1, 2, 2, 6, 16]
    with pytest.raises(ValueError, match="bits must be in"):
        code_bytes(0)


def test_group_equal_codes_keeps_ids_ascending_within_a_group():
    rng = np.random.default_rng(4)
    codes = pack_codes(rng.random((400, 70)) < 0.02)   # few distinct codes
    order, starts = group_equal_codes(to_words(codes))
    assert starts[0] == 0 and starts[-1] == 400 and sorted(order.tolist()) == list(range(400))
    distinct = {codes[i].tobytes() for i in range(400)}
    assert len(starts) - 1 == len(distinct)
    for g in range(len(starts) - 1):
        members = order[starts[g]:starts[g + 1]]
        assert np.all(np.diff(members) > 0)
        assert len({codes[i].tobytes() for i in members}) == 1


@pytest.mark.parametrize("bits", [12, 48, 64, 100, 128, 200, 256, 384, 512, 1024])
def test_hamming_ball_matches_bit_by_bit_reference(bits):
    """The exhaustive scan's C kernel (csrc/hamming_ball.c) on whole words,
    for the widths it specialises (1, 2, 4 words) and the generic loop: the
    stopping radius is index.shell_radius's over the exact counts (images
    weighted by rows' bucket sizes, or one each), and the ball every row
    within it in (distance, position) order."""
    from dlbhc.search.index import shell_radius

    rng = np.random.default_rng(bits)
    codes = pack_codes(rng.random((700, bits)).astype(np.float32))
    codes[::5] = codes[1]
    query = pack_codes(rng.random(bits).astype(np.float32))
    expected = naive_hamming(codes, query, bits)
    order = np.lexsort((np.arange(len(codes)), expected))
    rows = np.ascontiguousarray(to_words(codes))
    weights = rng.integers(1, 9, len(codes))
    for w in (None, weights):
        ball = HammingBall(rows, w)
        cum = np.cumsum(np.bincount(expected, weights=w, minlength=bits + 1))
        for need, limit in ((0, bits), (1, bits), (50, bits), (600, bits), (10**6, bits),
                            (10**6, bits // 3), (300, bits // 4), (300, 0), (5, 10**4)):
            radius = int(shell_radius(cum, need, limit))
            pos, dist, got = ball.search(query.tobytes(), need, limit)
            want = order[expected[order] <= radius]
            assert got == radius
            assert pos.dtype == np.int64 and dist.dtype == np.int32
            assert np.array_equal(pos, want)
            assert np.array_equal(dist, expected[want])


def test_hamming_ball_sample_says_when_shells_are_cheaper():
    """With a sample and a probe radius, search first takes the sample's
    radius (for need scaled to the sample's share of the images): at most
    the probe radius, None (the caller probes shells instead); beyond it,
    the whole table's ball as without a sample."""
    rng = np.random.default_rng(9)
    codes = pack_codes(rng.random((2000, 48)).astype(np.float32))
    codes[:600] = codes[0]   # one dense bucket
    rows = np.ascontiguousarray(to_words(codes))
    weights = rng.integers(1, 4, len(codes))
    for w in (None, weights):
        everything = HammingBall(rows, w, sample=np.arange(len(codes)))
        half = HammingBall(rows, w, sample=np.arange(0, len(codes), 2))
        plain = HammingBall(rows, w)
        near, far = codes[0].tobytes(), codes[1500].tobytes()
        for ball in (everything, half):
            # 100 images sit at distance 0 of `near` in the sample too
            assert ball.search(near, 100, 48, probe_radius=0) is None
            # `far`'s ball of 100 lies well beyond shell 1: scanned, as plain
            got, want = ball.search(far, 100, 48, probe_radius=1), plain.search(far, 100, 48)
            assert got is not None and got[2] == want[2] > 1
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        # the full sample's radius is the table's: the decision is exact
        radius = plain.search(far, 100, 48)[2]
        assert everything.search(far, 100, 48, probe_radius=radius) is None
        assert everything.search(far, 100, 48, probe_radius=radius - 1) is not None


def test_hamming_ball_keeps_every_row_of_the_ball_in_any_order():
    """The scan keeps a row only while it is within the radius of the rows
    seen so far: rows sorted farthest first (every row kept) and nearest
    first (few kept) give the same ball."""
    rng = np.random.default_rng(4)
    codes = pack_codes(rng.random((3000, 64)).astype(np.float32))
    query = codes[0]
    d = naive_hamming(codes, query, 64)
    for order in (np.argsort(-d, kind="stable"), np.argsort(d, kind="stable")):
        rows = np.ascontiguousarray(to_words(codes[order]))
        pos, dist, radius = HammingBall(rows).search(query.tobytes(), 400, 64)
        assert radius == np.sort(d)[399]
        assert np.array_equal(np.sort(order[pos]), np.flatnonzero(d <= radius))
        assert np.all(np.diff(dist) >= 0)


def test_hamming_ball_threads_keep_their_own_results():
    """Each thread's search fills its own room (the kernel releases the
    GIL; the service searches from several threads)."""
    import threading

    rng = np.random.default_rng(5)
    codes = pack_codes(rng.random((20000, 64)).astype(np.float32))
    ball, errors = HammingBall(np.ascontiguousarray(to_words(codes))), []

    def worker(seed):
        r = np.random.default_rng(seed)
        for _ in range(30):
            query = pack_codes(r.random(64).astype(np.float32))
            expected = naive_hamming(codes, query, 64)
            pos, _, radius = ball.search(query.tobytes(), 301, 64)
            if radius != np.sort(expected)[300] or \
                    not np.array_equal(np.sort(pos), np.flatnonzero(expected <= radius)):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_hamming_ball_refuses_rows_it_cannot_scan():
    rows = np.zeros((4, 2), dtype=np.uint64)
    with pytest.raises(ValueError, match="C-contiguous uint64"):
        HammingBall(rows.astype(np.int64))
    with pytest.raises(ValueError, match="C-contiguous uint64"):
        HammingBall(np.zeros((2, 4), dtype=np.uint64).T)
    with pytest.raises(ValueError, match="weights"):
        HammingBall(rows, np.ones(3))
    with pytest.raises(ValueError, match="17-byte code for 16-byte rows"):
        HammingBall(rows).search(bytes(17), 1, 128)
    # no rows: an empty ball, the radius grown to the limit (nothing reaches need)
    pos, dist, radius = HammingBall(rows[:0]).search(bytes(16), 10, 100)
    assert (len(pos), len(dist), radius) == (0, 0, 100)
