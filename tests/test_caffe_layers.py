"""Caffe's BatchNorm, ReLU, ELU, max-pooling and (stride-1) convolution layers
against numpy references in float64 (caffe-build/patches/0007 rewrote
their CPU loops, and im2col/col2im for stride 1, for speed: these tests
hold them to the layers' definitions, forward and backward)."""
import subprocess

import numpy as np
import pytest


def single_layer_net(caffe, tmp_path, shape, make_layer, phase=None, tops=1):
    """A net of one Input and one layer (NetSpec) with input gradients."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    outputs = make_layer(L, n.data)
    if tops == 1:
        n.out = outputs
    else:
        n.out, n.mask = outputs
    path = tmp_path / "layer.prototxt"
    path.write_text("force_backward: true\n" + str(n.to_proto()))
    return caffe.Net(str(path), caffe.TRAIN if phase is None else phase)


def forward_backward(net, x, top="out"):
    net.blobs["data"].data[...] = x
    out = net.forward()[top].copy()
    top_diff = np.random.default_rng(1).normal(size=out.shape).astype(np.float32)
    net.blobs[top].diff[...] = top_diff
    net.backward()
    return out, top_diff, net.blobs["data"].diff.copy()


# ---- BatchNorm ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (3, 5, 1, 1), (6, 2, 16, 16)])
def test_batchnorm_training_forward_backward_and_running_averages(caffe, tmp_path, shape):
    eps = 1e-5
    net = single_layer_net(caffe, tmp_path, shape, lambda L, d: L.BatchNorm(
        d, batch_norm_param=dict(eps=eps, moving_average_fraction=0.9)))
    x = (np.random.default_rng(0).normal(size=shape) * 3 + 2).astype(np.float32)
    out, dy, dx = forward_backward(net, x)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, 2, 3)
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-5)
    want_dx = (dy64 - dy64.mean(axis=axes, keepdims=True)
               - y * (dy64 * y).mean(axis=axes, keepdims=True)) / np.sqrt(var + eps)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    # the running sums after one step: the mean and the unbiased variance, count 1
    m = x.size // shape[1]
    stored_mean, stored_var, count = (b.data.copy() for b in net.params["out"])
    np.testing.assert_allclose(stored_mean, mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored_var, var.ravel() * m / (m - 1), rtol=1e-5)
    assert count[0] == 1


def test_batchnorm_in_place_equals_out_of_place(caffe, tmp_path):
    shape = (5, 4, 6, 6)
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    plain = single_layer_net(caffe, tmp_path, shape, lambda L, d: L.BatchNorm(d))
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.pre = L.Scale(n.data, bias_term=False, filler=dict(type="constant", value=1))
    n.out = L.BatchNorm(n.pre, in_place=True)
    path = tmp_path / "in_place.prototxt"
    path.write_text("force_backward: true\n" + str(n.to_proto()))
    in_place = caffe.Net(str(path), caffe.TRAIN)
    # (NetSpec names an in-place layer's top after its input)
    for got, want in zip(forward_backward(in_place, x, top="pre"), forward_backward(plain, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_batchnorm_with_stored_statistics(caffe, tmp_path):
    shape, eps = (3, 4, 5, 5), 1e-3
    net = single_layer_net(caffe, tmp_path, shape, lambda L, d: L.BatchNorm(
        d, batch_norm_param=dict(eps=eps)), phase=caffe.TEST)
    rng = np.random.default_rng(3)
    mean_sum, var_sum = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    scale = 2.5                                  # the stored sums are divided by the count
    for blob, value in zip(net.params["out"], (mean_sum, var_sum, [scale])):
        blob.data[...] = value
    x = rng.normal(size=shape).astype(np.float32)
    out, dy, dx = forward_backward(net, x)
    std = np.sqrt(var_sum / scale + eps).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(out, (x - (mean_sum / scale).reshape(1, -1, 1, 1)) / std,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dy / std, rtol=1e-5, atol=1e-6)


# ---- ReLU ---------------------------------------------------------------------------------

@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_forward_and_backward(caffe, tmp_path, slope):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=997), [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf,
                                               np.nan]]).astype(np.float32).reshape(1, 1, 1, -1)
    net = single_layer_net(caffe, tmp_path, x.shape, lambda L, d: L.ReLU(
        d, relu_param=dict(negative_slope=slope)))
    out, dy, dx = forward_backward(net, x)
    with np.errstate(invalid="ignore"):
        want = np.where(x > 0, x, 0) + slope * np.where(x < 0, x, 0)
        want_dx = dy * ((x > 0) + slope * (x <= 0))
    want[np.isnan(x)] = np.nan                       # NaN passes through, as in Caffe's loop
    np.testing.assert_array_equal(out, want.astype(np.float32))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-7)


# ---- ELU ----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu_forward_and_backward(caffe, tmp_path, alpha):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(scale=3, size=997), [0.0, -0.0, 1e-8, -1e-8, -20, -86.9,
                        -87.5, -100, -1e30, 50, 1e30]]).astype(np.float32)
    x = x.reshape(1, 1, 1, -1)
    net = single_layer_net(caffe, tmp_path, x.shape,
                           lambda L, d: L.ELU(d, elu_param=dict(alpha=alpha)))
    out, dy, dx = forward_backward(net, x)
    x64 = x.astype(np.float64)
    y = np.where(x64 > 0, x64, alpha * np.expm1(np.minimum(x64, 0)))
    # float exp(x) - 1 near 0 loses digits to cancellation, as Caffe's own did:
    # an absolute tolerance of a few float steps of 1
    np.testing.assert_allclose(out, y, rtol=2e-6, atol=4e-7 * alpha)
    np.testing.assert_allclose(dx, dy * np.where(x64 > 0, 1.0, alpha + out), rtol=1e-6,
                               atol=1e-7)


def test_elu_exp_is_within_two_float_steps_of_exp(caffe, tmp_path):
    """Away from the cancellation near 0, y / alpha + 1 is the layer's exp(x)."""
    x = -np.linspace(0.5, 80, 20000).astype(np.float32).reshape(1, 1, 1, -1)
    net = single_layer_net(caffe, tmp_path, x.shape, lambda L, d: L.ELU(d))
    net.blobs["data"].data[...] = x
    out = net.forward()["out"].astype(np.float64)
    want = np.exp(x.astype(np.float64))
    exp_of_layer = out + 1.0
    ulp = np.spacing(np.float32(1.0))                # y + 1 is rounded at 1's scale
    assert np.max(np.abs(exp_of_layer - want)) <= 2 * ulp


