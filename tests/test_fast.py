"""The fast from-scratch recipe (issue 19): the net, its whitening layer,
label smoothing, the update, the schedule, weight averaging, augmentation,
flip averaging, a tiny end-to-end run and resuming."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from dlbhc.nets.model import HashNet, Preprocessing, write_preprocessing_record
from dlbhc.training.augment import AugmentedBatches
from dlbhc.training.fast import FastRecipe, smoothed_cross_entropy, smoothing_matrix
from dlbhc.training.fast_schedule import FastSchedule, choose_kept, choose_shift
from dlbhc.training.sgd import NesterovSGD, WeightAverage, triangle_lr
from dlbhc.training.whitening import image_patches, whitening_filters, whitening_sample
from helpers import PROTOTXT, TRAIN, run_script
from test_own_data import colour_collection


# ---- the net ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [12, 48, 128])
def test_fast_net_blob_shapes(caffe, bits):
    deploy = caffe.Net(str(PROTOTXT / f"fast_hash{bits}_deploy.prototxt"), caffe.TEST)
    shapes = {name: blob.data.shape for name, blob in deploy.blobs.items()}
    assert shapes["data"] == (100, 3, 32, 32)
    assert shapes["whiten"] == (100, 24, 31, 31)          # 2x2, no padding
    assert shapes["conv1_1_pool"] == (100, 64, 16, 16)    # Caffe pools with ceil
    assert shapes["conv2_1_pool"] == (100, 128, 8, 8)
    assert shapes["conv3_1_pool"] == (100, 128, 4, 4)
    assert shapes["fc7"] == (100, 128, 1, 1)
    assert shapes["latent"] == (100, bits)
    assert shapes["prob"] == (100, 10)
    train = caffe.Net(str(PROTOTXT / f"fast_hash{bits}_train.prototxt"), caffe.TRAIN)
    assert train.blobs["smoothing"].data.shape == (1, 1, 10, 10)
    assert train.blobs["loss"].data.shape == ()
    # the whitening layer is frozen: the update skips it
    sgd = NesterovSGD(train, PROTOTXT / f"fast_hash{bits}_train.prototxt")
    learned = {key.split("/")[0] for key, *_ in sgd.blobs}
    assert "whiten" not in learned and not any(k.endswith("_bn") for k in learned)
    assert {"conv1_1", "conv1_1_bias", "fc8_latent", "fc9_classifier"} <= learned


# ---- whitening ---------------------------------------------------------------------------

def correlated_images(seed=0, n=200):
    """Smooth (neighbouring pixels correlated), channel-mixed images."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, 3, 17, 17))
    images = np.kron(noise, np.ones((1, 1, 2, 2)))[:, :, :32, :32]
    images += 0.3 * rng.normal(size=images.shape)
    mix = np.array([[1.0, 0.5, 0.2], [0.3, 1.0, 0.4], [0.1, 0.6, 1.0]])
    return np.einsum("ij,njhw->nihw", mix, images) * 40


