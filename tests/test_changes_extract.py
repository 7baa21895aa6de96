"""extract.py --sync / --remove / --compact on a real (tiny) net: a folder
changed in every way, kill -9 in the middle of a sync then a rerun, removed
images never found by upload through the query service, clear errors."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import EXTRACT, MEAN, make_images, run_extract

from dlbhc.store import FeatureStore


@pytest.fixture(scope="module")
def tiny(tiny_net):
    return tiny_net


def sync_args(tiny, folder, db):
    deploy, weights = tiny
    return [folder, "--out", db, "--sync", "--deploy", deploy, "--weights", weights,
            "--mean", MEAN, "--batch-size", 2, "--commit-every", 0, "--workers", 0]


def live_state(db):
    """{path: (id, fc7 bytes)} of the live images, and the revision."""
    with FeatureStore.open(db) as store:
        rows = store.live_rows()
        infos, fc7 = store.infos(rows), store.fc7(rows)
        ids = store.ids_of_rows(rows)
        paths = [i["path"] for i in infos]
        assert len(set(paths)) == len(paths), "a path with two live records"
        return {p: (int(i), f.tobytes()) for p, i, f in zip(paths, ids, fc7)}, store.revision()


def files_of(folder):
    return {str(p.resolve()) for p in folder.rglob("*.png")}


def change_every_way(folder, seed=1):
    """Delete two files, modify two, rename one, add two; returns the
    modified paths."""
    files = sorted(folder.rglob("*.png"))
    files[0].unlink()
    files[1].unlink()
    rng = np.random.default_rng(seed)
    for path in files[2:4]:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    files[4].rename(files[4].with_name("renamed_" + files[4].name))
    make_images(folder / "new", 2, classes=("birds",), seed=seed + 5)
    return [str(p.resolve()) for p in files[2:4]]


def test_sync_follows_a_folder_changed_in_every_way(tiny, tmp_path):
    folder, db = tmp_path / "imgs", tmp_path / "db"
    make_images(folder, 10)
    out = run_extract(sync_args(tiny, folder, db))
    assert "added 10, re-extracted 0 changed, removed 0 vanished" in out.stdout
    before, _ = live_state(db)
    modified = change_every_way(folder)
    out = run_extract(sync_args(tiny, folder, db))
    assert "added 3, re-extracted 2 changed, removed 3 vanished, 5 unchanged" in out.stdout
    after, revision = live_state(db)
    assert set(after) == files_of(folder)
    for path in modified:        # new features, new id; the old id is gone
        assert after[path][1] != before[path][1] and after[path][0] > max(i for i, _ in
                                                                           before.values())
    for path in set(after) & set(before) - set(modified):
        assert after[path] == before[path]
    out = run_extract(sync_args(tiny, folder, db))      # unchanged: nothing to do
    assert "added 0, re-extracted 0 changed, removed 0 vanished, 10 unchanged" in out.stdout
    assert live_state(db) == (after, revision)


def modify_only(folder):
    """Two files rewritten (replacements only: the first tombstone written
    is a replacement's, inside the commit of its new record)."""
    rng = np.random.default_rng(7)
    for path in sorted(folder.rglob("*.png"))[3:5]:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("point,change", [("tombstone", change_every_way),
                                          ("committed", change_every_way),
                                          ("tombstone", modify_only)])
def test_kill_9_during_sync_then_rerun_loses_and_doubles_nothing(tiny, tmp_path, point, change):
    folder, db = tmp_path / "imgs", tmp_path / "db"
    make_images(folder, 10)
    run_extract(sync_args(tiny, folder, db))
    change(folder)
    env = dict(os.environ, DLBHC_CRASH_AT=point)
    proc = subprocess.run([sys.executable, str(EXTRACT), *map(str, sync_args(tiny, folder, db))],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    live_state(db)                       # whole: one live record per path
    run_extract(sync_args(tiny, folder, db))
    state, _ = live_state(db)
    assert set(state) == files_of(folder)
    fresh = tmp_path / "fresh"
    run_extract(sync_args(tiny, folder, fresh))
    want = live_state(fresh)[0]
    assert set(want) == set(state)
    for path, (_, fc7) in state.items():   # same features (up to batch composition)
        assert np.allclose(np.frombuffer(fc7, np.float32), np.frombuffer(want[path][1], np.float32),
                           rtol=1e-4, atol=1e-5)


def test_removed_images_are_never_found_by_upload_or_id(tiny, tmp_path):
    from dlbhc.serving.service import NotFound, QueryService
    folder, db = tmp_path / "imgs", tmp_path / "db"
    files = make_images(folder, 12)
    run_extract(sync_args(tiny, folder, db))
    service = QueryService(db, refresh_seconds=0, deploy=tiny[0], weights=tiny[1])
    try:
        target = str(files[3].resolve())
        uploads = [(files[3].name, files[3].read_bytes())]
        answers, _ = service.search_uploads(uploads)
        top = answers[0].hits[0]
        assert top.path == target
        run_extract(["--remove", target, "--out", db])
        assert service.refresh()
        answers, _ = service.search_uploads(uploads)
        assert target not in {h.path for h in answers[0].hits}
        with pytest.raises(NotFound, match="was removed"):
            service.image_record(str(top.id))
        assert all(top.id not in {h.id for h in a.hits}
                   for a in service.search_ids([str(i) for i in range(12) if i != top.id]))
        run_extract(["--compact", "--out", db])
        assert service.refresh()
        answers, _ = service.search_uploads(uploads)
        assert target not in {h.path for h in answers[0].hits}
    finally:
        service.close()


def test_bad_input_gets_a_clear_message(tiny, tmp_path):
    folder, db = tmp_path / "imgs", tmp_path / "db"
    make_images(folder, 4)
    run_extract(sync_args(tiny, folder, db))
    for args, message in ((["--remove", "77", "--out", db], "no image with id 77"),
                          (["--remove", "/etc/passwd", "--out", db], "is not an image of"),
                          (["--compact", "--out", tmp_path / "none"], "does not exist")):
        out = run_extract(args, check=False)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from dlbhc.store import writer_lock\n"
                               "with writer_lock(sys.argv[1]):\n"
                               "    print('held', flush=True); time.sleep(60)", str(db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = run_extract(sync_args(tiny, folder, db), check=False)
        assert out.returncode == 2 and "in use by another writer" in out.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_serve_py_follows_a_removal_and_a_compaction_without_restart(tiny, tmp_path):
    """serve.py's watcher: a removal and then a compaction by extract.py in
    another process reach the running server's answers (HTTP, by upload
    and by id)."""
    import json
    import time
    from helpers import Server
    folder, db = tmp_path / "imgs", tmp_path / "db"
    files = make_images(folder, 12)
    run_extract(sync_args(tiny, folder, db))
    srv = Server(["--db", db, "--refresh-seconds", 0.2])
    try:
        upload = [(files[5].name, files[5].read_bytes())]
        status, _, body = srv.upload("/api/search?top_k=3", upload)
        hit = json.loads(body)[0]["results"][0]
        assert status == 200 and hit["path"] == str(files[5].resolve())
        assert srv.get_json("/api/info")["stored"] == 12
        for args, stored in ((["--remove", str(hit["id"]), "--out", db], 12),
                             (["--compact", "--out", db], 11)):
            run_extract(args)
            deadline = time.monotonic() + 30
            while (srv.get_json("/api/info")["count"], srv.get_json("/api/info")["stored"]) \
                    != (11, stored) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert (srv.get_json("/api/info")["count"], srv.get_json("/api/info")["stored"]) \
                == (11, stored)
            status, _, body = srv.upload("/api/search?top_k=20", upload)
            assert status == 200
            results = json.loads(body)[0]["results"]
            assert len(results) == 11 and hit["id"] not in {h["id"] for h in results}
            assert srv.get(f"/api/images/{hit['id']}")[0] == 404
            other = results[0]["id"]
            assert srv.get(f"/api/images/{other}")[0] == 200
            by_id = srv.get_json(f"/api/search?id={other}&top_k=20")[0]["results"]
            assert len(by_id) == 10 and hit["id"] not in {h["id"] for h in by_id}
    finally:
        srv.stop()