# ---- max pooling ---------------------------------------------------------------------------

def numpy_max_pool(x, kernel, stride, pad):
    """Caffe's max pooling (ceil-mode output size, windows clipped to the
    image): outputs and the flat index of each window's first maximum."""
    n, c, h, w = x.shape
    out_h = int(np.ceil((h + 2 * pad - kernel) / stride)) + 1
    out_w = int(np.ceil((w + 2 * pad - kernel) / stride)) + 1
    if pad and (out_h - 1) * stride >= h + pad:
        out_h -= 1
    if pad and (out_w - 1) * stride >= w + pad:
        out_w -= 1
    out = np.empty((n, c, out_h, out_w), x.dtype)
    index = np.empty((n, c, out_h, out_w), np.int64)
    for i in range(out_h):
        h0, h1 = max(i * stride - pad, 0), min(i * stride - pad + kernel, h)
        for j in range(out_w):
            w0, w1 = max(j * stride - pad, 0), min(j * stride - pad + kernel, w)
            window = x[:, :, h0:h1, w0:w1].reshape(n, c, -1)
            first = window.argmax(axis=2)            # argmax: the first maximum
            out[:, :, i, j] = window.max(axis=2)
            rows, cols = np.divmod(first, w1 - w0)
            index[:, :, i, j] = (h0 + rows) * w + w0 + cols
    return out, index


@pytest.mark.parametrize("kernel,stride,pad,size", [(2, 2, 0, 31), (2, 2, 0, 16),
                                                    (3, 2, 1, 9), (3, 2, 0, 8), (3, 1, 1, 5)])
