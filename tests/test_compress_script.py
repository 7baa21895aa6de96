"""python/compress.py with the scripts around it, as a user runs them:
extract.py -> compress.py -> extract.py appends (projected with the same
projection) -> retrieve.py / evaluate.py re-rank by the PCA store."""
import json

import numpy as np
import pytest

from helpers import MEAN, ROOT, make_images, make_tiny_net, run_extract, run_script

COMPRESS = ROOT / "python" / "compress.py"
RETRIEVE = ROOT / "python" / "retrieve.py"
EVALUATE = ROOT / "python" / "evaluate.py"


@pytest.fixture(scope="module")
def collection(tiny_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress")
    deploy, weights = tiny_net
    make_images(folder / "first", 30, classes=("a", "b", "c"))
    make_images(folder / "later", 12, classes=("a", "b", "c"), seed=1)
    model = ["--deploy", deploy, "--weights", weights, "--mean", MEAN, "--batch-size", 8]
    return {"folder": folder, "model": model, "deploy": deploy, "weights": weights}


@pytest.mark.slow
def test_extract_compress_append_retrieve_evaluate(collection, tmp_path):
    from dlbhc_testing.reference import brute_force_search
    from dlbhc.store.database import FeatureStore
    db = tmp_path / "db.lmdb"
    run_extract([collection["folder"] / "first", "--out", db, *collection["model"]])
    out = run_script(COMPRESS, [db, "--pca", 8])
    assert "PCA store" in out.stdout and "8 values per image" in out.stdout
    with FeatureStore.open(db) as store:
        record = dict(store.pca_record)
    # extract.py appends through pipeline.Committer -> FeatureStore.append
    run_extract([collection["folder"] / "later", "--out", db, *collection["model"]])
    with FeatureStore.open(db) as store:
        assert store.count == 42 and store.pca_record == record     # projection kept
        rows = np.array(store.pca_rows())
        assert np.array_equal(rows, store.projection().apply(store.fc7_rows()))
        codes, fc7 = store.codes(), store.fc7(range(42))
        projected_query = store.projection().apply(fc7[[40]])

    # retrieve.py re-ranks by the PCA rows, the best --exact-top by fc7
    got = json.loads(run_script(RETRIEVE, ["--db", db, "--id", 40, "--top-k", 20,
                                           "--candidates", 1000, "--exact-top", 6,
                                           "--json"]).stdout)[0]
    assert got["rerank"] == "pca8 + fc7 top 6"
    truth = brute_force_search(codes, fc7, codes[40], fc7[40], 21, bits=12, reduced_rows=rows,
                               query_reduced=projected_query, exact_top=6)
    expected = [int(i) for i in truth.ids[0] if i != 40][:20]
    assert [r["id"] for r in got["results"]] == expected
    assert [r["exact"] for r in got["results"]] == [True] * 5 + [False] * 15
    table = run_script(RETRIEVE, ["--db", db, "--id", 40, "--top-k", 8, "--exact-top", 2]).stdout
    assert "re-ranked by pca8 + fc7 top 2" in table and "~ ranked by the PCA rows" in table
    # --rerank fc7 is the plain search
    got = json.loads(run_script(RETRIEVE, ["--db", db, "--id", 40, "--top-k", 20,
                                           "--candidates", 1000, "--rerank", "fc7",
                                           "--json"]).stdout)[0]
    truth = brute_force_search(codes, fc7, codes[40], fc7[40], 21, bits=12)
    assert got["rerank"] == "fc7"
    assert [r["id"] for r in got["results"]] == [int(i) for i in truth.ids[0] if i != 40][:20]

    # evaluate.py: the same fine stage, named in the figures
    for rerank, name in (("pca", "pca8 + fc7 top 3"), ("fc7", "fc7")):
        out_dir = tmp_path / f"eval_{rerank}"
        run_script(EVALUATE, ["--database", db, "--queries", db, "--k", 10, "--rerank", rerank,
                              "--exact-top", 3, "--out-dir", out_dir])
        figures = json.loads((out_dir / "figures.json").read_text())
        assert figures["fine"]["rerank"] == name


@pytest.mark.slow
def test_a_projection_of_other_weights_is_refused(caffe, collection, tmp_path):
    db = tmp_path / "db.lmdb"
    run_extract([collection["folder"] / "first", "--out", db, *collection["model"]])
    deploy, weights = make_tiny_net(caffe, tmp_path, bits=12, fc7=32, seed=5)
    other = tmp_path / "other.lmdb"
    run_extract([collection["folder"] / "first", "--out", other, "--deploy", deploy,
                 "--weights", weights, "--mean", MEAN])
    run_script(COMPRESS, [other, "--pca", 4])
    npz = next(other.glob("pca-*.npz"))
    out = run_script(COMPRESS, [db, "--projection", npz], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not match" in out.stderr and "learned on features of other weights" in out.stderr
    # a database without a PCA store: --rerank pca says what to do
    out = run_script(RETRIEVE, ["--db", db, "--id", 1, "--rerank", "pca"], check=False)
    assert out.returncode == 2 and "compress.py" in out.stderr and "Traceback" not in out.stderr
    out = run_script(EVALUATE, ["--database", db, "--queries", db, "--rerank", "pca"],
                     check=False)
    assert out.returncode == 2 and "no PCA re-rank store" in out.stderr
    out = run_script(COMPRESS, [db, "--pca", 33], check=False)
    assert out.returncode == 2 and "choose 1..32" in out.stderr
