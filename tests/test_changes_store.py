"""Removal, replacement, stable ids and compaction of a feature database
(dlbhc.store.live, dlbhc.store.compact) and the search over what is live,
checked against brute force on seeded data; kill -9 at chosen points of a
compaction and a removal (no Caffe needed)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlbhc.errors import UserError
from dlbhc.extraction import ids_of_targets, remove_images
from dlbhc.search import SearchParams
from dlbhc.search.codes import pack_codes
from dlbhc.serving.retrieval import Query, Retriever
from dlbhc.store import FeatureStore, compact, writer_lock
from dlbhc_testing.reference import brute_force_search

BITS, DIM = 16, 8
ROOT = Path(__file__).resolve().parents[1]


def batch(rng, n, start=0):
    # few distinct codes: many ties and shared buckets
    latent = (rng.integers(0, 2, (n, BITS)) * 0.8 + 0.1).astype(np.float32)
    latent[:, 4:] = latent[:1, 4:]
    fc7 = rng.standard_normal((n, DIM)).astype(np.float32)
    infos = [{"path": f"/img/{start + i}.jpg", "label": (start + i) % 3, "seq": start + i}
             for i in range(n)]
    return fc7, latent, pack_codes(latent), infos


def make_store(path, n=300, seed=0, backend="lmdb"):
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(path, {"bits": BITS, "fc7_dim": DIM}, backend=backend)
    for lo in range(0, n, 100):
        store.append(*batch(rng, min(100, n - lo), lo))
    store.close()


def snapshot(path):
    """{id: (fc7 bytes, code bytes, path)} of the live images."""
    with FeatureStore.open(path) as store:
        rows = store.live_rows()
        ids = store.ids_of_rows(rows)
        fc7, codes, infos = store.fc7(rows), store.code_rows(rows), store.infos(rows)
        return {int(i): (f.tobytes(), c.tobytes(), info["path"])
                for i, f, c, info in zip(ids, fc7, codes, infos)}


def live_answers(path, queries, k=10):
    """The retriever's answers and brute force over the live images, as ids."""
    retriever = Retriever(path, rerank="fc7")
    try:
        store = retriever.store
        rows = store.live_rows()
        ids = store.ids_of_rows(rows)
        codes, fc7 = store.code_rows(rows), store.fc7(rows)
        q_codes, q_fc7 = codes[queries], fc7[queries]
        got = retriever.search([Query(str(q)) for q in queries], q_codes, q_fc7,
                               SearchParams(k, candidates=BITS * 4))
        truth = [brute_force_search(codes, fc7, q_codes[i:i + 1], q_fc7[i:i + 1], k, bits=BITS,
                                    max_radius=a.radius).ids[0] for i, a in enumerate(got)]
        return ([[h.id for h in a.hits] for a in got],
                [ids[t[t >= 0]].tolist() for t in truth])
    finally:
        retriever.close()


def test_removed_ids_never_answer_and_search_matches_brute_force_on_live(tmp_path):
    db = tmp_path / "db"
    make_store(db)
    before = FeatureStore.open(db)
    revision = before.revision()
    before.close()
    removed = remove_images(db, [str(i) for i in range(0, 300, 3)] + ["/img/1.jpg"])
    assert len(removed) == 101
    with FeatureStore.open(db) as store:
        assert store.revision() != revision
        assert store.live_count == 199 and not store.live_mask()[removed].any()
        with pytest.raises(UserError, match="was removed"):
            store.rows_of_ids([3])
    got, truth = live_answers(db, [0, 5, 50, 120])
    assert got == truth
    assert not set(sum(got, [])) & set(removed.tolist())


def test_bad_targets_and_a_second_writer_get_clear_messages(tmp_path):
    db = tmp_path / "db"
    make_store(db, n=20)
    with pytest.raises(UserError, match="no image with id 99"):
        remove_images(db, ["99"])
    with pytest.raises(UserError, match="not an image of"):
        remove_images(db, ["/elsewhere/x.jpg"])
    remove_images(db, ["4"])
    with pytest.raises(UserError, match="was removed"):
        remove_images(db, ["4"])
    with writer_lock(db):
        with pytest.raises(UserError, match="in use by another writer"):
            remove_images(db, ["5"])
        with pytest.raises(UserError, match="in use by another writer"):
            compact(db)
    with FeatureStore.open(db) as store:
        assert store.removed_count == 1 and ids_of_targets(store, ["/img/5.jpg"]).tolist() == [5]