def test_max_pooling_forward_backward_and_mask(caffe, tmp_path, kernel, stride, pad, size):
    rng = np.random.default_rng(kernel + size)
    # small integers: ties in most windows, where the first maximum must win
    x = rng.integers(-3, 3, size=(2, 3, size, size)).astype(np.float32)
    net = single_layer_net(caffe, tmp_path, x.shape, lambda L, d: L.Pooling(
        d, pool=caffe.params.Pooling.MAX, kernel_size=kernel, stride=stride, pad=pad,
        ntop=2), tops=2)
    out, dy, dx = forward_backward(net, x)
    want, index = numpy_max_pool(x, kernel, stride, pad)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(net.blobs["mask"].data, index)
    want_dx = np.zeros_like(x).reshape(2, 3, -1)
    for b in range(2):
        for ch in range(3):
            np.add.at(want_dx[b, ch], index[b, ch].ravel(), dy[b, ch].ravel())
    np.testing.assert_allclose(dx, want_dx.reshape(x.shape), rtol=1e-6, atol=1e-6)
    # the same layer without the mask top keeps its argmax inside: same gradient
    inner = single_layer_net(caffe, tmp_path, x.shape, lambda L, d: L.Pooling(
        d, pool=caffe.params.Pooling.MAX, kernel_size=kernel, stride=stride, pad=pad))
    for got, wanted in zip(forward_backward(inner, x), (out, dy, dx)):
        np.testing.assert_array_equal(got, wanted)


# ---- convolution (im2col / col2im) ----------------------------------------------------------

def numpy_convolution(x, w, bias, stride, pad, dy):
    """Output, input gradient and weight gradient of a 2-d convolution
    (float64), by summing the kernel's shifted windows of the padded input."""
    n, c, h, width = x.shape
    out_c, _, kh, kw = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (h + 2 * pad - kh) // stride + 1
    out_w = (width + 2 * pad - kw) // stride + 1
    out = np.zeros((n, out_c, out_h, out_w)) + bias.reshape(1, -1, 1, 1)
    dpadded, dw = np.zeros_like(padded), np.zeros_like(w)
    for r in range(kh):
        for q in range(kw):
            rows = slice(r, r + stride * (out_h - 1) + 1, stride)
            cols = slice(q, q + stride * (out_w - 1) + 1, stride)
            window = padded[:, :, rows, cols]                   # (n, c, out_h, out_w)
            out += np.einsum("oc,nchw->nohw", w[:, :, r, q], window)
            dpadded[:, :, rows, cols] += np.einsum("oc,nohw->nchw", w[:, :, r, q], dy)
            dw[:, :, r, q] = np.einsum("nohw,nchw->oc", dy, window)
    return out, dpadded[:, :, pad:pad + h, pad:pad + width], dw


@pytest.mark.parametrize("kernel,stride,pad,height,width", [
    (3, 1, 1, 8, 8), (3, 1, 1, 4, 7), (2, 1, 0, 9, 9), (3, 1, 0, 6, 5), (5, 1, 2, 7, 7),
    (5, 1, 1, 6, 9), (1, 1, 0, 4, 4), (3, 1, 2, 5, 5), (3, 2, 1, 9, 9)])
def test_convolution_forward_and_backward(caffe, tmp_path, kernel, stride, pad, height, width):
    rng = np.random.default_rng(kernel * 7 + pad + height)
    x = rng.normal(size=(2, 3, height, width)).astype(np.float32)
    net = single_layer_net(caffe, tmp_path, x.shape, lambda L, d: L.Convolution(
        d, num_output=4, kernel_size=kernel, stride=stride, pad=pad))
    w = rng.normal(size=net.params["out"][0].data.shape).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    net.params["out"][0].data[...] = w
    net.params["out"][1].data[...] = bias
    for blob in net.params["out"]:
        blob.diff[...] = 0
    out, dy, dx = forward_backward(net, x)
    want_out, want_dx, want_dw = numpy_convolution(x.astype(np.float64), w.astype(np.float64),
                                                   bias.astype(np.float64), stride, pad,
                                                   dy.astype(np.float64))
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.params["out"][0].diff, want_dw, rtol=1e-4, atol=1e-4)


def test_the_build_in_use_has_the_fast_cpu_layers(caffe):
    """The tests above pass on an unpatched Caffe too: check that libcaffe
    holds patch 0007's loops."""
    from dlbhc.nets.caffe_env import caffe_root
    lib = sorted((caffe_root() / "build" / "lib").glob("libcaffe.so*"))[0]
    symbols = subprocess.run(["nm", "-C", str(lib)], capture_output=True, text=True).stdout
    for helper in ("max_pool_plane", "elu_forward", "relu_forward", "plane_normalize",
                   "im2col_stride1_cpu"):
        assert helper in symbols, helper
