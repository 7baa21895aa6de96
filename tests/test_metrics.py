"""dlbhc.search.metrics against hand-computed figures and the per-query reference
(dlbhc_testing.reference, itself checked by hand here): mAP@k, P@k, radius
precision, rankings (coarse tie order, fine = the index's search), batching,
plots, table."""
import numpy as np
import pytest

from dlbhc.search import metrics
from dlbhc_testing import reference
from dlbhc.search.codes import hamming_distances, pack_codes
from dlbhc.search.index import HashIndex
from dlbhc.search.params import SearchParams
from helpers import DB_CODES, DB_LABELS, PNG_MAGIC, Q_CODES, Q_LABELS

# ---- per-query measures ------------------------------------------------------
def test_average_precision_at_k_normalises_by_relevant_found_in_top_k():
    rel = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    # top 4 = 1 0 1 0: P@1 = 1, P@3 = 2/3; 2 relevant found -> (1 + 2/3) / 2
    assert reference.average_precision_at_k(rel, 4) == pytest.approx(5 / 6)
    # whole ranking: relevant at 1, 3, 6 -> (1 + 2/3 + 3/6) / 3
    assert reference.average_precision(rel) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # the same with 4 relevant items in the database (one never retrieved)
    assert reference.average_precision(rel, n_relevant=4) == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    # nothing relevant in the top k (or at all): 0, not a division by zero
    assert reference.average_precision_at_k(np.array([0, 0, 1], bool), 2) == 0.0
    assert reference.average_precision(np.zeros(5, bool)) == 0.0
    # batches give the same per-query values
    both = np.stack([rel, np.zeros(6, bool)])
    assert np.allclose(reference.average_precision_at_k(both, 4), [5 / 6, 0])


def test_precision_at_k_and_within_radius():
    rel = np.array([1, 0, 1, 0], dtype=bool)
    assert np.allclose(reference.precision_at_k(rel, 4), [1, 1 / 2, 2 / 3, 1 / 2])
    # radius 2: ids with d <= 2 are 0, 2, 3 -> relevant 0 and 3 -> 2/3
    ham = np.array([1, 5, 2, 0])
    relevant = np.array([1, 1, 0, 1], dtype=bool)
    assert reference.precision_within_radius(ham, relevant, 2) == pytest.approx(2 / 3)
    # an empty ball counts as precision 0
    assert reference.precision_within_radius(np.array([3, 4]), np.array([1, 1], bool), 2) == 0.0


# ---- rankings ----------------------------------------------------------------
def test_coarse_ranking_breaks_hamming_ties_by_database_order():
    ranking = reference.coarse_ranking(DB_CODES, Q_CODES, bits=8)
    # q0: d = 2 1 0 1 4 2 -> 2 (0), then 1, 3 (1), then 0, 5 (2), then 4
    assert ranking[0].tolist() == [2, 1, 3, 0, 5, 4]
    # q2: d = 5 4 5 6 1 7 -> 4, 1, then 0 before 2 (both 5), 3, 5
    assert ranking[2].tolist() == [4, 1, 0, 2, 3, 5]


def test_fine_ranking_reranks_the_candidates_and_appends_the_rest():
    # fc7 (one value): q0 has 0; ids 1 and 3 both at 1 (a tie), id 2 at 3
    db_fc7 = np.array([[9.0], [1.0], [3.0], [-1.0], [0.5], [0.0]], np.float32)
    q_fc7 = np.zeros((3, 1), np.float32)
    ranking, n_cand = reference.fine_ranking(DB_CODES, Q_CODES[:1], db_fc7, q_fc7[:1],
                                           min_candidates=3, bits=8)
    # 3 wanted: radius 1 holds ids 2, 1, 3 -> by |fc7|: 1 and 3 tie at 1
    # (id order), then 2 at 3; then the others in coarse order 0, 5, 4
    assert n_cand.tolist() == [3]
    assert ranking[0].tolist() == [1, 3, 2, 0, 5, 4]


