"""BatchNorm (+ Scale) folded into the convolution before it.

At test time a BatchNorm with global statistics and the Scale after it are
one per-channel affine map, y = gamma * x + beta, applied to a convolution's
output; folding it into the convolution's weights (w * gamma) and bias
(b * gamma + beta) gives the same function with two fewer layers, each of
which read and wrote the whole activation. For the EfficientNet-Lite0
backbone (49 BatchNorm + Scale pairs) the forward is markedly faster
(benchmarks/bench_extract.py --net efficientnet_lite0), the result equal up
to float rounding (fc7 within 1e-4: tests/test_fold.py).

    fold_batchnorm  (NetParameter, params) -> folded (NetParameter, params)
    folded_net      a loaded caffe.Net -> the same net folded (or itself when
                    it has nothing to fold)

HashNet folds its net at load (nets.model), so extraction, the service and
the training's frozen features (training.frozen) all run folded nets, for
every model, without a second caffemodel to keep in step with the first.
"""
import os
import tempfile

import numpy as np

from .protos import caffe_pb2


def fold_batchnorm(net, params):
    """(NetParameter, params) with every in-place BatchNorm (+ Scale) that
    follows a Convolution folded into it; params: {layer: [arrays]} as
    caffe.Net.params holds them. BatchNorm must use global statistics."""
    pb = caffe_pb2()
    layers = list(net.layer)
    params = {name: [np.array(b, dtype=np.float64) for b in blobs] for name, blobs in params.items()}
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    folded = {}
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if (layer.type == "Convolution" and nxt is not None and nxt.type == "BatchNorm"
                and list(nxt.bottom) == list(layer.top) == list(nxt.top)):
            mean, var, factor = params[nxt.name]
            scale = 1.0 / factor[0] if factor[0] != 0 else 0.0
            eps = nxt.batch_norm_param.eps
            gamma = 1.0 / np.sqrt(var * scale + eps)
            beta = -mean * scale * gamma
            used = 2
            after = layers[i + 2] if i + 2 < len(layers) else None
            if (after is not None and after.type == "Scale"
                    and list(after.bottom) == list(layer.top) == list(after.top)):
                s = params[after.name]
                gamma, beta = gamma * s[0], beta * s[0] + (s[1] if len(s) > 1 else 0.0)
                used = 3
            w = params[layer.name][0]
            b = params[layer.name][1] if len(params[layer.name]) > 1 else 0.0
            conv = out.layer.add()
            conv.CopyFrom(layer)
            conv.convolution_param.bias_term = True
            del conv.param[:]
            folded[layer.name] = [w * gamma.reshape(-1, 1, 1, 1), b * gamma + beta]
            i += used
            continue
        out.layer.add().CopyFrom(layer)
        if layer.name in params:
            folded[layer.name] = params[layer.name]
        i += 1
    return out, {k: [v.astype(np.float32) for v in blobs] for k, blobs in folded.items()}


def folded_net(caffe, net, net_param):
    """The loaded caffe.Net `net` (built from NetParameter `net_param`, its
    weights copied in) with its BatchNorm + Scale layers folded: a new
    caffe.Net with the same blobs but those layers', or `net` itself when
    no BatchNorm follows a convolution."""
    if not any(layer.type == "BatchNorm" for layer in net_param.layer):
        return net
    params = {name: [b.data for b in blobs] for name, blobs in net.params.items()}
    param, weights = fold_batchnorm(net_param, params)
    if len(param.layer) == len(net_param.layer):
        return net
    fd, path = tempfile.mkstemp(suffix=".prototxt", prefix="folded_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(param))
        folded = caffe.Net(path, caffe.TEST)
    finally:
        os.unlink(path)
    for name, blobs in weights.items():
        for target, value in zip(folded.params[name], blobs):
            target.data[...] = value.reshape(target.data.shape)
    return folded
