"""The compressed (PCA) re-rank store: the projection (dlbhc.search.pca), its rows
in the feature store (learned once, extended with the same projection on
every append, crash-safe, refused when it does not match), and the fine
stage that ranks by them, against the brute-force reference (no Caffe)."""
import json
import os

import numpy as np
import pytest

from dlbhc.search import pca as pca_module
from dlbhc.search.codes import pack_codes
from dlbhc.errors import UserError
from dlbhc.search.index import HashIndex
from dlbhc.search.metrics import evaluate
from dlbhc.search.params import SearchParams
from dlbhc.search.pca import Projection
from dlbhc_testing.reference import brute_force_search
from dlbhc.search.rerank import ReducedRows
from dlbhc.store import FC7_FILE, PCA_PREFIX, FeatureStore, merge
from helpers import ROOT, clustered_codes, run_script

COMPRESS = ROOT / "python" / "compress.py"
BITS, DIM = 12, 10


def low_rank_rows(rng, n, dim=DIM, rank=3, noise=1e-3):
    basis = rng.standard_normal((rank, dim))
    return (rng.standard_normal((n, rank)) * [5.0, 2.0, 1.0][:rank] @ basis
            + noise * rng.standard_normal((n, dim)) + 3.0).astype(np.float32)


def batch(rng, n, start=0, dim=DIM):
    latent = rng.random((n, BITS)).astype(np.float32)
    infos = [{"path": f"/img/{start + i}.jpg", "label": (start + i) % 3, "seq": start + i}
             for i in range(n)]
    return low_rank_rows(rng, n, dim), latent, pack_codes(latent), infos


def make_store(path, rng, n=40, fc7_dtype="float32", backend="lmdb", dim=DIM, model=None):
    meta = {"bits": BITS, "fc7_dim": dim, "fc7_dtype": fc7_dtype}
    if model:
        meta["model"] = model
    store = FeatureStore.create(path, meta, backend=backend)
    store.append(*batch(rng, n, dim=dim))
    return store


def compress(*args, check=True):
    return run_script(COMPRESS, args, check=check)


# ---- the projection -----------------------------------------------------------
def test_pca_finds_the_subspace_and_keeps_distances():
    rng = np.random.default_rng(0)
    x = low_rank_rows(rng, 500)
    p = Projection.learn(x, 3)
    # the truth from an SVD of the centred sample
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(p.eigenvalues, s[:3] ** 2 / (len(x) - 1), rtol=1e-4)
    np.testing.assert_allclose(np.abs(p.components @ vt[:3].T), np.eye(3), atol=1e-4)
    assert p.info["explained"] > 0.9999 and p.dim == 3 and p.fc7_dim == DIM
    # a rank-3 cloud: PCA-3 distances are the original distances
    y = p.apply(x)
    d_orig = np.linalg.norm(x[:50, None] - x[None, :50], axis=2)
    d_pca = np.linalg.norm(y[:50, None] - y[None, :50], axis=2)
    np.testing.assert_allclose(d_pca, d_orig, rtol=1e-3, atol=1e-2)
    # learning is repeatable to the byte (components' signs fixed)
    assert Projection.learn(x, 3).digest() == p.digest()


def test_whitened_components_have_unit_variance_but_noise_is_not_blown_up():
    rng = np.random.default_rng(1)
    x = low_rank_rows(rng, 2000, rank=3, noise=0.1)
    p = Projection.learn(x, 4, whiten=True)
    y = p.apply(x)
    # variance 1 along the cloud's 3 directions; the 4th (noise, 1e-4 of the
    # largest variance) is damped by the regulariser instead of scaled to 1
    lam = p.eigenvalues
    expected = lam / (lam + pca_module.WHITEN_EPS * lam[0])
    np.testing.assert_allclose(y.var(axis=0, ddof=1), expected, rtol=1e-3)
    assert np.all(expected[:3] > 0.99) and expected[3] < 0.6
    assert Projection.learn(x, 4).name() == "pca4"
    assert Projection.learn(x, 4, whiten=True).name() == "pca4w"