def test_whitened_patches_have_identity_covariance():
    images = correlated_images()
    filters = whitening_filters(images, kernel=2, relative_eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    patches = image_patches(images, 2)
    patches -= patches.mean(axis=0)
    raw = patches.T @ patches / len(patches)
    assert np.abs(raw - np.diag(np.diag(raw))).max() > 0.3 * np.diag(raw).min()  # correlated
    whitened = patches @ filters[:12].reshape(12, -1).T.astype(np.float64)
    covariance = whitened.T @ whitened / len(whitened)
    np.testing.assert_allclose(covariance, np.eye(12), atol=1e-4)
    np.testing.assert_array_equal(filters[12:], -filters[:12])
    # the default eps only shrinks the weakest directions, towards but below 1
    damped = whitening_filters(images, kernel=2)[:12].reshape(12, -1).astype(np.float64)
    variances = np.diag((patches @ damped.T).T @ (patches @ damped.T) / len(patches))
    assert np.all(variances < 1) and np.all(variances > 0.9)


def test_whitening_sample_spans_a_list_sorted_by_class():
    # 10 classes of 1,000 images in a row, as CIFAR-10's training list
    images = np.repeat(np.arange(10, dtype=np.uint8), 1000)[:, None, None, None] * np.ones(
        (1, 2, 2, 3), np.uint8)
    sample = whitening_sample(images, size=500, seed=1)
    assert len(sample) == 500
    counts = np.bincount(sample[:, 0, 0, 0], minlength=10)
    assert counts.min() > 25                               # ~50 of each class
    np.testing.assert_array_equal(sample, whitening_sample(images, size=500, seed=1))
    assert not np.array_equal(sample, whitening_sample(images, size=500, seed=2))
    assert len(whitening_sample(images[:300], size=500)) == 300   # fewer: all of them


def test_caffe_whitening_layer_computes_the_numpy_patches(caffe):
    images = correlated_images(n=4).astype(np.float32)
    net = caffe.Net(str(PROTOTXT / "fast_hash12_deploy.prototxt"), caffe.TEST)
    filters = whitening_filters(images, kernel=2)
    net.params["whiten"][0].data[...] = filters
    net.blobs["data"].reshape(*images.shape)
    net.reshape()
    net.blobs["data"].data[...] = images
    net.forward(end="whiten")      # the layer alone, before its ReLU (in place)
    expected = image_patches(images, 2) @ filters.reshape(24, -1).T.astype(np.float64)
    expected = expected.reshape(4, 31, 31, 24).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(net.blobs["whiten"].data, expected, rtol=1e-4, atol=1e-2)


# ---- label smoothing -----------------------------------------------------------------------

def smoothing_net(caffe, tmp_path, n, classes):
    path = tmp_path / "loss.prototxt"
    # the scores pass a learnable (zero) bias, so that Caffe computes their
    # gradient (force_backward would also ask InfogainLoss for the label's,
    # which it refuses)
    path.write_text(f'''
layer {{ name: "raw" type: "Input" top: "raw" input_param {{ shape {{ dim: {n} dim: {classes} }} }} }}
layer {{ name: "scores" type: "Bias" bottom: "raw" top: "scores" }}
layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: {n} }} }} }}
layer {{ name: "smoothing" type: "Input" top: "smoothing"
        input_param {{ shape {{ dim: 1 dim: 1 dim: {classes} dim: {classes} }} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "scores" top: "prob" }}
layer {{ name: "loss" type: "InfogainLoss" bottom: "prob" bottom: "label" bottom: "smoothing"
        top: "loss" }}
''')
    return caffe.Net(str(path), caffe.TRAIN)


def test_smoothed_loss_equals_the_hand_computed_value(caffe, tmp_path):
    net = smoothing_net(caffe, tmp_path, 2, 3)
    # softmax of (0, ln 2, ln 3) is (1/6, 2/6, 3/6); of (0, 0, 0) a third each
    net.blobs["raw"].data[...] = [[0, math.log(2), math.log(3)], [0, 0, 0]]
    net.blobs["label"].data[...] = [2, 0]
    net.blobs["smoothing"].data[...] = smoothing_matrix(3, 0.3)
    net.forward()
    # targets: 0.7 on the label + 0.1 everywhere
    first = -(0.1 * math.log(1 / 6) + 0.1 * math.log(2 / 6) + 0.8 * math.log(3 / 6))
    second = -math.log(1 / 3)
    assert float(net.blobs["loss"].data) == pytest.approx((first + second) / 2, rel=1e-5)
    assert smoothed_cross_entropy(net.blobs["prob"].data, [2, 0], 0.3) == \
        pytest.approx((first + second) / 2, rel=1e-5)


def test_smoothed_loss_gradient_is_softmax_minus_target(caffe, tmp_path):
    net = smoothing_net(caffe, tmp_path, 4, 5)
    rng = np.random.default_rng(1)
    net.blobs["raw"].data[...] = rng.normal(size=(4, 5))
    net.blobs["label"].data[...] = [0, 4, 2, 2]
    net.blobs["smoothing"].data[...] = smoothing_matrix(5, 0.2)
    net.forward()
    net.backward()
    target = smoothing_matrix(5, 0.2)[[0, 4, 2, 2]]
    expected = (net.blobs["prob"].data - target) / 4
    np.testing.assert_allclose(net.blobs["scores"].diff, expected, atol=1e-6)


# ---- the update, the schedule, the average ----------------------------------------------

def test_triangle_schedule_values():
    lr = lambda step: triangle_lr(step, 100, 0.4, 0.2)
    assert lr(0) == pytest.approx(0.08)            # 0.2 x peak
    assert lr(10) == pytest.approx(0.08 + 0.32 * 0.5)
    assert lr(20) == pytest.approx(0.4)            # the peak, after 20% of the steps
    assert lr(60) == pytest.approx(0.2)            # halfway down
    assert lr(100) == pytest.approx(0.0)
    assert all(lr(s) >= lr(s + 1) for s in range(20, 100))


def test_nesterov_update_equals_caffes_nesterov_solver(caffe, tmp_path):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text('''
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 8 dim: 5 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 8 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
''')
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file}"\nbase_lr: 0.05\nlr_policy: "fixed"\n'
                           'momentum: 0.9\nweight_decay: 0.01\ntype: "Nesterov"\nmax_iter: 10\n'
                           'display: 0\nsnapshot_after_train: false\n')
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)), rng.normal(size=(8, 3))
    solver = caffe.get_solver(str(solver_file))
    ours = caffe.Net(str(net_file), caffe.TRAIN)
    for blob, theirs in zip(ours.params["ip"], solver.net.params["ip"]):
        blob.data[...] = theirs.data
    sgd = NesterovSGD(ours, net_file, momentum=0.9, weight_decay=0.01)
    for net in (solver.net, ours):
        net.blobs["x"].data[...] = x
        net.blobs["y"].data[...] = y
    for _ in range(4):
        solver.step(1)
        sgd.clear_diffs()
        ours.forward()
        ours.backward()
        sgd.step(0.05)
    for blob, theirs in zip(ours.params["ip"], solver.net.params["ip"]):
        np.testing.assert_allclose(blob.data, theirs.data, rtol=1e-5, atol=1e-6)


