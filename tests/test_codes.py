"""dlbhc.codes: the code format (threshold, packing, width, pad bits) and
Hamming distances, against the bit-by-bit reference."""
import numpy as np
import pytest

from dlbhc.codes import (CODE_THRESHOLD, code_bytes, codes_within, group_equal_codes,
                         hamming_distances, hamming_matrix, pack_codes, scan_distances,
                         to_words)
from dlbhc.index import HashIndex
from dlbhc.reference import naive_hamming


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
def test_scan_kernels_match_bit_by_bit_reference(bits):
    """The exhaustive scan's C kernels (faiss) on whole words: every
    distance, and the codes within a radius, for widths the threshold kernel
    takes (1, 2, 4, 8 words) and others (the fallback)."""
    rng = np.random.default_rng(bits)
    codes = pack_codes(rng.random((700, bits)).astype(np.float32))
    codes[::5] = codes[1]
    query = pack_codes(rng.random(bits).astype(np.float32))
    expected = naive_hamming(codes, query, bits)
    rows = np.ascontiguousarray(to_words(codes))
    qwords = to_words(query[None, :])[0]
    assert np.array_equal(scan_distances(rows, qwords), expected)
    for radius in (0, int(expected.min()), int(np.median(expected)), bits):
        pos, dist = codes_within(rows, qwords, radius)
        assert pos.dtype == np.int64 and dist.dtype == np.int32
        assert np.array_equal(pos, np.flatnonzero(expected <= radius))
        assert np.array_equal(dist, expected[pos])