def test_a_rows_projection_depends_on_that_row_alone(monkeypatch, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 700)).astype(np.float32)
    p = Projection.learn(x, 37)
    monkeypatch.setattr(pca_module, "APPLY_BLOCK_ROWS", 64)   # block edges inside x
    whole = p.apply(x)
    for i in (0, 5, 63, 64, 299):
        assert np.array_equal(p.apply(x[i:i + 1])[0], whole[i])
    assert np.array_equal(p.apply(x[17:200]), whole[17:200])
    # float16 rows (as fc7.bin may hold them) are widened, then projected
    half = np.memmap(tmp_path / "h.bin", dtype=np.float16, mode="w+", shape=x.shape)
    half[:] = x
    assert np.array_equal(p.apply(half[40:41]), p.apply(half[:])[40:41])
    assert np.array_equal(p.apply(half), p.apply(np.asarray(half, dtype=np.float32)))
    # a matrix product differs in the last bits (why apply() does not use one)
    np.testing.assert_allclose(whole, (x - p.mean) @ p.components.T, rtol=1e-4, atol=1e-4)


def test_projection_file_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    p = Projection.learn(low_rank_rows(rng, 100), 5, whiten=True, model={"weights_sha1": "ab"})
    sha1 = p.save(tmp_path / "p.npz")
    q = Projection.load(tmp_path / "p.npz")
    assert q.digest() == sha1 == p.digest()
    assert q.info == p.info and q.whiten
    for name in ("mean", "components", "scale", "eigenvalues"):
        assert np.array_equal(getattr(q, name), getattr(p, name))
    (tmp_path / "bad.npz").write_bytes((tmp_path / "p.npz").read_bytes()[:200])
    with pytest.raises(UserError, match="not a projection file"):
        Projection.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="does not exist"):
        Projection.load(tmp_path / "none.npz")
    with pytest.raises(UserError, match="choose 1..10"):
        Projection.learn(low_rank_rows(rng, 100), 11)


# ---- the store's PCA rows -------------------------------------------------------
@pytest.mark.parametrize("backend,fc7_dtype", [("lmdb", "float32"), ("lmdb", "float16"),
                                               ("leveldb", "float32")])
def test_pca_rows_are_the_projection_of_the_stored_fc7(tmp_path, backend, fc7_dtype):
    rng = np.random.default_rng(4)
    store = make_store(tmp_path / "db", rng, fc7_dtype=fc7_dtype, backend=backend)
    projection = store.learn_projection(4)
    record = store.add_pca(projection)
    store.close()
    assert record["dim"] == 4 and not record["whiten"]
    assert sorted(os.listdir(tmp_path / "db")) == sorted(
        [f for f in os.listdir(tmp_path / "db") if not f.startswith(PCA_PREFIX)]
        + [record["projection"], record["rows"]])
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.pca_record == record
        rows = store.pca_rows()
        assert rows.shape == (40, 4) and rows.dtype == np.float32
        assert np.array_equal(rows, store.projection().apply(store.fc7_rows()))
        assert store.projection().digest() == record["projection_sha1"]


def test_appends_use_the_projection_learned_once(tmp_path):
    rng = np.random.default_rng(5)
    store = make_store(tmp_path / "db", rng, n=30, fc7_dtype="float16")
    store.add_pca(store.learn_projection(5, whiten=True), dtype="float16")
    first = dict(store.pca_record)
    projection_bytes = (tmp_path / "db" / first["projection"]).read_bytes()
    # batches far from the first ones: a projection learned again would differ
    for n, start in ((10, 30), (7, 40)):
        fc7, latent, codes, infos = batch(rng, n, start)
        store.append(fc7 * 3 + 50, latent, codes, infos)
    store.close()
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.count == 47 and store.pca_record == first
        assert (tmp_path / "db" / first["projection"]).read_bytes() == projection_bytes
        expected = Projection.load(tmp_path / "db" / first["projection"]).apply(store.fc7_rows())
        assert np.array_equal(store.pca_rows(), expected.astype(np.float16))
        rows_bytes = (tmp_path / "db" / first["rows"]).read_bytes()[:47 * 5 * 2]
    # the same projection applied to all 47 at once writes the same bytes
    compress(tmp_path / "db", "--projection", tmp_path / "db" / first["projection"], "--float16")
    with FeatureStore.open(tmp_path / "db") as store:
        assert (tmp_path / "db" / store.pca_record["rows"]).read_bytes()[:47 * 5 * 2] == rows_bytes