def test_weight_average_follows_the_cubic_ramp():
    blob = SimpleNamespace(data=np.zeros(2))
    average = WeightAverage(SimpleNamespace(blobs=[("w/0", blob, 1.0, 1.0)]), decay=0.9,
                            total_steps=10, every=2)
    expected = np.zeros(2)
    for step in range(1, 11):
        blob.data = np.full(2, float(step))
        average.update(step)
        if step % 2 == 0:
            kept = 0.9 ** 2 * (step / 10) ** 3
            expected = kept * expected + (1 - kept) * step
    np.testing.assert_allclose(average.average["w/0"], expected)
    assert average.kept(10) == pytest.approx(0.81)
    assert average.kept(5) == pytest.approx(0.81 / 8)


# ---- augmentation ---------------------------------------------------------------------------

def test_alternating_flips_and_translation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(20, 8, 8, 3), dtype=np.uint8)
    batches = AugmentedBatches(images, np.arange(20), batch_size=5, seed=3, translate=2)
    assert np.array_equal(batches.flips(0), ~batches.flips(1))
    assert np.array_equal(batches.flips(0), batches.flips(2))
    assert 4 <= batches.flips(0).sum() <= 16
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    seen = []
    for crops, labels in batches.epoch(1):
        for crop, label in zip(crops, labels):
            view = crop[:, ::-1] if batches.flips(1)[label] else crop
            windows = [padded[label, dy:dy + 8, dx:dx + 8]
                       for dy in range(5) for dx in range(5)]
            assert any(np.array_equal(view, w) for w in windows)
            seen.append(label)
    assert sorted(seen) == list(range(20))
    again = [c for c, _ in AugmentedBatches(images, np.arange(20), 5, seed=3).epoch(1)]
    assert all(np.array_equal(a, b) for a, b in zip(again, [c for c, _ in batches.epoch(1)]))


# ---- flip averaging at extraction -------------------------------------------------------------

