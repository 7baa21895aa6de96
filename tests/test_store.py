"""dlbhc.store.database: the feature database's records, revision, and the clear
errors for damaged or foreign databases (no Caffe needed)."""
import json

import numpy as np
import pytest

from dlbhc.search.codes import pack_codes
from dlbhc.errors import UserError
from dlbhc.store import FC7_FILE, FeatureStore, check_compatible, merge

BITS, DIM = 12, 8


def batch(rng, n, start=0):
    latent = rng.random((n, BITS)).astype(np.float32)
    fc7 = rng.standard_normal((n, DIM)).astype(np.float32)
    infos = [{"path": f"/img/{start + i}.jpg", "label": (start + i) % 3, "seq": start + i}
             for i in range(n)]
    return fc7, latent, pack_codes(latent), infos


def make_store(path, rng, n=10, backend="lmdb", fc7_dtype="float32"):
    store = FeatureStore.create(path, {"bits": BITS, "fc7_dim": DIM, "fc7_dtype": fc7_dtype},
                                backend=backend)
    parts = batch(rng, n)
    store.append(*parts)
    store.close()
    return parts


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_records_round_trip_and_revision_follows_appends(tmp_path, backend):
    rng = np.random.default_rng(0)
    db = tmp_path / "db"
    fc7, latent, codes, infos = make_store(db, rng, backend=backend)
    with FeatureStore.open(db) as store:
        assert store.count == 10 and store.bits == BITS and store.meta["backend"] == backend
        assert np.array_equal(store.codes(), codes)
        assert np.array_equal(store.fc7(range(10)), fc7)
        assert np.array_equal(store.latent([3, 1]), latent[[3, 1]])
        assert store.infos([4]) == [infos[4]] and store.labels().tolist() == [i % 3 for i in range(10)]
        # in the order asked, repeats kept (an answer's ids are not sorted)
        assert store.infos([7, 2, 7, 0]) == [infos[7], infos[2], infos[7], infos[0]]
        first = store.revision()
    with FeatureStore.open(db, readonly=False) as store:
        store.append(*batch(rng, 2, start=10))
        assert store.count == 12 and store.revision() != first
    with FeatureStore.open(db) as store:
        assert store.count == 12 and store.stored_paths() == {f"/img/{i}.jpg" for i in range(12)}
        with pytest.raises(UserError, match="holds ids 0..11"):
            store.fc7([12])


def test_float16_rows_are_half_the_bytes(tmp_path):
    rng = np.random.default_rng(1)
    fc7, *_ = make_store(tmp_path / "db", rng, fc7_dtype="float16")
    assert (tmp_path / "db" / FC7_FILE).stat().st_size == 10 * DIM * 2
    with FeatureStore.open(tmp_path / "db") as store:
        assert store.fc7_rows().dtype == np.float16
        np.testing.assert_array_equal(store.fc7(range(10)), fc7.astype(np.float16).astype(np.float32))


def test_truncated_fc7_file_is_reported_as_damage(tmp_path):
    make_store(tmp_path / "db", np.random.default_rng(2))
    fc7_file = tmp_path / "db" / FC7_FILE
    fc7_file.write_bytes(fc7_file.read_bytes()[:-1])
    with pytest.raises(UserError, match="damaged; re-extract it"):
        FeatureStore.open(tmp_path / "db")
    fc7_file.unlink()
    with pytest.raises(UserError, match=f"{FC7_FILE} holds 0 bytes"):
        FeatureStore.open(tmp_path / "db")


def test_missing_code_records_are_reported_as_damage(tmp_path):
    make_store(tmp_path / "db", np.random.default_rng(3))
    with FeatureStore.open(tmp_path / "db", readonly=False) as store:
        # a metadata count above the records (e.g. a hand-edited or foreign db)
        store.update_meta(count=11)
        with open(tmp_path / "db" / FC7_FILE, "ab") as f:
            f.write(b"\0" * DIM * 4)
    with FeatureStore.open(tmp_path / "db") as store:
        with pytest.raises(UserError, match="11 images in metadata but 10 codes"):
            store.codes()


def test_other_schema_version_and_foreign_folders_are_refused(tmp_path):
    make_store(tmp_path / "db", np.random.default_rng(4))
    with FeatureStore.open(tmp_path / "db", readonly=False) as store:
        store.update_meta(schema_version=99)
    with pytest.raises(UserError, match="schema version 99.*re-extract"):
        FeatureStore.open(tmp_path / "db")
    with pytest.raises(UserError, match="does not exist: build it with"):
        FeatureStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a feature database"):
        FeatureStore.open(tmp_path / "empty")
    # a Caffe Datum LMDB (an LMDB without the store's tables)
    import lmdb
    env = lmdb.open(str(tmp_path / "datum"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00000000_a.jpg", b"datum")
    env.close()
    with pytest.raises(UserError, match="not a complete feature database"):
        FeatureStore.open(tmp_path / "datum")
    with pytest.raises(UserError, match="exists and is not empty"):
        FeatureStore.create(tmp_path / "db", {"bits": BITS, "fc7_dim": DIM})


def test_merge_orders_shards_by_input_position_and_checks_compatibility(tmp_path):
    rng = np.random.default_rng(5)
    fc7, latent, codes, infos = batch(rng, 9)
    for shard in range(3):
        store = FeatureStore.create(tmp_path / f"s{shard}", {"bits": BITS, "fc7_dim": DIM})
        rows = list(range(shard, 9, 3))
        store.append(fc7[rows], latent[rows], codes[rows], [infos[i] for i in rows])
        store.close()
    merge([tmp_path / f"s{i}" for i in (2, 0, 1)], tmp_path / "all")
    with FeatureStore.open(tmp_path / "all") as store:
        assert [i["seq"] for i in store.infos()] == list(range(9))
        assert np.array_equal(store.codes(), codes) and np.array_equal(store.fc7(range(9)), fc7)
    with pytest.raises(UserError, match="bits: database has 12, shard .* has 20"):
        check_compatible({"bits": 12}, {"bits": 20}, what="shard x")
    meta = json.loads(json.dumps({"bits": 12, "fc7_dim": 8}))
    check_compatible(meta, dict(meta))   # equal: no error