def test_fine_ranking_equals_hash_index_search():
    rng = np.random.default_rng(4)
    bits, n, dim = 20, 1500, 12
    centres = rng.random((6, bits)) < 0.5
    labels = rng.integers(0, 6, n + 30)
    codes = pack_codes((centres[labels] ^ (rng.random((n + 30, bits)) < 0.1)).astype(np.float32))
    # Small integers: every squared distance is an exact integer, and many
    # distinct rows tie.
    fc7 = rng.integers(-3, 4, (n + 30, dim)).astype(np.float32)
    fc7[10:20] = fc7[3]          # duplicated rows too
    db, q = codes[:n], codes[n:]
    ranking, n_cand = reference.fine_ranking(db, q, fc7[:n], fc7[n:], min_candidates=150,
                                             bits=bits)
    index = HashIndex.build(db, bits)
    coarse = reference.coarse_ranking(db, q, bits)
    found = index.search(q, fc7[n:], fc7[:n], k=n, min_candidates=150)
    ties = 0
    for i in range(len(q)):
        s = found[i]
        ties += int(np.sum(np.diff(s.l2) == 0))
        assert s.candidates == n_cand[i]
        assert np.array_equal(ranking[i, :n_cand[i]], s.ids)
        assert np.array_equal(ranking[i, n_cand[i]:], coarse[i, n_cand[i]:])
        assert sorted(ranking[i].tolist()) == list(range(n))
    assert ties > 100   # the tie rule was exercised


def test_exact_sq_distances_tie_equal_rows_and_match_float64():
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((7, 300)).astype(np.float32)
    rows[5] = rows[1]
    q = rng.standard_normal(300).astype(np.float32)
    d = reference.exact_sq_distances(rows, q)
    assert d.dtype == np.float64 and d[1] == d[5]
    ref = ((rows.astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1)
    np.testing.assert_allclose(d, ref, rtol=1e-13)


# ---- evaluate -----------------------------------------------------------------
def test_evaluate_reproduces_hand_computed_figures():
    res = metrics.evaluate(DB_CODES, DB_LABELS, Q_CODES, Q_LABELS, params=SearchParams(top_k=3),
                           bits=8)
    c = res["coarse"]
    # Relevance along the coarse rankings (label equal to the query's):
    #   q0: 2 1 3 0 5 4 -> 0 0 1 1 0 1
    #   q1: 4 0 5 1 3 2 -> 0 0 0 0 0 0   (label 2 is nowhere)
    #   q2: 4 1 0 2 3 5 -> 1 0 1 0 1 0
    # AP@3: q0 top 0 0 1 -> P@3 = 1/3 over 1 found = 1/3
    #       q1 -> 0;  q2 top 1 0 1 -> (1 + 2/3) / 2 = 5/6
    assert c["map_at_k"] == pytest.approx((1 / 3 + 0 + 5 / 6) / 3)
    # AP over all: q0 (1/3 + 2/4 + 3/6) / 3 = 4/9; q1 0; q2 (1 + 2/3 + 3/5) / 3 = 34/45
    assert c["map"] == pytest.approx((4 / 9 + 0 + 34 / 45) / 3)
    # P@1..3: q0 0 0 1/3; q1 0 0 0; q2 1 1/2 2/3
    assert np.allclose(c["precision_curve"], [1 / 3, 1 / 6, 1 / 3])
    assert c["precision_at_k"] == pytest.approx(1 / 3)
    # radius 2: q0 retrieves 2 1 3 0 5 (relevant 3, 0) -> 2/5; q1 nothing
    # within 2 -> 0 by convention; q2 retrieves 4 -> 1
    assert c["precision_radius"] == pytest.approx((2 / 5 + 0 + 1) / 3)
    assert c["radius"] == 2
    # PR by radius at 1: q0 {2, 1, 3}: P 1/3, R 1/3 (3 relevant); q1 empty:
    # P 0, R 0; q2 {4}: P 1, R 1/3
    assert c["pr_radius"]["precision"][1] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert c["pr_radius"]["recall"][1] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert c["pr_radius"]["recall"][8] == pytest.approx((1 + 0 + 1) / 3)
    assert (res["k"], res["n_database"], res["n_queries"]) == (3, 6, 3)
    assert "fine" not in res


def test_evaluate_fine_hand_computed():
    db_fc7 = np.array([[9.0], [1.0], [3.0], [-1.0], [0.5], [0.0]], np.float32)
    q_fc7 = np.zeros((1, 1), np.float32)
    res = metrics.evaluate(DB_CODES, DB_LABELS, Q_CODES[:1], Q_LABELS[:1], db_fc7, q_fc7,
                           SearchParams(top_k=3, candidates=3), bits=8)
    # fine ranking 1 3 2 0 5 4 (see above), labels 1 0 1 0 1 0, query label 0:
    # relevance 0 1 0 1 0 1 -> AP@3 = (1/2) / 1 found; P@3 = 1/3
    f = res["fine"]
    assert f["map_at_k"] == pytest.approx(0.5)
    assert f["precision_at_k"] == pytest.approx(1 / 3)
    # AP over all: (1/2 + 2/4 + 3/6) / 3 = 1/2
    assert f["map"] == pytest.approx(0.5)
    assert f["candidates_mean"] == 3 and f["min_candidates"] == 3


def test_evaluate_in_batches_equals_per_query_reference():
    rng = np.random.default_rng(9)
    bits, n, nq, dim = 12, 700, 45, 6
    labels = rng.integers(0, 5, n + nq)
    centres = rng.random((5, bits)) < 0.5
    codes = pack_codes((centres[labels] ^ (rng.random((n + nq, bits)) < 0.15)).astype(np.float32))
    fc7 = rng.standard_normal((n + nq, dim)).astype(np.float32) + labels[:, None]
    db, q, dbl, ql = codes[:n], codes[n:], labels[:n], labels[n:]
    res = metrics.evaluate(db, dbl, q, ql, fc7[:n], fc7[n:],
                           SearchParams(top_k=100, candidates=60), bits=bits,
                           batch_size=4)
    coarse = reference.coarse_ranking(db, q, bits)
    fine, _ = reference.fine_ranking(db, q, fc7[:n], fc7[n:], 60, bits=bits)
    for name, ranking in (("coarse", coarse), ("fine", fine)):
        rel = dbl[ranking] == ql[:, None]
        assert res[name]["map_at_k"] == pytest.approx(
            np.mean([reference.average_precision_at_k(r, 100) for r in rel]))
        assert res[name]["map"] == pytest.approx(
            np.mean([reference.average_precision(r) for r in rel]))
        assert np.allclose(res[name]["precision_curve"],
                           np.mean([reference.precision_at_k(r, 100) for r in rel], axis=0))
    ham = np.stack([hamming_distances(db, c, bits) for c in q])
    rel_db = dbl[None, :] == ql[:, None]
    assert res["coarse"]["precision_radius"] == pytest.approx(
        np.mean([reference.precision_within_radius(h, r, 2) for h, r in zip(ham, rel_db)]))


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="labels"):
        metrics.evaluate(DB_CODES, DB_LABELS[:3], Q_CODES, Q_LABELS, bits=8)
    with pytest.raises(ValueError, match="fc7"):
        metrics.evaluate(DB_CODES, DB_LABELS, Q_CODES, Q_LABELS,
                         np.zeros((6, 4), np.float32), np.zeros((3, 5), np.float32), bits=8)


