"""Issue 20 part 2: codes for collections without labels (ITQ).

search.itq's fitting (the rotation stays orthogonal, the quantisation loss
never rises), the latent layer the recipe writes (the net's codes are
numpy ITQ's, bit for bit), a folder of loose images end to end (train.py,
extract.py, retrieve.py, the service), and the messages for a mixed folder,
a folder of one image and an unreadable image.
"""
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dlbhc.datasets.collection import has_labels, load_collection
from dlbhc.nets.model import HashNet, ImagePreparer
from dlbhc.search.choice import UNMEASURED_STAGE
from dlbhc.search.codes import pack_codes
from dlbhc.search.itq import fit_itq, fit_lsh, fit_pca_sign
from dlbhc.serving.service import QueryService
from dlbhc.serving.webapp import create_app
from dlbhc.training.unsupervised import UnsupervisedRecipe
from dlbhc.images import list_images
from helpers import EXTRACT, ROOT, TRAIN, run_script

RETRIEVE = ROOT / "python" / "retrieve.py"

BACKBONE = "efficientnet_lite0"


def clustered_features(n=600, dim=40, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (clusters, dim))
    mixing = rng.normal(0, 1, (dim, dim))
    return (centres[rng.integers(0, clusters, n)] + rng.normal(0, 1, (n, dim))) @ mixing


