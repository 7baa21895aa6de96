"""Issue: retrieve.py — coarse-to-fine search over a feature database."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MEAN, make_images, make_tiny_net, run_extract

ROOT = Path(__file__).resolve().parents[1]
RETRIEVE = ROOT / "python" / "retrieve.py"


def retrieve(*args, check=True):
    out = subprocess.run([sys.executable, str(RETRIEVE), *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_full_radius_equals_brute_force(database):
    from dlbhc_testing.reference import brute_force_search
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(database["db"]) as store:
        codes, fc7 = store.codes(), store.fc7(range(store.count))
        paths = [i["path"] for i in store.infos()]
    for query_id in (0, 7, 33):
        out = retrieve("--db", database["db"], "--id", query_id, "--top-k", 39,
                       "--candidates", 1000, "--json")
        got = json.loads(out.stdout)[0]["results"]
        truth = brute_force_search(codes, fc7, codes[query_id], fc7[query_id], k=40)[0]
        expected = [int(i) for i in truth.ids if int(i) != query_id][:39]
        assert [r["id"] for r in got] == expected
        assert [r["path"] for r in got] == [paths[i] for i in expected]
        ham = dict(zip(truth.ids.tolist(), truth.hamming.tolist()))
        assert [r["hamming"] for r in got] == [ham[i] for i in expected]


def test_query_image_file_finds_itself_first(database):
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(database["db"]) as store:
        path = store.infos([5])[0]["path"]
    out = retrieve(path, "--db", database["db"], "--top-k", 3, "--json")
    hits = json.loads(out.stdout)[0]["results"]
    assert hits[0]["id"] == 5 and hits[0]["hamming"] == 0 and hits[0]["l2"] < 1e-3


def test_json_holds_what_the_table_shows(database):
    table = retrieve("--db", database["db"], "--id", 3, "--top-k", 5).stdout
    answer = json.loads(retrieve("--db", database["db"], "--id", 3, "--top-k", 5,
                                 "--json").stdout)[0]
    rows = [r for r in (line.split() for line in table.splitlines())
            if len(r) == 6 and r[0].isdigit() and r[1].isdigit()]
    assert len(rows) == len(answer["results"]) == 5
    for row, hit in zip(rows, answer["results"]):
        assert int(row[0]) == hit["rank"] and int(row[1]) == hit["id"]
        assert int(row[2]) == hit["hamming"] and float(row[3]) == pytest.approx(hit["l2"], abs=1e-3)
        assert row[5] == hit["path"]


def test_montage_is_a_png_of_the_expected_size(database, tmp_path):
    from PIL import Image
    from dlbhc.serving.display import MONTAGE_DPI, MONTAGE_TILE_INCHES
    png = tmp_path / "m.png"
    retrieve("--db", database["db"], "--id", 1, "--top-k", 6, "--show", 6, "--montage", png)
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size == (round(MONTAGE_TILE_INCHES * 7 * MONTAGE_DPI),
                            round((MONTAGE_TILE_INCHES + 0.5) * MONTAGE_DPI))


@pytest.mark.slow
def test_index_cache_is_rebuilt_after_the_database_changes(caffe, tmp_path):
    from dlbhc.serving.retrieval import index_cache_path
    deploy, weights = make_tiny_net(caffe, tmp_path, bits=12)
    make_images(tmp_path / "imgs", 6)
    db = tmp_path / "db.lmdb"
    common = ["--deploy", deploy, "--weights", weights, "--mean", MEAN]
    run_extract([tmp_path / "imgs", "--out", db, *common])
    first = retrieve("--db", db, "--id", 0, "--json")
    assert "built the search index of 6 images" in first.stderr
    assert index_cache_path(db).exists()
    again = retrieve("--db", db, "--id", 0, "--json")
    assert "built the search index" not in again.stderr  # cache reused
    make_images(tmp_path / "imgs", 3, classes=("new",), seed=9)
    run_extract([tmp_path / "imgs", "--out", db, *common])
    after = retrieve("--db", db, "--id", 0, "--top-k", 8, "--json")
    assert "built the search index of 9 images" in after.stderr
    assert len(json.loads(after.stdout)[0]["results"]) == 8


def test_mismatched_model_is_refused_clearly(caffe, database, tmp_path):
    deploy20, weights20 = make_tiny_net(caffe, tmp_path, bits=20)
    query = next((database["folder"] / "imgs" / "a").iterdir())
    out = retrieve(query, "--db", database["db"], "--deploy", deploy20, "--weights", weights20,
                   check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not match the feature database" in out.stderr and "bits" in out.stderr
    # same shape, other weights: codes would not be comparable
    deploy12, other12 = make_tiny_net(caffe, tmp_path, bits=12, seed=4)
    out = retrieve(query, "--db", database["db"], "--deploy", deploy12, "--weights", other12,
                   check=False)
    assert out.returncode == 2 and "not the weights" in out.stderr


def test_missing_database_names_the_command_that_builds_it(tmp_path):
    out = retrieve("--db", tmp_path / "none.lmdb", "--id", 0, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "extract.py" in out.stderr


def test_bad_query_image_is_a_clear_error(database, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = retrieve(bad, "--db", database["db"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "bad.jpg" in out.stderr


def test_float16_database_from_extraction_to_retrieval(caffe, database, tmp_path):
    """extract.py --float16 stores fc7 as float16 (half the bytes, values
    within float16 rounding of the float32 database's); retrieve.py answers
    from it exactly as the brute-force search over those stored rows does."""
    from dlbhc_testing.reference import brute_force_search
    from dlbhc.store.database import FeatureStore
    db16 = tmp_path / "db16.lmdb"
    run_extract([database["folder"] / "imgs", "--out", db16, "--deploy", database["deploy"],
                 "--weights", database["weights"], "--mean", MEAN, "--batch-size", 8,
                 "--float16"])
    with FeatureStore.open(db16) as store16, FeatureStore.open(database["db"]) as store32:
        assert store16.meta["fc7_dtype"] == "float16" and store16.count == store32.count == 40
        assert (db16 / "fc7.bin").stat().st_size == 40 * store16.fc7_dim * 2
        codes = store16.codes()
        assert np.array_equal(codes, store32.codes())
        fc7_16 = store16.fc7(range(40))
        np.testing.assert_allclose(fc7_16, store32.fc7(range(40)), rtol=1e-3, atol=1e-3)
    for query_id in (2, 30):
        got = json.loads(retrieve("--db", db16, "--id", query_id, "--top-k", 10,
                                  "--candidates", 1000, "--json").stdout)[0]["results"]
        truth = brute_force_search(codes, fc7_16, codes[query_id], fc7_16[query_id], k=11)[0]
        expected = [int(i) for i in truth.ids if int(i) != query_id][:10]
        assert [r["id"] for r in got] == expected
        assert [r["l2"] for r in got] == pytest.approx(
            [float(d) for i, d in zip(truth.ids, truth.l2) if int(i) != query_id][:10],
            rel=1e-6)


def test_bad_search_parameters_are_clear_errors(database):
    for args in (["--top-k", 0], ["--candidates", 0], ["--max-radius", -1], ["--id", 40]):
        out = retrieve("--db", database["db"], "--id", 1, *args, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, args
    out = retrieve("--db", database["db"], "--id", 40, check=False)
    assert "holds ids 0..39" in out.stderr
