"""Issue 21 (near-duplicates): all pairs within a Hamming radius, their
feature-distance filter and the groups, checked against brute force on
seeded codes; duplicates.py's outputs and its refusals of bad input."""
import numpy as np
import pytest

from dlbhc.search.groups import components, groups
from dlbhc.search.pairs import close_pairs, near_pairs
from dlbhc_testing.reference import brute_force_groups, brute_force_pairs
from dlbhc_testing.synthetic import clustered_codes, zipf_clustered_codes


def listed(pairs, chunk=None):
    out = {}
    for i, j, d in (pairs.image_pairs() if chunk is None else pairs.image_pairs(chunk)):
        for a, b, h in zip(i.tolist(), j.tolist(), d.tolist()):
            assert a < b and (a, b) not in out
            out[(a, b)] = h
    return out


@pytest.mark.parametrize("bits,radius,seed", [(12, 2, 0), (48, 2, 1), (48, 3, 2), (64, 1, 3),
                                              (100, 2, 4), (20, 0, 5)])
def test_near_pairs_match_brute_force(bits, radius, seed):
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, 400, bits, n_centres=5, flip_p=0.03 if bits > 20 else 0.1)
    codes[50:60] = codes[40]                       # a bucket of identical codes
    pairs = near_pairs(codes, bits, radius)
    truth = {k: h for k, (h, _) in brute_force_pairs(codes, bits, radius).items()}
    assert len(truth) > 50
    assert listed(pairs) == truth
    assert pairs.count() == len(truth)
    # small chunks cut buckets and bucket pairs apart: the same pairs
    assert listed(pairs, chunk=7) == truth


def test_near_pairs_of_chosen_ids_and_edge_cases():
    rng = np.random.default_rng(7)
    codes, _ = zipf_clustered_codes(300, 0, 24, rng, centres=20)
    ids = rng.choice(300, 200, replace=False)
    got = listed(near_pairs(codes, 24, 2, ids=ids))
    truth = {k: h for k, (h, _) in brute_force_pairs(codes, 24, 2, ids=ids).items()}
    assert got == truth and truth
    assert listed(near_pairs(codes[:0], 24, 2)) == {}
    assert listed(near_pairs(codes[:1], 24, 2)) == {}
    with pytest.raises(ValueError, match="radius"):
        near_pairs(codes, 24, -1)


def test_close_pairs_and_groups_match_brute_force():
    rng = np.random.default_rng(11)
    codes = clustered_codes(rng, 300, 32, n_centres=4, flip_p=0.03)
    rows = np.abs(rng.standard_normal((300, 16))).astype(np.float32)
    rows[100:110] = rows[100] * rng.uniform(0.5, 2, (10, 1))   # same direction
    pairs = near_pairs(codes, 32, 2)
    threshold = 0.9
    i, j, d, dist = close_pairs(pairs, rows, threshold)
    truth = brute_force_pairs(codes, 32, 2, rows, threshold)
    assert 10 < len(truth) < pairs.count()
    got = {(a, b): (h, x) for a, b, h, x in zip(i.tolist(), j.tolist(), d.tolist(),
                                                dist.tolist())}
    # pairs within float32 rounding of the threshold may go either way
    near_edge = {k for k, (_, x) in truth.items() if abs(x - threshold) < 1e-5}
    assert set(got) - near_edge == set(truth) - near_edge
    for k in set(got) & set(truth):
        assert got[k][0] == truth[k][0] and abs(got[k][1] - truth[k][1]) < 1e-5
    found = {tuple(g.tolist()) for g in groups(300, i, j)}
    assert found == brute_force_groups(zip(i.tolist(), j.tolist()))


def test_components_chain_and_order():
    # a long chain given in the worst order still becomes one component
    n = 1000
    i = np.arange(n - 1)[::-1]
    assert set(components(n, i, i + 1).tolist()) == {0}
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    found = groups(500, a, b)
    assert {tuple(g.tolist()) for g in found} == brute_force_groups(zip(a.tolist(), b.tolist()))
    assert [len(g) for g in found] == sorted((len(g) for g in found), reverse=True)
