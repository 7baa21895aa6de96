"""The head refitted on the trained net's features (training/headfit.py):
the numpy fit, its layout in Caffe's layers, and the run's step that keeps
it only when it ranks held-out images better."""
import json
import os

import numpy as np
import pytest

from dlbhc.nets.model import HashNet, Preprocessing, write_preprocessing_record
from dlbhc.training import headfit
from dlbhc.training.headfit import Head, fit_head, net_head, refit_head, write_head
from dlbhc.training.recipe import closing_steps
from helpers import PROTOTXT, ROOT, run_script
from test_own_data import CLASSES, colour_collection

DEPLOY = PROTOTXT / "fast_hash12_deploy.prototxt"
REFIT = ROOT / "python" / "refit_head.py"


def clusters(n_per_class=200, dim=16, classes=3, seed=0):
    """Gaussian clusters apart in their first 4 features, the rest noise;
    then every feature scaled and shifted by its own factor, the noise by
    far more: a fit that did not fold its standardisation into the layer's
    weights would let the noise decide."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((classes, dim))
    centres[:, :4] = rng.normal(0, 5, (classes, 4))
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + rng.normal(0, 1, (len(labels), dim))
    scale = np.concatenate([rng.uniform(0.01, 0.1, 4), rng.uniform(100, 1000, dim - 4)])
    return x * scale + rng.uniform(-500, 500, dim), labels


def test_fit_head_classifies_and_codes_clusters_of_any_scale():
    x, labels = clusters()
    head = fit_head(x, labels, bits=8, num_classes=3, steps=300, batch=100, seed=1)
    assert head.latent_weights.shape == (8, 16) and head.classifier_weights.shape == (3, 8)
    assert (head.classes(x) == labels).mean() > 0.95
    codes = head.latent(x) > 0.5
    hamming = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    same = labels[:, None] == labels[None, :]
    assert hamming[same].mean() + 2 < hamming[~same].mean()
    again = fit_head(x, labels, bits=8, num_classes=3, steps=300, batch=100, seed=1)
    np.testing.assert_array_equal(again.latent_weights, head.latent_weights)


def test_fit_head_rejects_labels_outside_the_classes():
    x, labels = clusters(n_per_class=5)
    with pytest.raises(ValueError, match="0..1"):
        fit_head(x, labels, bits=4, num_classes=2)


def random_net(caffe, folder):
    caffe.set_random_seed(0)
    net = caffe.Net(str(DEPLOY), caffe.TEST)
    weights = folder / "w.caffemodel"
    net.save(str(weights))
    write_preprocessing_record(folder, Preprocessing(32, 32, (100, 110, 120)))
    return weights


def test_the_head_written_into_the_net_computes_the_fitted_latent(caffe, tmp_path):
    snapshot = random_net(caffe, tmp_path)
    link = tmp_path / "model.caffemodel"
    os.symlink(snapshot.name, link)                 # a run's link to its last snapshot
    before = snapshot.read_bytes()
    old = net_head(caffe.Net(str(DEPLOY), str(snapshot), caffe.TEST), "fc8_latent")
    rng = np.random.default_rng(0)
    head = Head(*(rng.normal(0, 0.2, a.shape).astype(np.float32) for a in (
        old.latent_weights, old.latent_bias, old.classifier_weights, old.classifier_bias)))
    write_head(DEPLOY, link, head, link)
    assert snapshot.read_bytes() == before and not link.is_symlink()
    net = HashNet(DEPLOY, link)
    fc7, latent = net.forward_crops(rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8))
    np.testing.assert_allclose(latent, head.latent(fc7), rtol=1e-5, atol=1e-6)
    prob = net.net.forward(start="fc9_classifier", end="prob")["prob"].reshape(5, -1)
    np.testing.assert_array_equal(np.argmax(prob, axis=1), head.classes(fc7))


def labelled_lists(folder, per_class_train, out):
    """train.txt and test.txt (`path label`) of a colour collection: the
    first per_class_train images of each class for training."""
    lines = {"train": [], "test": []}
    for label, name in enumerate(CLASSES):
        for i, path in enumerate(sorted((folder / name).glob("*.jpg"))):
            lines["train" if i < per_class_train else "test"].append(f"{path} {label}")
    for split, rows in lines.items():
        (out / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return out / "train.txt", out / "test.txt"


def test_the_refit_is_kept_only_when_it_ranks_held_out_images_better(caffe, tmp_path,
                                                                      monkeypatch):
    colour_collection(tmp_path / "photos", per_class=50, size=32)
    train_list, test_list = labelled_lists(tmp_path / "photos", 30, tmp_path)
    weights = random_net(caffe, tmp_path)
    # a run's closing steps: the refit, then the fine stage chosen for the refitted weights
    added = closing_steps(tmp_path, DEPLOY, weights, test_list, train_list)
    record = json.loads((tmp_path / "head_refit.json").read_text())
    assert record["kept"] and record["coarse_after"] > record["coarse_before"]
    assert record["queries"] == 60 and record["fit_images"] == 90
    assert added["head_refit"]["coarse_after"] == record["coarse_after"]
    assert added["rerank"]["choice"] == json.loads((tmp_path / "rerank.json").read_text())["choice"]
    assert record["accuracy_after"] > 0.9              # colours: easy once the head fits
    # a head that ranks worse (every code the same) leaves the weights untouched
    refitted = weights.read_bytes()
    monkeypatch.setattr(headfit, "fit_head", lambda x, labels, bits, k, seed: Head(
        np.zeros((bits, x.shape[1]), np.float32), np.zeros(bits, np.float32),
        np.zeros((k, bits), np.float32), np.zeros(k, np.float32)))
    second = refit_head(tmp_path, DEPLOY, weights, train_list, test_list)
    assert not second["kept"] and second["coarse_after"] < second["coarse_before"]
    assert weights.read_bytes() == refitted


def test_too_few_held_out_images_leave_the_weights_as_they_were(caffe, tmp_path):
    colour_collection(tmp_path / "photos", per_class=20, size=32)
    train_list, test_list = labelled_lists(tmp_path / "photos", 10, tmp_path)
    weights = random_net(caffe, tmp_path)
    before = weights.read_bytes()
    assert refit_head(tmp_path, DEPLOY, weights, train_list, test_list) is None
    assert weights.read_bytes() == before and not (tmp_path / "head_refit.json").exists()


def test_refit_head_script_upgrades_a_model_and_keeps_the_weights_before(caffe, tmp_path):
    colour_collection(tmp_path / "photos", per_class=50, size=32)
    train_list, test_list = labelled_lists(tmp_path / "photos", 30, tmp_path)
    model = tmp_path / "run"
    model.mkdir()
    weights = random_net(caffe, model)
    original = weights.read_bytes()
    missing = run_script(REFIT, [weights, "--deploy", DEPLOY], check=False)
    assert missing.returncode == 2 and "pass --train and --held-out" in missing.stderr
    assert "Traceback" not in missing.stderr and weights.read_bytes() == original
    # too few held-out images to judge a refit: nothing changes, no copy is left behind
    few = tmp_path / "few.txt"
    few.write_text("".join(test_list.read_text().splitlines(keepends=True)[:10]))
    unjudged = run_script(REFIT, [weights, "--deploy", DEPLOY, "--train", train_list,
                                  "--held-out", few])
    assert "head not refitted" in unjudged.stdout and weights.read_bytes() == original
    assert not (model / "w.before_refit.caffemodel").exists()
    out = run_script(REFIT, [weights, "--deploy", DEPLOY, "--train", train_list,
                             "--held-out", test_list])
    assert "new head written" in out.stdout
    assert (model / "w.before_refit.caffemodel").read_bytes() == original
    assert weights.read_bytes() != original
    assert json.loads((model / "head_refit.json").read_text())["kept"]
    # the fine stage was chosen again, and names the lists a second run defaults to
    assert json.loads((model / "rerank.json").read_text())["held_out"] == str(test_list)
    again = run_script(REFIT, [weights, "--deploy", DEPLOY])
    assert "coarse mAP" in again.stdout
    assert (model / "w.before_refit.caffemodel").read_bytes() == original