def test_a_crash_before_the_commit_loses_the_batch_and_nothing_else(tmp_path):
    rng = np.random.default_rng(6)
    store = make_store(tmp_path / "db", rng, n=20)
    store.add_pca(store.learn_projection(3))
    record = store.pca_record
    real_commit = store._db.commit

    def crash(items, change):
        change(dict(store.meta))          # rows written, as in a real append ...
        raise KeyboardInterrupt("killed")  # ... then the process dies before the commit
    store._db.commit = crash
    with pytest.raises(KeyboardInterrupt):
        store.append(*batch(rng, 6, 20))
    store._db.commit = real_commit
    store.close()
    rows_file = tmp_path / "db" / record["rows"]
    assert rows_file.stat().st_size == 26 * 3 * 4   # written past the committed count
    with FeatureStore.open(tmp_path / "db", readonly=False) as store:
        assert store.count == 20
        assert np.array_equal(store.pca_rows(), store.projection().apply(store.fc7_rows()))
        store.append(*batch(rng, 4, 20))             # overwrites the dead rows
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.count == 24
        assert np.array_equal(store.pca_rows(), store.projection().apply(store.fc7_rows()))


def test_a_pca_store_added_by_another_process_during_appends_gets_their_rows(tmp_path):
    rng = np.random.default_rng(7)
    writer = make_store(tmp_path / "db", rng, n=25)       # open, as extract.py keeps it
    compress(tmp_path / "db", "--pca", 4)                  # another process
    assert writer.pca_record is None                       # the writer has not looked yet
    writer.append(*batch(rng, 8, 25))
    assert writer.pca_record is not None
    writer.append(*batch(rng, 3, 33))
    writer.close()
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.count == 36
        assert np.array_equal(store.pca_rows(), store.projection().apply(store.fc7_rows()))


def test_replacing_and_removing_the_pca_store(tmp_path):
    rng = np.random.default_rng(8)
    make_store(tmp_path / "db", rng).close()
    compress(tmp_path / "db", "--pca", 4)
    same = compress(tmp_path / "db", "--pca", 4)
    assert "already there" in same.stdout
    compress(tmp_path / "db", "--pca", 3, "--whiten")
    pca_files = sorted(f for f in os.listdir(tmp_path / "db") if f.startswith(PCA_PREFIX))
    with FeatureStore.open(tmp_path / "db") as store:
        record = store.pca_record
        assert (record["dim"], record["whiten"]) == (3, True)
        assert pca_files == sorted([record["projection"], record["rows"]])   # old ones gone
    info = compress(tmp_path / "db", "--info")
    assert "3 values per image, whitened" in info.stdout
    compress(tmp_path / "db", "--remove")
    assert not [f for f in os.listdir(tmp_path / "db") if f.startswith(PCA_PREFIX)]
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.pca_record is None
        with pytest.raises(UserError, match="no PCA re-rank store: make one with"):
            store.projection()