# ---- reporting ------------------------------------------------------------------
def test_plots_are_written_as_loadable_pngs(tmp_path):
    db_fc7 = np.arange(6, dtype=np.float32)[:, None]
    res = metrics.evaluate(DB_CODES, DB_LABELS, Q_CODES, Q_LABELS, db_fc7,
                           np.zeros((3, 1), np.float32), SearchParams(top_k=3), bits=8)
    from matplotlib.image import imread
    for plot, name in ((metrics.plot_precision_at_k, "pk.png"),
                       (metrics.plot_precision_recall, "pr.png")):
        path = tmp_path / name
        plot({"8 bits": res, "again": res}, path)
        data = path.read_bytes()
        assert len(data) > 0 and data.startswith(PNG_MAGIC)
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_format_table_lists_both_methods_with_their_figures():
    db_fc7 = np.arange(6, dtype=np.float32)[:, None]
    res = metrics.evaluate(DB_CODES, DB_LABELS, Q_CODES, Q_LABELS, db_fc7,
                           np.zeros((3, 1), np.float32), SearchParams(top_k=3), bits=8)
    table = metrics.format_table(res)
    coarse_line = next(line for line in table.splitlines() if "coarse" in line)
    fine_line = next(line for line in table.splitlines() if "fine" in line)
    assert f"{res['coarse']['map_at_k']:.4f}" in coarse_line
    assert f"{res['coarse']['precision_radius']:.4f}" in coarse_line
    assert f"{res['fine']['map_at_k']:.4f}" in fine_line