def test_replace_keeps_one_record_per_path_and_ids_are_never_reused(tmp_path):
    db = tmp_path / "db"
    make_store(db, n=10)
    rng = np.random.default_rng(1)
    fc7, latent, codes, infos = batch(rng, 1, 3)     # a new record for /img/3.jpg
    with FeatureStore.open(db, readonly=False) as store:
        new = store.append(fc7, latent, codes, infos, remove=[3])
        assert new.tolist() == [10]
        with pytest.raises(UserError, match="was removed"):
            store.append(fc7, latent, codes, infos, remove=[3])
        records = store.live_records()
        assert records["/img/3.jpg"][0] == 10 and len(records) == 10
    compact(db)
    with FeatureStore.open(db, readonly=False) as store:
        assert store.count == 10 and store.next_id == 11
        assert store.append(*batch(rng, 1, 20)).tolist() == [10]      # a row
        assert store.ids_of_rows([10]).tolist() == [11]               # its id: new
        assert sorted(store.live_ids().tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_compaction_keeps_ids_and_answers(tmp_path, backend):
    db = tmp_path / "db"
    make_store(db, backend=backend)
    remove_images(db, [str(i) for i in range(1, 300, 4)])
    want = snapshot(db)
    got_before, _ = live_answers(db, [2, 40, 77])
    size_before = sum(f.stat().st_size for f in db.iterdir())
    assert compact(db) == (300, 225)
    assert snapshot(db) == want
    got_after, truth = live_answers(db, [2, 40, 77])
    assert got_after == got_before == truth
    assert sum(f.stat().st_size for f in db.iterdir()) <= size_before
    assert not list(tmp_path.glob("db.old")) + list(tmp_path.glob("db.compacting"))
    with pytest.raises(UserError, match="compacted away"):
        FeatureStore.open(db).rows_of_ids([1])


def in_other_process(code, *args, crash_at=None):
    """Run python code in a fresh process (another writer, as extract.py is);
    returns its exit status (-9: killed at crash_at)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    env.pop("DLBHC_CRASH_AT", None)
    if crash_at:
        env["DLBHC_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env).returncode


def test_the_index_and_service_follow_removals_and_compaction(tmp_path):
    db = tmp_path / "db"
    make_store(db)
    retriever = Retriever(db, rerank="fc7")
    try:
        fc7, codes = retriever.features_of_ids([7])
        first = [h.id for h in retriever.search([Query("q")], codes, fc7, SearchParams(5))[0].hits]
        assert in_other_process(CRASHER, db, "remove", first[1]) == 0
        assert retriever.refresh()
        second = [h.id for h in retriever.search([Query("q")], codes, fc7,
                                                 SearchParams(5))[0].hits]
        assert first[1] not in second and second[:1] == first[:1]
        assert in_other_process(CRASHER, db, "compact") == 0
        assert retriever.refresh()           # the new copy, opened in place of the old
        assert [h.id for h in retriever.search([Query("q")], codes, fc7,
                                               SearchParams(5))[0].hits] == second
        with pytest.raises(UserError):
            retriever.features_of_ids([first[1]])
    finally:
        retriever.close()


CRASHER = """
import sys
from dlbhc.extraction import remove_images
from dlbhc.store import compact
db, what = sys.argv[1], sys.argv[2]
if what == "remove":
    remove_images(db, sys.argv[3:] or [str(i) for i in range(0, 300, 7) if i % 5 != 1])
else:
    compact(db)
"""


@pytest.mark.parametrize("point", ["compact-copy", "compact-before-switch", "compact-mid-switch",
                                   "tombstone"])
def test_kill_9_during_compaction_or_removal_loses_nothing(tmp_path, point):
    db = tmp_path / "db"
    make_store(db)
    remove_images(db, [str(i) for i in range(1, 300, 5)])
    want = snapshot(db)
    what = "remove" if point == "tombstone" else "compact"
    assert in_other_process(CRASHER, db, what, crash_at=point) == -9   # killed where asked
    assert snapshot(db) == want                     # the old database (or the new), whole
    assert in_other_process(CRASHER, db, what) == 0
    removed = [i for i in range(0, 300, 7) if i % 5 != 1]
    assert snapshot(db) == (want if what == "compact" else
                            {i: v for i, v in want.items() if i not in removed})
    with FeatureStore.open(db) as store:
        assert store.removed_count == (0 if what == "compact" else 60 + len(removed))


@pytest.mark.parametrize("n,bits", [(400, 16), (6000, 48), (30000, 32)])
def test_an_index_less_removed_images_answers_as_one_built_without_them(n, bits):
    """HashIndex.without (how removals reach a live index, no rebuild)
    against an index built over the remaining images, and brute force."""
    from dlbhc.search.index import HashIndex
    from dlbhc_testing.synthetic import clustered_codes
    rng = np.random.default_rng(n)
    codes = clustered_codes(rng, n, bits, n_centres=8, flip_p=0.04)
    fc7 = rng.standard_normal((n, 6)).astype(np.float32)
    gone = rng.choice(n, n // 3, replace=False)
    live = np.setdiff1d(np.arange(n), gone)
    smaller = HashIndex.build(codes, bits).without(gone[: n // 6]).without(gone[n // 6:])
    rebuilt = HashIndex.build(codes[live], bits, ids=live)
    assert smaller.count == rebuilt.count == len(live)
    q = rng.choice(n, 8, replace=False)
    for k, min_candidates, max_radius in ((10, None, None), (50, 300, None), (20, None, 2),
                                          (None, 100, None), (5, n, None)):
        a = smaller.search(codes[q], fc7[q], fc7, k, min_candidates, max_radius)
        b = rebuilt.search(codes[q], fc7[q], fc7, k, min_candidates, max_radius)
        for field in ("ids", "hamming", "l2", "candidates", "radius"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not np.isin(a.ids, gone).any()
    truth = brute_force_search(codes[live], fc7[live], codes[q], fc7[q], 10, bits=bits,
                               max_radius=2)
    got = smaller.search(codes[q], fc7[q], fc7, 10, n, 2)
    np.testing.assert_array_equal(got.ids, np.where(truth.ids >= 0, live[truth.ids], -1))


def test_compaction_keeps_the_pca_rows_of_the_live_images(tmp_path):
    db = tmp_path / "db"
    make_store(db)
    with FeatureStore.open(db, readonly=False) as store:
        store.add_pca(store.learn_projection(4))
    remove_images(db, [str(i) for i in range(0, 300, 3)])
    with FeatureStore.open(db) as store:
        rows = store.live_rows()
        want = dict(zip(store.ids_of_rows(rows).tolist(), np.asarray(store.pca_rows()[rows])))
    compact(db)
    with FeatureStore.open(db) as store:
        store.projection()                                   # checked against the metadata
        got = dict(zip(store.ids_of_rows(np.arange(store.count)).tolist(),
                       np.asarray(store.pca_rows())))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[i], want[i]) for i in want)
    retriever = Retriever(db)                                 # re-ranks by the PCA rows
    try:
        assert retriever.rerank.startswith("pca4")
        fc7, codes = retriever.features_of_ids([4])
        hits = retriever.search([Query("q", exclude_id=4)], codes, fc7, SearchParams(5))[0].hits
        assert hits and not {h.id for h in hits} & set(range(0, 300, 3))
    finally:
        retriever.close()


def test_sync_plan_uses_stat_only_and_takes_old_records_as_unchanged(tmp_path):
    """plan_sync: new, changed (size/mtime or label), vanished, unchanged,
    and records made before size/mtime were recorded (taken as unchanged)."""
    from dlbhc.extraction import file_stat, plan_sync
    from dlbhc.images import ImageItem
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.png"
        path.write_bytes(b"x" * (10 + i))
        files.append(path)
    rng = np.random.default_rng(0)
    fc7, latent, codes, _ = batch(rng, 5)
    infos = [{"path": str(p), "label": 0, "seq": i} for i, p in enumerate(files[:5])]
    for info in infos[:4]:
        info["size"], info["mtime_ns"] = file_stat(info["path"])
    infos[2]["size"] += 1                       # changed since it was recorded
    infos[3]["label"] = 1                       # its class folder changed
    infos.append(dict(infos[0], path=str(tmp_path / "gone.png")))   # vanished
    db = tmp_path / "db"
    with FeatureStore.create(db, {"bits": BITS, "fc7_dim": DIM}) as store:
        store.append(*batch(rng, 6)[:3], infos)
        items = [ImageItem(p, 0) for p in files]
        todo, replaces, vanished, stats, report = plan_sync(store, items)
    assert [t[1] for t in todo] == [str(files[2]), str(files[3]), str(files[5])]
    assert replaces == {str(files[2]): 2, str(files[3]): 3} and vanished == [5]
    assert (report.added, report.replaced, report.removed, report.unchanged,
            report.unknown_stat) == (1, 2, 1, 3, 1)