def test_a_projection_that_does_not_match_is_refused(tmp_path):
    rng = np.random.default_rng(9)
    model_a = {"weights": "/m/a.caffemodel", "weights_sha1": "a" * 40}
    model_b = {"weights": "/m/b.caffemodel", "weights_sha1": "b" * 40}
    make_store(tmp_path / "a", rng, model=model_a).close()
    make_store(tmp_path / "wide", rng, dim=DIM + 2, model=model_a).close()
    make_store(tmp_path / "b", rng, model=model_b).close()
    compress(tmp_path / "a", "--pca", 4)
    with FeatureStore.open(tmp_path / "a") as store:
        npz = tmp_path / "a" / store.pca_record["projection"]
    out = compress(tmp_path / "wide", "--projection", npz, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "it projects 10-value features, the database's fc7 has 12 values" in out.stderr
    out = compress(tmp_path / "b", "--projection", npz, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "learned on features of other weights (sha1 aaaaaaaaaaaa" in out.stderr
    # the same model's other database takes it
    make_store(tmp_path / "a2", rng, model=model_a).close()
    compress(tmp_path / "a2", "--projection", npz)
    with FeatureStore.open(tmp_path / "a2") as store:
        assert store.projection().digest() == Projection.load(npz).digest()


def test_a_damaged_pca_store_is_reported_with_what_to_do(tmp_path):
    rng = np.random.default_rng(10)
    make_store(tmp_path / "db", rng).close()
    compress(tmp_path / "db", "--pca", 4)
    with FeatureStore.open(tmp_path / "db") as store:
        record = store.pca_record
    npz, rows = tmp_path / "db" / record["projection"], tmp_path / "db" / record["rows"]
    good_npz, good_rows = npz.read_bytes(), rows.read_bytes()
    rows.write_bytes(good_rows[:-4])
    with FeatureStore.open(tmp_path / "db") as store, \
            pytest.raises(UserError, match=r"holds 636 bytes, the 40 images need 640: rebuild"):
        store.projection()
    rows.write_bytes(good_rows)
    Projection.learn(rng.standard_normal((50, DIM)), 4).save(npz)   # another projection
    with FeatureStore.open(tmp_path / "db") as store, \
            pytest.raises(UserError, match="not the projection the database recorded"):
        store.projection()
    npz.unlink()
    with FeatureStore.open(tmp_path / "db") as store, \
            pytest.raises(UserError, match="is missing: rebuild it with .*--rerank fc7"):
        store.projection()
    npz.write_bytes(good_npz)
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.pca_rows().shape == (40, 4)


def test_merged_shards_do_not_claim_a_shards_pca_store(tmp_path):
    rng = np.random.default_rng(11)
    make_store(tmp_path / "s0", rng, n=10).close()
    compress(tmp_path / "s0", "--pca", 3)
    merge([tmp_path / "s0"], tmp_path / "all")
    with FeatureStore.open(tmp_path / "all") as store:
        assert store.count == 10 and store.pca_record is None
        assert (tmp_path / "all" / FC7_FILE).exists()


# ---- the fine stage by PCA rows --------------------------------------------------
def search_data(seed, n=1200, bits=20, dim=12, dup_every=7):
    """Clustered codes and fc7 with repeated rows (so distances tie and the
    id rule decides), plus a projection and its rows."""
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, n, bits)
    fc7 = np.abs(rng.standard_normal((n, dim))).astype(np.float32)
    fc7[::dup_every] = fc7[1]
    projection = Projection.learn(fc7, 5)
    q = np.concatenate([clustered_codes(rng, 6, bits), codes[:4]])
    q_fc7 = np.concatenate([np.abs(rng.standard_normal((6, dim))), fc7[:4]]).astype(np.float32)
    return codes, fc7, projection, projection.apply(fc7), q, q_fc7


@pytest.mark.parametrize("max_radius", [None, 6, 3])
@pytest.mark.parametrize("rows_as", ["array", "function"])
def test_pca_rerank_equals_brute_force_over_the_pca_rows(max_radius, rows_as):
    codes, fc7, projection, rows, q, q_fc7 = search_data(20)
    index = HashIndex.build(codes, 20)
    source = rows if rows_as == "array" else (lambda ids: rows[ids])
    reduced = ReducedRows(source, projection.apply, exact_top=0, name="pca5")
    for k in (1, 25, 400, 5000):
        # every image within max_radius is a candidate (min_candidates > N)
        got = index.search(q, q_fc7, None, k, min_candidates=10 ** 6, max_radius=max_radius,
                           reduced=reduced)
        truth = brute_force_search(codes, fc7, q, q_fc7, k, max_radius=max_radius, bits=20,
                                   reduced_rows=rows, query_reduced=projection.apply(q_fc7))
        assert np.array_equal(got.ids, truth.ids), k
        assert np.array_equal(got.hamming, truth.hamming)
        assert np.array_equal(got.l2, truth.l2)
        assert np.array_equal(got.candidates, truth.candidates)
        assert got.exact.tolist() == [0] * len(q)
    # query 7 has image 1's fc7, which images 0, 7, 14, ... repeat: their
    # PCA rows equal its projection (distance 0), and they come first, by id
    ids = got[7].ids
    dups = [i for i in ids if fc7[i].tobytes() == fc7[1].tobytes()]
    assert len(dups) >= 2 and ids[:len(dups)].tolist() == sorted(dups)
    assert np.all(got[7].l2[:len(dups)] == 0)


@pytest.mark.parametrize("exact_top", [1, 30, 5000])
def test_two_step_ranks_the_pca_top_part_by_exact_fc7(exact_top):
    codes, fc7, projection, rows, q, q_fc7 = search_data(21)
    index = HashIndex.build(codes, 20)
    reduced = ReducedRows(rows, projection.apply, exact_top=exact_top, name="pca5")
    pca_only = ReducedRows(rows, projection.apply, exact_top=0, name="pca5")
    for k in (10, 100, None):
        got = index.search(q, q_fc7, fc7, k, min_candidates=300, reduced=reduced)
        plain = index.search(q, q_fc7, fc7, None, min_candidates=300, reduced=pca_only)
        for i in range(len(q)):
            g, p = got[i], plain[i]
            e = min(exact_top, p.candidates)
            assert g.exact == min(e, len(g.ids))
            # the top part: PCA's best e, in (fc7 distance, id) order
            head = np.sort(p.ids[:e])
            d2 = ((fc7[head].astype(np.float64) - q_fc7[i]) ** 2).sum(axis=1)
            order = head[np.lexsort((head, d2.astype(np.float32)))]
            top = order[:len(g.ids)]
            assert np.array_equal(g.ids[:len(top)], top)
            exact_l2 = np.sqrt(d2[np.searchsorted(head, top)])
            np.testing.assert_allclose(g.l2[:g.exact], exact_l2[:g.exact], rtol=1e-5)
            # beyond it, PCA order
            assert np.array_equal(g.ids[e:], p.ids[e:len(g.ids)])
    # and the reference agrees (all candidates: no radius limit)
    got = index.search(q, q_fc7, fc7, 50, min_candidates=10 ** 6, reduced=reduced)
    truth = brute_force_search(codes, fc7, q, q_fc7, 50, bits=20, reduced_rows=rows,
                               query_reduced=projection.apply(q_fc7), exact_top=exact_top)
    assert np.array_equal(got.ids, truth.ids) and np.array_equal(got.l2, truth.l2)
    assert np.array_equal(got.exact, truth.exact)


def test_evaluation_by_pca_rows_is_the_evaluation_of_the_projected_features():
    codes, fc7, projection, rows, q, q_fc7 = search_data(22, n=800)
    labels = np.arange(len(codes)) % 4
    q_labels = np.arange(len(q)) % 4
    reduced = ReducedRows(rows, projection.apply, exact_top=0, name="pca5")
    by_pca = evaluate(codes, labels, q, q_labels, db_fc7=fc7, q_fc7=q_fc7,
                      params=SearchParams(top_k=100), bits=20,
                      reduced=reduced)
    projected = evaluate(codes, labels, q, q_labels, db_fc7=rows,
                         q_fc7=projection.apply(q_fc7), params=SearchParams(top_k=100),
                         bits=20)
    assert by_pca["fine"]["rerank"] == "pca5" and projected["fine"]["rerank"] == "fc7"
    for key in ("map_at_k", "map", "precision_curve", "candidates_mean"):
        assert by_pca["fine"][key] == projected["fine"][key]


def test_pca_store_serves_the_search_through_the_retriever(tmp_path):
    from dlbhc.serving.retrieval import Query, Retriever
    rng = np.random.default_rng(12)
    make_store(tmp_path / "db", rng, n=60).close()
    plain = Retriever(tmp_path / "db")               # no PCA store: fc7, as before
    assert plain.reduced is None and plain.rerank == "fc7"
    plain.close()
    with pytest.raises(UserError, match="no PCA re-rank store"):
        Retriever(tmp_path / "db", rerank="pca")
    compress(tmp_path / "db", "--pca", 4)
    r = Retriever(tmp_path / "db", exact_top=5)
    assert r.rerank == "pca4 + fc7 top 5"
    fc7, codes = r.features_of_ids([3])
    answer = r.search([Query("id 3", exclude_id=3)], codes, fc7,
                      SearchParams(top_k=20, candidates=1000))[0]
    assert answer.rerank == "pca4 + fc7 top 5"
    assert [h.exact for h in answer.hits] == [True] * 4 + [False] * 16   # 5 minus itself
    r.close()
    with FeatureStore.open(tmp_path / "db") as store:
        truth = brute_force_search(store.codes(), store.fc7(range(60)), codes, fc7, 21,
                                   bits=BITS, reduced_rows=store.pca_rows(),
                                   query_reduced=store.projection().apply(fc7), exact_top=5)
    assert [h.id for h in answer.hits] == [i for i in truth.ids[0] if i != 3][:20]
    assert json.loads(json.dumps(answer.as_dict()))["rerank"] == "pca4 + fc7 top 5"
    as_fc7 = Retriever(tmp_path / "db", rerank="fc7")
    assert as_fc7.reduced is None
    answer = as_fc7.search([Query("id 3", exclude_id=3)], codes, fc7,
                           SearchParams(top_k=20, candidates=1000))[0]
    assert all(h.exact for h in answer.hits) and answer.rerank == "fc7"
    as_fc7.close()
    with pytest.raises(UserError, match="--rerank 'pca4': choose one of auto, fc7, latent, "
                                        "asymmetric, pca, none, hamming"):
        Retriever(tmp_path / "db", rerank="pca4")
