"""Issue 13: the index on Milvus (index_milvus.py, retrieve.py --milvus).

A real Milvus standalone server (the PyPI package `milvus`, Milvus 2.3),
started and stopped by this module, on the loopback address.  The search
through Milvus is compared with the local index (HashIndex.search) on the
same databases: with exact settings the answers are equal, ties included."""
import json
import re
import socket

import numpy as np
import pytest

from helpers import MEAN, ROOT, clustered_codes, free_port, make_images, \
    run_extract, run_script

INDEX_MILVUS = ROOT / "python" / "index_milvus.py"
RETRIEVE = ROOT / "python" / "retrieve.py"


# The PyPI server's embedded etcd listens on these fixed ports: a second
# such server on the machine cannot start (it waits 180 s, then fails).
EMBEDDED_ETCD_PORTS = (2379, 2380)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    from milvus import MilvusServer, MilvusServerConfig
    for port in EMBEDDED_ETCD_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: another Milvus server from the PyPI "
                            "package `milvus` (its embedded etcd) runs on this machine; "
                            "stop it, since two cannot run at once")
    server = MilvusServer(MilvusServerConfig(data_dir=str(tmp_path_factory.mktemp("milvus"))))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def synthetic_store(path, n=1500, bits=48, dim=24, seed=0):
    """A feature store of clustered codes with ties built in: repeated codes
    (buckets), and pairs of images with identical re-rank rows."""
    from dlbhc.store.database import FeatureStore
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, n, bits, n_centres=5, flip_p=0.05)
    fc7 = rng.random((n, dim), dtype=np.float32)
    twins = rng.choice(n, size=(n // 10, 2), replace=False)
    fc7[twins[:, 1]] = fc7[twins[:, 0]]             # equal distances to any query
    latent = np.unpackbits(codes, axis=1)[:, :bits].astype(np.float32)
    meta = {"bits": bits, "fc7_dim": dim, "model": {"weights": "synthetic"}}
    with FeatureStore.create(path, meta) as store:
        store.append(fc7, latent, codes,
                     [{"path": f"/images/{i:05d}.jpg", "label": i % 7, "seq": i}
                      for i in range(n)])
    return codes, fc7


def queries(codes, fc7, rng, n=12):
    """Database rows (exact duplicates of their own code and row) and
    perturbed ones."""
    pick = rng.choice(len(codes), n, replace=False)
    q_codes, q_fc7 = codes[pick].copy(), fc7[pick].copy()
    q_codes[n // 2:] ^= rng.integers(0, 256, q_codes[n // 2:].shape, dtype=np.uint8) & 0x11
    q_fc7[n // 2:] += rng.normal(0, 0.05, q_fc7[n // 2:].shape).astype(np.float32)
    return q_codes, q_fc7


def assert_same_results(got, expected):
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.hamming, expected.hamming)
    np.testing.assert_array_equal(got.l2, expected.l2)       # the same arithmetic: exact
    np.testing.assert_array_equal(got.candidates, expected.candidates)
    np.testing.assert_array_equal(got.radius, expected.radius)


@pytest.mark.milvus
@pytest.mark.parametrize("index_type,nprobe", [("BIN_FLAT", None), ("BIN_IVF_FLAT", None)])
def test_milvus_search_equals_the_local_index(milvus_uri, tmp_path, index_type, nprobe):
    from dlbhc.search.index import HashIndex
    from dlbhc.scale.milvus_index import MilvusCollection, load_database
    from dlbhc.store.database import FeatureStore
    codes, fc7 = synthetic_store(tmp_path / "db.lmdb")
    name = f"syn_{index_type.lower()}"
    with FeatureStore.open(tmp_path / "db.lmdb") as store:
        assert load_database(store, milvus_uri, name, index_type=index_type, nlist=16,
                             nprobe=nprobe) == 1500
        local = HashIndex.build(store.codes(), store.bits)
        collection = MilvusCollection(milvus_uri, name)
        try:
            q_codes, q_fc7 = queries(codes, fc7, np.random.default_rng(1))
            for k, min_candidates, max_radius in ((10, None, None), (100, 400, None),
                                                  (50, None, 2), (5, 0, None),
                                                  (20, 5000, None), (None, 300, None)):
                expected = local.search(q_codes, q_fc7, store.fc7, k, min_candidates, max_radius)
                got = collection.index.search(q_codes, q_fc7, collection.fc7, k,
                                              min_candidates, max_radius)
                assert_same_results(got, expected)
            assert (expected.candidates > 0).all()
            # and the ties were there to be ordered: equal distances, ids ascending
            ties = [(r.l2[:-1] == r.l2[1:]) for r in (expected[i] for i in range(len(expected)))]
            assert any(t.any() for t in ties)
            # what Retriever reads besides the search
            ids = np.array([7, 3, 3, 1499])
            np.testing.assert_array_equal(collection.code_rows(ids), codes[ids])
            np.testing.assert_array_equal(collection.fc7(ids), fc7[ids])
            assert collection.infos([5]) == [{"path": "/images/00005.jpg", "label": 5}]
            assert collection.meta["count"] == 1500 and collection.bits == 48
        finally:
            collection.close()


@pytest.mark.milvus
def test_shells_beyond_milvus_topk_cap_are_split(milvus_uri, tmp_path, monkeypatch):
    """Milvus answers at most 16,384 results a search: bigger shells are
    fetched in id ranges, and candidate counts above the cap grow shell by
    shell.  Checked with the cap lowered to 40."""
    from dlbhc.scale import milvus_index
    from dlbhc.search.index import HashIndex
    from dlbhc.store.database import FeatureStore
    codes, fc7 = synthetic_store(tmp_path / "db.lmdb", n=600, bits=16, seed=3)
    with FeatureStore.open(tmp_path / "db.lmdb") as store:
        milvus_index.load_database(store, milvus_uri, "syn_cap")
        local = HashIndex.build(store.codes(), store.bits)
        monkeypatch.setattr(milvus_index, "TOPK_CAP", 40)
        collection = milvus_index.MilvusCollection(milvus_uri, "syn_cap")
        try:
            q_codes, q_fc7 = queries(codes, fc7, np.random.default_rng(2), n=4)
            for k, min_candidates in ((10, None), (30, 150), (None, 100)):
                expected = local.search(q_codes, q_fc7, store.fc7, k, min_candidates)
                assert expected.candidates.max() > 40
                got = collection.index.search(q_codes, q_fc7, collection.fc7, k,
                                              min_candidates)
                assert_same_results(got, expected)
        finally:
            collection.close()


@pytest.fixture(scope="module")
def extracted(tiny_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extracted")
    deploy, weights = tiny_net
    make_images(folder / "imgs", 30)
    db = folder / "db.lmdb"
    model = ["--deploy", deploy, "--weights", weights, "--mean", MEAN]
    run_extract([folder / "imgs", "--out", db, *model])
    return folder, db, model


def retrieve_json(*args):
    out = run_script(RETRIEVE, ["--json", *args])
    answers = json.loads(out.stdout)
    for answer in answers:
        answer.pop("search_ms")
    return answers


@pytest.mark.milvus
def test_index_milvus_and_retrieve_give_the_local_answers(milvus_uri, extracted):
    folder, db, model = extracted
    out = run_script(INDEX_MILVUS, [db, "--uri", milvus_uri, "--collection", "tiny"])
    assert "30 images (30 loaded now)" in out.stdout
    again = run_script(INDEX_MILVUS, [db, "--uri", milvus_uri, "--collection", "tiny"])
    assert "(0 loaded now)" in again.stdout                  # nothing twice
    query = sorted((folder / "imgs").rglob("*.png"))[4]
    for args in (["--id", "3", "--id", "17", "--top-k", "8"], [query, "--top-k", "30"],
                 ["--id", "0", "--top-k", "5", "--max-radius", "1"]):
        local = retrieve_json(*args, "--db", db)
        remote = retrieve_json(*args, "--milvus", milvus_uri, "--collection", "tiny")
        assert remote == local and local[0]["results"]
    # images added to the database later are loaded by a rerun
    make_images(folder / "imgs", 5, classes=("birds",), seed=9)
    run_extract([folder / "imgs", "--out", db, *model])
    out = run_script(INDEX_MILVUS, [db, "--uri", milvus_uri, "--collection", "tiny"])
    assert "35 images (5 loaded now)" in out.stdout
    local = retrieve_json("--id", "33", "--top-k", "35", "--db", db)
    assert local == retrieve_json("--id", "33", "--top-k", "35", "--milvus", milvus_uri,
                                  "--collection", "tiny")
    assert len(local[0]["results"]) == 34


@pytest.mark.milvus
def test_a_collection_of_another_database_is_refused(milvus_uri, extracted, tmp_path):
    _folder, db, _model = extracted
    synthetic_store(tmp_path / "other.lmdb", n=50)
    run_script(INDEX_MILVUS, [db, "--uri", milvus_uri, "--collection", "taken"])
    out = run_script(INDEX_MILVUS, [tmp_path / "other.lmdb", "--uri", milvus_uri,
                                    "--collection", "taken"], check=False)
    assert out.returncode == 2 and "holds another database" in out.stderr
    assert "--replace" in out.stderr and "Traceback" not in out.stderr
    out = run_script(INDEX_MILVUS, [tmp_path / "other.lmdb", "--uri", milvus_uri,
                                    "--collection", "taken", "--replace"])
    assert "50 images (50 loaded now)" in out.stdout


@pytest.mark.milvus
def test_unreachable_missing_and_wrong_uris_are_clear_errors(milvus_uri, extracted, tmp_path):
    _folder, db, _model = extracted
    nobody = f"http://127.0.0.1:{free_port()}"
    cases = [
        (RETRIEVE, ["--id", "1", "--milvus", nobody, "--collection", "tiny"],
         "cannot reach a Milvus server at " + nobody),
        (INDEX_MILVUS, [db, "--uri", nobody], "cannot reach a Milvus server at " + nobody),
        (RETRIEVE, ["--id", "1", "--milvus", str(tmp_path / "milvus.db"),
                    "--collection", "tiny"], "Milvus Lite"),
        (RETRIEVE, ["--id", "1", "--milvus", milvus_uri, "--collection", "nosuch"],
         "has no collection 'nosuch'"),
        (RETRIEVE, ["--id", "1", "--milvus", milvus_uri], "--milvus needs --collection"),
    ]
    for script, args, message in cases:
        out = run_script(script, args, check=False, timeout=120)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_collection_names_from_database_folders():
    from dlbhc.scale.milvus_index import collection_name
    assert collection_name("runs/x/db_train.lmdb") == "db_train"
    assert collection_name("/data/my-photos.2024.leveldb") == "my_photos_2024"
    assert re.fullmatch(r"[A-Za-z_]\w*", collection_name("/data/2024 photos.lmdb"))


@pytest.mark.milvus
def test_removed_images_leave_milvus_on_the_next_load(milvus_uri, tmp_path):
    """Removals (and a compaction between loads) reach the collection: its
    answers equal the local index's over the live images, by id."""
    from dlbhc.scale.milvus_index import MilvusCollection, load_database
    from dlbhc.search.index import HashIndex
    from dlbhc.store import FeatureStore, compact
    db = tmp_path / "db.lmdb"
    codes, fc7 = synthetic_store(db, n=600, bits=16, seed=4)
    q_codes, q_fc7 = queries(codes, fc7, np.random.default_rng(5), n=6)
    with FeatureStore.open(db) as store:
        load_database(store, milvus_uri, "syn_removed")
    removed = []
    for step in range(2):
        with FeatureStore.open(db, readonly=False) as store:
            ids = store.live_ids()[step::7][:40]
            store.remove(ids)
            removed += ids.tolist()
        if step == 0:
            compact(db)          # the next load sees a compacted database
        with FeatureStore.open(db) as store:
            load_database(store, milvus_uri, "syn_removed")
            live = store.live_rows()
            local = HashIndex.build(store.codes()[live], store.bits, ids=live)
            expected = local.search(q_codes, q_fc7, store.fc7, 20, 60)
            expected.ids[expected.ids >= 0] = store.ids_of_rows(expected.ids[expected.ids >= 0])
            collection = MilvusCollection(milvus_uri, "syn_removed")
            try:
                assert collection.count == store.live_count == 600 - len(removed)
                got = collection.index.search(q_codes, q_fc7, collection.fc7, 20, 60)
                assert_same_results(got, expected)
                assert not set(got.ids.ravel().tolist()) & set(removed)
            finally:
                collection.close()
