"""Issue: the hashing networks. Prototxts parse and expose the shared blobs;
fine-tuning copies conv1..fc7 and nothing else; the small net learns."""
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (PROTOTXT, ROOT, derive_train_val, learnable_images,
                     write_training_data)

ALEXNET_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]


def parse(caffe, path, message="NetParameter"):
    """A checked-in prototxt through the project's one reader (needs the
    caffe fixture: the messages are pycaffe's)."""
    from dlbhc.nets.protos import read_prototxt
    return read_prototxt(path, message)


def test_checked_in_prototxts_match_the_generator():
    out = subprocess.run([sys.executable, str(PROTOTXT / "generate.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("path", sorted(PROTOTXT.glob("*.prototxt")), ids=lambda p: p.name)
def test_every_prototxt_parses(caffe, path):
    kind = "SolverParameter" if path.name.endswith("_solver.prototxt") else "NetParameter"
    msg = parse(caffe, path, kind)
    if kind == "SolverParameter":
        assert (ROOT / msg.net).exists(), msg.net
    else:
        assert len(msg.layer) > 5


@pytest.mark.parametrize("bits", [20, 48, 128])
def test_alexnet_deploy_blobs(caffe, bits):
    net = caffe.Net(str(PROTOTXT / f"alexnet_hash{bits}_deploy.prototxt"), caffe.TEST)
    assert net.blobs["data"].data.shape[1:] == (3, 227, 227)
    assert net.blobs["fc7"].data.shape[1:] == (4096,)
    assert net.blobs["latent"].data.shape[1:] == (bits,)
    # latent is a Sigmoid on fc8_latent; nothing is named plain fc8
    assert "fc8" not in net.params and "fc8_latent" in net.params


@pytest.mark.parametrize("bits", [12, 48, 128])
def test_small_net_deploy_blobs(caffe, bits):
    net = caffe.Net(str(PROTOTXT / f"cifar_hash{bits}_deploy.prototxt"), caffe.TEST)
    assert net.blobs["data"].data.shape[1:3] == (3, 32) or net.blobs["data"].data.shape[1] == 3
    assert net.blobs["latent"].data.shape[1:] == (bits,)
    assert "fc7" in net.blobs


def test_official_solver_settings(caffe):
    solver = parse(caffe, PROTOTXT / "alexnet_hash48_solver.prototxt", "SolverParameter")
    assert solver.base_lr == pytest.approx(0.001)
    assert (solver.lr_policy, solver.stepsize, solver.max_iter) == ("step", 25000, 50000)
    net = parse(caffe, PROTOTXT / "alexnet_hash48_train_val.prototxt")
    layers = {layer.name: layer for layer in net.layer}
    train_data = [l for l in net.layer if l.type == "Data" and l.include[0].phase == 0][0]
    assert train_data.data_param.batch_size == 32
    assert train_data.transform_param.crop_size == 227 and train_data.transform_param.mirror
    assert layers["fc8_latent"].inner_product_param.weight_filler.std == pytest.approx(0.005)
    assert [p.lr_mult for p in layers["fc9_classifier"].param] == [10, 20]


# ---- fine-tuning mechanics ----------------------------------------------------

@pytest.mark.slow
def test_finetuning_copies_conv1_to_fc7_only(caffe, tmp_path):
    """`caffe train -weights` with an ImageNet-shaped AlexNet caffemodel (made
    here with random values, since the real one cannot be downloaded)."""
    from dlbhc.nets.caffe_env import caffe_root, caffe_tool
    rng = np.random.default_rng(1)
    imagenet = caffe.Net(str(caffe_root() / "models/bvlc_alexnet/deploy.prototxt"), caffe.TEST)
    for name, params in imagenet.params.items():
        for p in params:
            p.data[...] = rng.normal(0, 0.02, size=p.data.shape)
    assert imagenet.params["fc8"][0].data.shape == (1000, 4096)
    weights = tmp_path / "imagenet_like.caffemodel"
    imagenet.save(str(weights))
    source = {name: [p.data.copy() for p in params] for name, params in imagenet.params.items()}
    del imagenet

    images = rng.integers(0, 255, size=(2, 3, 256, 256), dtype=np.uint8)
    data = write_training_data(caffe, tmp_path, (images, [0, 1]), (images, [0, 1]),
                               (3, 256, 256))
    train_val = tmp_path / "train_val.prototxt"
    derive_train_val(PROTOTXT / "alexnet_hash48_train_val.prototxt", train_val, *data, batch=2)
    solver = tmp_path / "solver.prototxt"
    # base_lr 0: one iteration runs forward/backward but changes no weight,
    # so the snapshot shows exactly what -weights copied.
    solver.write_text(f'net: "{train_val}"\nbase_lr: 0\nlr_policy: "fixed"\nmax_iter: 1\n'
                      f'test_initialization: false\nsnapshot_prefix: "{tmp_path}/ft"\n'
                      'solver_mode: CPU\n')
    out = subprocess.run([str(caffe_tool("caffe")), "train", "-solver", str(solver),
                          "-weights", str(weights)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, GLOG_minloglevel="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    tuned = caffe.Net(str(PROTOTXT / "alexnet_hash48_deploy.prototxt"), caffe.TEST,
                      weights=str(tmp_path / "ft_iter_1.caffemodel"))
    for name in ALEXNET_LAYERS:
        for src, dst in zip(source[name], tuned.params[name]):
            np.testing.assert_array_equal(dst.data, src, err_msg=name)
    latent_w = tuned.params["fc8_latent"][0].data
    assert latent_w.shape == (48, 4096)
    # from its gaussian(0.005) filler, not from anything in the ImageNet model
    assert 0.003 < latent_w.std() < 0.007
    assert tuned.params["fc9_classifier"][0].data.shape == (10, 48)
    assert not np.any(tuned.params["fc8_latent"][1].data)  # bias filler constant 0


# ---- the small net learns -------------------------------------------------------

@pytest.mark.slow
def test_small_net_loss_goes_down(caffe, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = learnable_images(rng, 200)
    data = write_training_data(caffe, tmp_path, (images, labels), (images[:20], labels[:20]),
                               (3, 32, 32))
    train_val = tmp_path / "train_val.prototxt"
    derive_train_val(PROTOTXT / "cifar_hash48_train_val.prototxt", train_val, *data, batch=20)
    # (unpadded 32x32 training images: the Data layer's 32x32 crop is the whole image)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{train_val}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                      'momentum: 0.9\nweight_decay: 0.0005\nmax_iter: 100\n'
                      'test_initialization: false\nsolver_mode: CPU\n'
                      f'snapshot_prefix: "{tmp_path}/small"\nrandom_seed: 7\n')
    s = caffe.get_solver(str(solver))
    losses = []
    for _ in range(40):
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all()
    assert last < 0.7 * first, (first, last)