def loose_images(folder, n=12, size=48, seed=0):
    """n images directly in `folder` (no class subfolders): 3 colour groups."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
        img[..., i % 3] += 150
        Image.fromarray(img).save(folder / f"img{i:03d}.jpg", quality=95)
    return folder


# ---- the fitting -----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 24, 40])
def test_itq_rotation_stays_orthogonal_and_its_loss_never_rises(bits):
    x = clustered_features()
    h = fit_itq(x, bits, iterations=30, seed=3)
    np.testing.assert_allclose(h.rotation @ h.rotation.T, np.eye(bits), atol=1e-10)
    np.testing.assert_allclose(h.projection.T @ h.projection, np.eye(bits), atol=1e-10)
    losses = np.array(h.losses)
    assert len(losses) == 30
    assert np.all(np.diff(losses) <= 1e-9 * losses[0])
    # the rotation helps: the loss ends below PCA-sign's (rotation = I)
    v = fit_pca_sign(x, bits).project(x)
    assert losses[-1] < ((np.where(v >= 0, 1, -1) - v) ** 2).sum()
    # seeded: the same codes again
    np.testing.assert_array_equal(fit_itq(x, bits, iterations=30, seed=3).codes(x), h.codes(x))


def test_hashes_refuse_more_bits_than_dimensions_and_a_single_vector():
    x = clustered_features(dim=10)
    with pytest.raises(ValueError, match="at most 10"):
        fit_itq(x, 11)
    with pytest.raises(ValueError, match="at least 2"):
        fit_lsh(x[:1], 4)


def test_itq_balances_its_bits_better_than_lsh_on_clustered_features():
    x = clustered_features(n=2000)
    itq, lsh = fit_itq(x, 16, seed=0).codes(x), fit_lsh(x, 16, seed=0).codes(x)
    assert itq.shape == lsh.shape == (2000, 16)
    # each ITQ bit splits the data; none is (nearly) constant
    assert np.all(np.abs(itq.mean(axis=0) - 0.5) < 0.45)


# ---- the net ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(caffe, tmp_path_factory):
    """An unsupervised run on 12 loose images at 64 px, 12 bits: python/train.py."""
    tmp = tmp_path_factory.mktemp("unsupervised")
    photos = loose_images(tmp / "photos")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = run_script(TRAIN, ["--data", photos, "--runs-dir", tmp / "runs", "--size", 64,
                             "--resize", 64, "--bits", 12], timeout=900)
    run = tmp / "runs" / f"{BACKBONE}_hash12_photos_itq"
    return {"tmp": tmp, "photos": photos, "run": run, "stdout": out.stdout,
            "stderr": out.stderr,
            "summary": json.loads((run / "train_summary.json").read_text())}


def test_the_latent_layer_reproduces_numpy_itq_codes_bit_for_bit(caffe, tmp_path):
    photos = loose_images(tmp_path / "photos", n=16, seed=4)
    items = list_images(photos).items
    (tmp_path / "run").mkdir()
    recipe = UnsupervisedRecipe(BACKBONE, 20, items, tmp_path / "run", "run", size=64,
                                resize=64, workers=1)
    features, kept, skipped = recipe.pooled_features(tmp_path)
    assert len(kept) == 16 and not skipped and features.shape == (16, 1280)
    hash_ = fit_itq(features, 20, seed=5)
    weights = recipe.write_weights(hash_)
    net = HashNet(recipe.deploy, weights, recipe.prep.mean_bgr, resize=64)
    prepare = ImagePreparer(net.prep)
    fc7, latent = net.forward_crops(np.stack([prepare(it.path) for it in items]))
    np.testing.assert_allclose(fc7, features, rtol=0, atol=1e-4)
    expected = hash_.codes(features)
    assert 0.2 < expected.mean() < 0.8
    np.testing.assert_array_equal(latent > 0.5, expected)
    np.testing.assert_array_equal(pack_codes(latent), np.packbits(expected, axis=1))


def test_a_folder_without_labels_runs_end_to_end(caffe, tiny_run):
    run, summary = tiny_run["run"], tiny_run["summary"]
    assert "no class subfolders" in tiny_run["stderr"]
    assert summary["method"] == "itq" and summary["images"] == 12 and summary["skipped"] == 1
    losses = summary["quantisation_loss"]
    assert losses[1] <= losses[0]
    # the unreadable image is reported, listed, and left where it was
    assert "broken.jpg" in tiny_run["stderr"]
    assert "broken.jpg" in (run / "train.skipped.tsv").read_text()
    assert (tiny_run["photos"] / "broken.jpg").exists()
    assert len((run / "train.txt").read_text().splitlines()) == 12
    # the four commands the run prints, without --mean
    db = tiny_run["tmp"] / "db.lmdb"
    run_script(EXTRACT, [run / "train.txt", "--deploy", run / "deploy.prototxt",
                         "--weights", summary["weights"], "--out", db])
    query = tiny_run["photos"] / "img004.jpg"
    out = run_script(RETRIEVE, [query, "--db", db, "--top-k", 3, "--json"])
    answer = json.loads(out.stdout)
    answer = answer[0] if isinstance(answer, list) else answer
    top = answer["results"][0]
    assert top["hamming"] == 0 and top["path"].endswith("img004.jpg")
    # no labels to measure the fine stage on: the run records the stage the
    # benchmark measured (the query's latent against the codes), searches use it
    assert json.loads((run / "rerank.json").read_text())["choice"] == UNMEASURED_STAGE == "asymmetric"
    from dlbhc.serving.retrieval import Retriever
    retriever = Retriever(db)
    try:
        assert retriever.stage == "asymmetric" and "without labels" in retriever.auto_note
        assert answer["rerank"] == retriever.rerank != "fc7"
    finally:
        retriever.close()
    service = QueryService(db, refresh_seconds=0)
    try:
        with TestClient(create_app(service)) as client:
            response = client.post("/api/search?top_k=3",
                                   files=[("image", ("q.jpg", query.read_bytes()))])
            assert response.status_code == 200, response.text
            assert response.json()[0]["results"][0]["hamming"] == 0
    finally:
        service.close()


# ---- messages --------------------------------------------------------------------------

def test_a_mixed_folder_trains_with_labels_and_says_how_to_use_all_images(tmp_path):
    folder = tmp_path / "mixed"
    for name in ("cats", "dogs"):
        loose_images(folder / name, n=3)
    loose_images(folder, n=2, seed=1)
    assert has_labels(folder)
    coll = load_collection(folder)
    [note] = [n for n in coll.notes if "class subfolder" in n]
    assert "training with labels" in note and "--unsupervised" in note
    assert "all 8 images" in note
    assert not has_labels(loose_images(tmp_path / "loose", n=2))


def test_a_folder_of_one_image_is_refused_with_a_message(tmp_path):
    loose_images(tmp_path / "one", n=1)
    out = run_script(TRAIN, ["--data", tmp_path / "one", "--runs-dir", tmp_path / "runs"],
                     check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "at least 2 images" in out.stderr and "img000.jpg" in out.stderr
    assert (tmp_path / "one" / "img000.jpg").exists()


def test_unsupervised_with_the_small_net_is_refused(tmp_path):
    loose_images(tmp_path / "few", n=3)
    out = run_script(TRAIN, ["--data", tmp_path / "few", "--net", "cifar", "--unsupervised",
                             "--runs-dir", tmp_path / "runs"], check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "pooled features" in out.stderr