def test_flip_average_is_the_mean_of_two_forwards(caffe, tmp_path):
    deploy = PROTOTXT / "fast_hash12_deploy.prototxt"
    caffe.set_random_seed(0)
    net = caffe.Net(str(deploy), caffe.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    crops = np.random.default_rng(0).integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    plain = HashNet(deploy, weights, mean="100,110,120")
    write_preprocessing_record(tmp_path, Preprocessing(32, 32, (100, 110, 120),
                                                       flip_average=True))
    averaged = HashNet(deploy, weights)
    assert averaged.prep.flip_average and not plain.prep.flip_average
    fc7, latent = averaged.forward_crops(crops)
    fc7_a, latent_a = plain.forward_crops(crops)
    fc7_b, latent_b = plain.forward_crops(crops[:, :, ::-1])
    np.testing.assert_allclose(fc7, (fc7_a + fc7_b) / 2, rtol=1e-6)
    np.testing.assert_allclose(latent, (latent_a + latent_b) / 2, rtol=1e-6)
    assert not np.allclose(latent_a, latent_b)
    assert averaged.describe()["preprocessing"]["flip_average"] is True
    assert "flip_average" not in plain.describe()["preprocessing"]


def test_shifted_views_are_the_image_moved_one_pixel_with_reflected_edges():
    crops = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    prep = Preprocessing(4, 4, (0, 0, 0), flip_average=True, shift_average=True)
    views = prep.views(crops)
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    np.testing.assert_array_equal(views[1][1], crops[:, :, ::-1])
    down_right, up_left = views[2][1], views[4][1]
    np.testing.assert_array_equal(down_right[:, 1:, 1:], crops[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], crops[:, 1, :-1])   # reflected row
    np.testing.assert_array_equal(up_left[:, :-1, :-1], crops[:, 1:, 1:])
    np.testing.assert_array_equal(up_left[:, -1, :-1], crops[:, -2, 1:])
    np.testing.assert_array_equal(views[3][1], down_right[:, :, ::-1])
    assert [w for w, _ in Preprocessing(4, 4, (0, 0, 0), shift_average=True).views(crops)] \
        == [0.5, 0.25, 0.25]
    (weight, only), = Preprocessing(4, 4, (0, 0, 0)).views(crops)
    assert weight == 1.0 and np.array_equal(only, crops)
    # recorded only when on, and read back
    assert Preprocessing.from_dict(prep.as_dict()) == prep
    assert "shift_average" not in Preprocessing(4, 4, (0, 0, 0)).as_dict()


def test_shift_average_is_the_weighted_mean_of_six_forwards(caffe, tmp_path):
    deploy = PROTOTXT / "fast_hash12_deploy.prototxt"
    caffe.set_random_seed(0)
    weights = tmp_path / "w.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    crops = np.random.default_rng(1).integers(0, 255, size=(5, 32, 32, 3), dtype=np.uint8)
    plain = HashNet(deploy, weights, mean="100,110,120")
    prep = Preprocessing(32, 32, (100, 110, 120), flip_average=True, shift_average=True)
    write_preprocessing_record(tmp_path, prep)
    averaged = HashNet(deploy, weights)
    assert averaged.prep.shift_average
    padded = np.pad(crops, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    groups = [(0.5, crops), (0.25, padded[:, :32, :32]), (0.25, padded[:, 2:, 2:])]
    expected = sum(w / 2 * plain.forward_crops(np.ascontiguousarray(v))[1]
                   for weight, group in groups
                   for w, v in ((weight, group), (weight, group[:, :, ::-1])))
    np.testing.assert_allclose(averaged.forward_crops(crops)[1], expected, rtol=1e-5)
    assert not np.allclose(expected, plain.forward_crops(crops)[1], rtol=1e-3)


# ---- end to end -----------------------------------------------------------------------------

TINY = dict(epochs=6, batch_size=30, bn_batches=2)


def tiny_run(folder, run_dir, resume=False, schedule=None):
    from dlbhc.datasets.collection import load_collection
    coll = load_collection(folder, test_fraction=0.25, seed=1)
    return FastRecipe(12, coll.train, coll.test, coll.classes, run_dir, "fast_hash12_tiny",
                      schedule or FastSchedule(**TINY), resume=resume, threads=1).run()


@pytest.mark.slow
def test_tiny_collection_trains_above_chance_end_to_end(caffe, tmp_path):
    colour_collection(tmp_path / "photos", per_class=40, size=36)
    runs = tmp_path / "runs"
    run_script(TRAIN, ["--data", tmp_path / "photos", "--net", "fast", "--runs-dir", runs,
                       "--epochs", 20, "--batch-size", 30, "--base-lr", 0.2, "--bits", 12],
               timeout=900)
    run = runs / "fast_hash12_photos"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["recipe"] == "fast" and summary["classes"] == ["apple", "boat", "cloud"]
    assert summary["test"]["accuracy"] > 0.6           # chance: 1/3
    record = json.loads((run / "preprocessing.json").read_text())
    # what the held-out accuracies chose (choose_kept) is what extraction does
    assert (summary["weights_kept"], summary["flip_average"]) == choose_kept(
        ["final", "averaged"], summary["test_accuracy"], True)
    assert record.get("flip_average", False) is summary["flip_average"] and record["crop"] == 32
    # the run's last step, as every recipe's: the fine stage chosen on the held-out images
    assert summary["rerank"]["choice"] == json.loads((run / "rerank.json").read_text())["choice"]
    assert (run / "classes.txt").read_text().split() == ["apple", "boat", "cloud"]
    net = HashNet(run / "deploy.prototxt", run / "fast_hash12_photos.caffemodel")
    assert net.bits == 12 and net.fc7_dim == 128
    assert net.prep.flip_average is summary["flip_average"]
    assert net.prep.shift_average is summary["shift_average"] is choose_shift(
        summary["test_accuracy"], summary["weights_kept"], summary["flip_average"])
    # the service and extraction fold BatchNorm into the convolution before
    # it (nets/fold.py); the fast net's BatchNorm after a pooling stays as is
    plain = HashNet(run / "deploy.prototxt", run / "fast_hash12_photos.caffemodel", fold=False)
    images = sorted((tmp_path / "photos").rglob("*.jpg"))[:6]
    (fc7_a, latent_a, codes_a), (fc7_b, latent_b, codes_b) = (
        n.features_of_paths(images) for n in (net, plain))
    np.testing.assert_array_equal(codes_a, codes_b)
    np.testing.assert_allclose(fc7_a, fc7_b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(caffe, tmp_path, monkeypatch):
    colour_collection(tmp_path / "photos", per_class=20, size=32)
    straight = tiny_run(tmp_path / "photos", tmp_path / "straight")

    class Interrupted(Exception):
        pass
    original = FastRecipe.checkpoint
    calls = []

    def stop_after_two_epochs(self, *args):
        original(self, *args)
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
    monkeypatch.setattr(FastRecipe, "checkpoint", stop_after_two_epochs)
    with pytest.raises(Interrupted):
        tiny_run(tmp_path / "photos", tmp_path / "resumed")
    monkeypatch.setattr(FastRecipe, "checkpoint", original)
    with pytest.raises(Exception, match="--resume auto"):
        tiny_run(tmp_path / "photos", tmp_path / "resumed")
    resumed = tiny_run(tmp_path / "photos", tmp_path / "resumed", resume=True)
    assert resumed["iterations"] == straight["iterations"]
    a = caffe.Net(straight["deploy"], straight["weights"], caffe.TEST)
    b = caffe.Net(resumed["deploy"], resumed["weights"], caffe.TEST)
    for name in a.params:
        for x, y in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(x.data, y.data, err_msg=name)
    curve = (tmp_path / "resumed" / "train_curve.csv").read_text().splitlines()
    assert len(curve) == 1 + resumed["iterations"]


def test_the_run_keeps_the_weights_and_flip_that_score_best_held_out():
    labels = ["final", "averaged"]
    # fashion-mnist-500x100, 100 steps: the final weights, without mirrors
    short = {"final": 0.727, "final_flip_average": 0.721, "averaged": 0.683,
             "averaged_flip_average": 0.681}
    assert choose_kept(labels, short, True) == ("final", False)
    # CIFAR-10, 9 epochs: the average, with mirrors
    cifar = {"final": 0.8602, "final_flip_average": 0.8688, "averaged": 0.8602,
             "averaged_flip_average": 0.8725}
    assert choose_kept(labels, cifar, True) == ("averaged", True)
    assert choose_kept(labels, cifar, False) == ("averaged", False)   # ties: the average...
    tie = dict.fromkeys(short, 1.0)
    assert choose_kept(labels, tie, True) == ("averaged", False)    # ...and no mirrors
    assert choose_kept(["final"], {"final": 0.5, "final_flip_average": 0.6}, True) == \
        ("final", True)
    assert choose_kept(labels, {}, True) == ("averaged", True)      # no held-out images
    assert choose_kept(labels, {}, False) == ("averaged", False)


def test_shifted_views_are_kept_only_when_they_classify_strictly_better():
    cifar = {"averaged_flip_average": 0.8725, "averaged_flip_average_shift_average": 0.8741}
    assert choose_shift(cifar, "averaged", True)
    assert not choose_shift(cifar, "averaged", False)            # not measured that way
    tie = {"final": 0.7, "final_shift_average": 0.7}
    assert not choose_shift(tie, "final", False)                 # ties: a third of the forwards
    assert not choose_shift({"final": 0.7, "final_shift_average": 0.69}, "final", False)
    assert not choose_shift({}, "final", True)                   # no held-out images


def test_schedule_adapts_to_the_command_line():
    s = FastSchedule()
    assert s.adapted(images=50000).batch_size == 500         # CIFAR-10: the largest batch
    assert s.adapted(images=5000).batch_size == 100          # 50 steps an epoch
    # the learning rate scales with the batch: 100 / 500 of the peak
    assert s.adapted(images=5000).peak_lr_for_batch() == pytest.approx(s.peak_lr / 5)
    assert s.adapted(images=200).batch_size == 32            # never below MIN_BATCH...
    assert s.adapted(images=20).batch_size == 20             # ...but not past the set
    assert s.adapted(images=5000, batch_size=250).batch_size == 250   # --batch-size wins
    assert s.adapted(max_iter=30, images=5000, batch_size=500).epochs == pytest.approx(3.0)
    assert s.adapted(max_iter=100, images=5000).epochs == pytest.approx(2.0)   # batch 100
    scaled = s.adapted(batch_size=100, base_lr=0.1, images=5000)
    assert scaled.peak_lr_for_batch() == pytest.approx(0.1)
    assert s.peak_lr_for_batch() == pytest.approx(s.peak_lr)     # at REFERENCE_BATCH
