"""Issue: bulk extraction into the feature store (extract.py)."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import EXTRACT, MEAN, make_images, make_tiny_net, run_extract


@pytest.fixture(scope="module")
def tiny(tiny_net):
    """(deploy, weights): the session's tiny net (conftest.py)."""
    return tiny_net


def model_args(tiny):
    deploy, weights = tiny
    return ["--deploy", deploy, "--weights", weights, "--mean", MEAN, "--batch-size", 4]


def test_store_fields_codes_and_fc7_match_pycaffe(caffe, tiny, tmp_path):
    from dlbhc.store.database import FeatureStore
    images = make_images(tmp_path / "imgs", 10)
    out = tmp_path / "db.lmdb"
    run_extract([tmp_path / "imgs", "--out", out, *model_args(tiny)])
    with FeatureStore.open(out) as store:
        assert store.count == 10 and store.bits == 12 and store.fc7_dim == 32
        meta = store.meta
        assert meta["preprocessing"]["crop"] == 24 and meta["preprocessing"]["channel_order"] == "BGR"
        assert meta["model"]["weights_sha1"] and meta["schema_version"] == 1
        infos = store.infos()
        assert sorted(i["path"] for i in infos) == sorted(str(p) for p in images)
        assert {i["label"] for i in infos} == {0, 1}
        latent = store.latent(np.arange(10))
        np.testing.assert_array_equal(store.codes(), np.packbits(latent > 0.5, axis=1))
        # fc7 of image 3 by a direct pycaffe forward with caffe.io.Transformer
        path = infos[3]["path"]
        deploy, weights = tiny
        net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
        t = caffe.io.Transformer({"data": (1, 3, 24, 24)})
        t.set_transpose("data", (2, 0, 1))
        t.set_channel_swap("data", (2, 1, 0))
        t.set_raw_scale("data", 255)
        t.set_mean("data", np.array([104, 117, 123], dtype=np.float32))
        from dlbhc.images import read_image, resize_for_net
        rgb = resize_for_net(read_image(path), 24)
        net.blobs["data"].reshape(1, 3, 24, 24)
        net.blobs["data"].data[0] = t.preprocess("data", rgb.astype(np.float32) / 255)
        net.forward()
        np.testing.assert_allclose(store.fc7([3])[0], net.blobs["fc7"].data[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(latent[3], net.blobs["latent"].data[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("crop,mean,order", [(24, (104.0, 117.0, 123.0), "BGR"),
                                              (32, (113.86, 122.93, 125.27), "BGR"),
                                              (7, (1.5, 2.25, 3.125), "RGB")])
def test_batch_transform_is_bit_identical_to_caffe_transformer(caffe, crop, mean, order):
    """extract.py prepares a whole batch of uint8 crops at once; the result
    must be exactly what caffe.io.Transformer gives image by image."""
    from dlbhc.nets.model import BatchTransformer, Preprocessing
    prep = Preprocessing(resize=crop, crop=crop, mean_bgr=mean, channel_order=order)
    crops = np.random.default_rng(crop).integers(0, 256, (5, crop, crop, 3), dtype=np.uint8)
    t = caffe.io.Transformer({"data": (1, 3, crop, crop)})
    t.set_transpose("data", (2, 0, 1))
    if order == "BGR":
        t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.asarray(mean, dtype=np.float32))
    expected = np.stack([t.preprocess("data", c.astype(np.float32) / 255) for c in crops])
    got = BatchTransformer(prep)(crops)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    # and the channels really are swapped (a no-op transform would not pass)
    if order == "BGR":
        assert not np.array_equal(got[:, 0], crops[..., 0].astype(np.float32) - mean[0])
        np.testing.assert_allclose(got[:, 0], crops[..., 2].astype(np.float32) - mean[0], atol=1e-3)


@pytest.mark.slow
def test_rerun_adds_nothing_and_new_images_are_appended(tiny, tmp_path):
    from dlbhc.store.database import FeatureStore
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "db.lmdb"
    run_extract([tmp_path / "imgs", "--out", out, *model_args(tiny)])
    second = run_extract([tmp_path / "imgs", "--out", out, *model_args(tiny)])
    assert "stored 0 new images" in second.stdout
    make_images(tmp_path / "imgs", 3, classes=("birds",), seed=5)
    run_extract([tmp_path / "imgs", "--out", out, *model_args(tiny)])
    with FeatureStore.open(out) as store:
        paths = [i["path"] for i in store.infos()]
    assert len(paths) == len(set(paths)) == 9


def test_killed_run_then_rerun_holds_every_image_once(caffe, tmp_path):
    from dlbhc.errors import UserError
    from dlbhc.store.database import FeatureStore
    # a heavier net and many small batches, so the kill lands mid-way
    deploy, weights = make_tiny_net(caffe, tmp_path, size=24, fc7=2048)
    make_images(tmp_path / "imgs", 240)
    out = tmp_path / "db.lmdb"
    args = [sys.executable, str(EXTRACT), tmp_path / "imgs", "--out", out, "--deploy", deploy,
            "--weights", weights, "--mean", MEAN, "--batch-size", 2, "--commit-every", 0]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
        if (out / "data.mdb").exists():
            try:
                store = FeatureStore.open(out)
            except UserError:  # created but not yet complete: look again
                continue
            with store:
                if store.count >= 20:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = store.count
                    break
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, \
        "the run finished before it could be killed"
    with FeatureStore.open(out) as store:
        assert 20 <= store.count < 240
    run_extract([tmp_path / "imgs", "--out", out, "--deploy", deploy, "--weights", weights,
                 "--mean", MEAN, "--batch-size", 8])
    with FeatureStore.open(out) as store:
        paths = [i["path"] for i in store.infos()]
        assert store.count == 240
        assert len(set(paths)) == 240
        assert store.codes().shape == (240, 2)


def write_bad_and_odd_images(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(500))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    Image.fromarray(rgb).save(folder / "truncated.jpg")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(folder / "alpha.png")
    Image.fromarray(rgb).save(folder / "ok.jpg")
    return {"corrupt.jpg", "empty.jpg", "notes.jpg", "truncated.jpg"}, \
        {"gray.png", "cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "ok.jpg"}


def test_bad_images_are_reported_and_skipped(tiny, tmp_path):
    from dlbhc.store.database import FeatureStore
    bad, good = write_bad_and_odd_images(tmp_path / "mixed")
    out = tmp_path / "db.lmdb"
    result = run_extract([tmp_path / "mixed", "--out", out, *model_args(tiny)], check=False)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    for name in bad:
        assert name in result.stderr
    listed = (tmp_path / "db.lmdb.skipped.tsv").read_text()
    assert {Path(line.split("\t")[0]).name for line in listed.splitlines()
            if not line.startswith("#")} == bad
    with FeatureStore.open(out) as store:
        assert {Path(i["path"]).name for i in store.infos()} == good


def test_a_list_with_class_names_stores_the_labels_training_reads(tiny, tmp_path):
    """A list of `path class` lines (what train.py --data takes) handed to
    extract.py: every image is stored (not skipped as a missing file named
    `path class`), labelled as the training side labels the same list."""
    import os
    from dlbhc.datasets.collection import load_collection
    from dlbhc.store.database import FeatureStore
    images = make_images(tmp_path / "imgs", 6, classes=("dogs", "cats"))
    lst = tmp_path / "named.txt"
    lst.write_text("".join(f"{p.relative_to(tmp_path)} {p.parent.name}\n" for p in images))
    out = tmp_path / "db.lmdb"
    run_extract([lst, "--out", out, *model_args(tiny)])     # exit 0: nothing skipped
    with FeatureStore.open(out) as store:
        stored = {info["path"]: info["label"] for info in store.infos()}
    collection = load_collection(lst)
    trained = {os.path.abspath(it.path): it.label for it in collection.train + collection.test}
    assert collection.classes == ["cats", "dogs"]
    assert stored == trained and sorted(stored.values()) == [0, 0, 0, 1, 1, 1]


def test_leveldb_backend_holds_the_same_records(tiny, tmp_path):
    from dlbhc.store.database import FeatureStore
    make_images(tmp_path / "imgs", 7)
    run_extract([tmp_path / "imgs", "--out", tmp_path / "a.lmdb", *model_args(tiny)])
    run_extract([tmp_path / "imgs", "--out", tmp_path / "b.leveldb", "--backend", "leveldb",
                 *model_args(tiny)])
    with FeatureStore.open(tmp_path / "a.lmdb") as a, FeatureStore.open(tmp_path / "b.leveldb") as b:
        assert b.meta["backend"] == "leveldb" and a.count == b.count == 7
        assert a.infos() == b.infos()
        np.testing.assert_array_equal(a.codes(), b.codes())
        np.testing.assert_array_equal(a.fc7(range(7)), b.fc7(range(7)))


@pytest.mark.slow
def test_two_shards_merged_equal_a_single_run(tiny, tmp_path):
    from dlbhc.store.database import FeatureStore
    make_images(tmp_path / "imgs", 9)
    common = [tmp_path / "imgs", *model_args(tiny)]
    run_extract([*common, "--out", tmp_path / "single.lmdb"])
    run_extract([*common, "--out", tmp_path / "s0.lmdb", "--shard", "0/2"])
    run_extract([*common, "--out", tmp_path / "s1.lmdb", "--shard", "1/2"])
    run_extract(["--merge", tmp_path / "s0.lmdb", tmp_path / "s1.lmdb",
                 "--out", tmp_path / "merged.lmdb", *common])
    with FeatureStore.open(tmp_path / "single.lmdb") as s, \
            FeatureStore.open(tmp_path / "merged.lmdb") as m:
        assert s.count == m.count == 9
        assert s.infos() == m.infos()
        np.testing.assert_array_equal(s.codes(), m.codes())
        np.testing.assert_array_equal(s.fc7(range(9)), m.fc7(range(9)))
        np.testing.assert_array_equal(s.latent(range(9)), m.latent(range(9)))


@pytest.mark.slow
def test_a_different_model_is_refused(caffe, tiny, tmp_path):
    make_images(tmp_path / "imgs", 4)
    out = tmp_path / "db.lmdb"
    run_extract([tmp_path / "imgs", "--out", out, *model_args(tiny)])
    deploy20, weights20 = make_tiny_net(caffe, tmp_path, bits=20)
    result = run_extract([tmp_path / "imgs", "--out", out, "--deploy", deploy20,
                          "--weights", weights20, "--mean", MEAN], check=False)
    assert result.returncode == 2
    assert "does not match the feature database" in result.stderr and "bits" in result.stderr
    assert "Traceback" not in result.stderr
    # weights of another shape than the deploy net: a message, not a Caffe abort
    result = run_extract([tmp_path / "imgs", "--out", tmp_path / "other.lmdb",
                          "--deploy", tiny[0], "--weights", weights20, "--mean", MEAN], check=False)
    assert result.returncode == 2 and "does not fit" in result.stderr, result.stderr[-500:]


def test_missing_inputs_give_clear_errors(tiny, tmp_path):
    result = run_extract([tmp_path / "nowhere", "--out", tmp_path / "db.lmdb", *model_args(tiny)],
                         check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr


def test_gpu_switch_on_a_cpu_only_build_is_a_clear_error(tiny, tmp_path):
    from dlbhc.nets.caffe_env import is_cpu_only_build
    if not is_cpu_only_build():
        pytest.skip("this Caffe is a GPU build")
    make_images(tmp_path / "imgs", 2)
    result = run_extract([tmp_path / "imgs", "--out", tmp_path / "db.lmdb", *model_args(tiny),
                          "--gpu"], check=False)
    assert result.returncode == 2 and "CPU_ONLY" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "db.lmdb").exists()



class FakeBlas:
    """Stands in for OpenBLAS's get/set_num_threads."""

    def __init__(self, threads):
        self.threads, self.history = threads, []

    def control(self):
        return (lambda: self.threads), self._set

    def _set(self, n):
        self.threads = n
        self.history.append(n)


@pytest.mark.parametrize("faster", [1, 4])
def test_blas_tuner_keeps_the_faster_thread_count(faster):
    from dlbhc.extraction.pipeline import BlasThreadTuner
    blas = FakeBlas(4)
    tuner = BlasThreadTuner(blas.control(), trials=3)
    for _ in range(1 + 2 * 3):          # a warm-up batch, then 3 timed batches of each
        assert tuner.tuning
        tuner.before_batch()
        seconds = 1.0 if blas.threads == faster else 1.5
        tuner.after_batch(seconds, 100)
    assert not tuner.tuning and tuner.choice == faster and blas.threads == faster
    assert sorted(set(blas.history[:7])) == [1, 4]      # both were tried
    tuner.before_batch()
    assert blas.threads == faster                       # and it stays
    assert f"BLAS threads {faster}" in tuner.describe()


def test_blas_tuner_fixed_single_or_absent():
    from dlbhc.extraction.pipeline import BlasThreadTuner
    blas = FakeBlas(2)
    tuner = BlasThreadTuner(blas.control(), fixed=1)
    assert not tuner.tuning and blas.threads == 1 and tuner.describe() == "BLAS threads 1"
    assert not BlasThreadTuner(FakeBlas(1).control()).tuning
    absent = BlasThreadTuner(None)
    absent.before_batch()
    absent.after_batch(1.0, 10)
    assert not absent.tuning and absent.describe() is None


def test_blas_control_reaches_caffes_openblas(caffe):
    from dlbhc.nets.caffe_env import blas_threads_control
    control = blas_threads_control()
    if control is None:
        pytest.skip("Caffe is not linked with OpenBLAS here")
    get, set_ = control
    before = get()
    try:
        set_(1)
        assert get() == 1
    finally:
        set_(before)


@pytest.mark.slow
def test_forward_workers_store_what_the_main_process_net_stores(tiny, tmp_path):
    """On the CPU with 2+ workers each worker runs its own single-threaded
    net; the store must hold what one net in the main process computes (up
    to BLAS summation order), in the same order, bad files skipped alike."""
    from dlbhc.store.database import FeatureStore
    make_images(tmp_path / "imgs", 11)
    (tmp_path / "imgs" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    runs = {}
    for mode, extra in (("main", ["--workers", "0"]), ("workers", ["--workers", "2"]),
                        ("tuned", ["--workers", "1"])):
        out = run_extract([tmp_path / "imgs", "--out", tmp_path / f"{mode}.lmdb",
                           *model_args(tiny), *extra], check=False)
        assert out.returncode == 3, out.stderr[-2000:]          # the broken file
        runs[mode] = out.stdout
    assert "forward in 2 worker processes" in runs["workers"]
    assert "forward in" not in runs["main"] and "forward in" not in runs["tuned"]
    with FeatureStore.open(tmp_path / "main.lmdb") as a, \
            FeatureStore.open(tmp_path / "workers.lmdb") as b:
        assert a.count == b.count == 11
        assert [i["path"] for i in a.infos()] == [i["path"] for i in b.infos()]
        # Summation order (one BLAS thread per worker against the main
        # process's threads, and the CPU's kernel choice) moves float32 sums by
        # a few ulps of the largest term: near-zero values then differ by
        # ~1e-6 of the row's scale (4.5e-6 seen at a scale of 20), which a
        # fixed atol of 1e-6 failed on some CPUs. Another image's features
        # differ by the scale itself.
        fc7_a, fc7_b = a.fc7(range(11)), b.fc7(range(11))
        scale = float(np.abs(fc7_a).max())
        np.testing.assert_allclose(fc7_a, fc7_b, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(a.latent(range(11)), b.latent(range(11)), rtol=1e-5, atol=1e-6)


# ---- the model and the committer, in this process ---------------------------

def test_hashnet_loads_what_caffe_net_loads(caffe, tiny, tmp_path):
    """HashNet builds the net once and copies the weights in after its
    checks: the same parameters and outputs as caffe.Net(..., weights=...),
    checked or not (forward workers), and describe() hashes both files."""
    from dlbhc.search.codes import pack_codes
    from dlbhc.nets.model import BatchTransformer, HashNet, ImagePreparer
    deploy, weights = tiny
    reference = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    paths = make_images(tmp_path / "imgs", 5)
    results = []
    for check in (True, False):
        net = HashNet(deploy, weights, MEAN, check=check)
        assert list(net.net.params) == list(reference.params)
        for name, params in reference.params.items():
            for mine, theirs in zip(net.net.params[name], params):
                np.testing.assert_array_equal(mine.data, theirs.data, err_msg=name)
        model = net.describe()["model"]
        assert model["weights_sha1"] == hashlib.sha1(weights.read_bytes()).hexdigest()
        assert model["deploy_sha1"] == hashlib.sha1(deploy.read_bytes()).hexdigest()
        assert (model["deploy"], model["weights"]) == (str(deploy), str(weights))
        results.append(net.features_of_paths(paths))
    (fc7, latent, codes), again = results
    assert fc7.shape == (5, 32) and latent.shape == (5, 12) and codes.shape == (5, 2)
    np.testing.assert_array_equal(codes, pack_codes(latent))
    np.testing.assert_array_equal(codes, np.packbits(latent > 0.5, axis=1))
    for a, b in zip(results[0], again):
        np.testing.assert_array_equal(a, b)
    # the reference net on the same input blob gives the same outputs
    batch = BatchTransformer(net.prep)(np.stack([ImagePreparer(net.prep)(p) for p in paths]))
    reference.blobs["data"].reshape(*batch.shape)
    reference.blobs["data"].data[...] = batch
    reference.forward()
    np.testing.assert_array_equal(reference.blobs["fc7"].data, fc7)
    np.testing.assert_array_equal(reference.blobs["latent"].data, latent)


def test_hashnet_refuses_a_broken_deploy_or_weights_file(caffe, tiny, tmp_path):
    from dlbhc.errors import UserError
    from dlbhc.nets.model import HashNet
    deploy, weights = tiny
    broken = tmp_path / "broken_deploy.prototxt"
    broken.write_text('layer { name: "data" type: "Input" top: "data"\n')
    with pytest.raises(UserError, match="broken_deploy.prototxt"):
        HashNet(broken, weights, MEAN)
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\x00not a caffemodel at all")
    with pytest.raises(UserError, match="garbage.caffemodel"):
        HashNet(deploy, garbage, MEAN)


class FakeStore:
    """Records what the committer appends."""

    def __init__(self):
        self.appends = []

    def append(self, fc7, latent, codes, infos, remove=()):
        self.appends.append((fc7, latent, codes, list(infos)))


def test_committer_stages_batches_and_commits_them_together():
    from dlbhc.extraction.pipeline import Committer, ExtractionReport
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(n, 6)).astype(np.float32), rng.random((n, 10)),
                [{"path": f"p{n}_{i}", "label": 0, "seq": i} for i in range(n)])
               for n in (3, 2, 4)]
    store, report = FakeStore(), ExtractionReport()
    committer = Committer(store, report, commit_seconds=3600)
    for fc7, latent, infos in batches:
        committer.stage(fc7, latent, infos)
    committer.stage(None, None, [])                 # a batch of skipped images only
    assert store.appends == [] and report.stored == 0
    committer.commit()
    committer.commit()                              # nothing left: no empty append
    assert len(store.appends) == 1 and report.stored == 9
    fc7, latent, codes, infos = store.appends[0]
    np.testing.assert_array_equal(fc7, np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(latent, np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(codes, np.packbits(latent > 0.5, axis=1))
    assert infos == [info for b in batches for info in b[2]]
    # commit_seconds 0: every batch is its own transaction
    store, report = FakeStore(), ExtractionReport()
    committer = Committer(store, report, commit_seconds=0)
    for fc7, latent, infos in batches:
        committer.stage(fc7, latent, infos)
    assert [len(a[3]) for a in store.appends] == [3, 2, 4] and report.stored == 9



@pytest.mark.slow
def test_blas_threads_is_applied_with_or_without_decoding_workers(tiny, tmp_path):
    """--blas-threads N runs the net in the main process with N threads, also
    with --workers 0 (decoding in the main process too)."""
    from dlbhc.nets.caffe_env import blas_threads_control
    if blas_threads_control() is None:
        pytest.skip("Caffe is not linked with OpenBLAS here")
    make_images(tmp_path / "imgs", 5)
    for workers in (0, 1, 2):
        out = run_extract([tmp_path / "imgs", "--out", tmp_path / f"w{workers}.lmdb",
                           *model_args(tiny), "--workers", workers, "--blas-threads", 1])
        assert "BLAS threads 1" in out.stdout and "forward in" not in out.stdout, out.stdout
