"""BatchNorm + Scale folded into the convolutions at load (nets.fold): the
folded net gives the same codes and fc7 within 1e-4 of the net as written,
on a small generated BatchNorm net and on the EfficientNet-Lite0 backbone."""
from pathlib import Path

import numpy as np
import pytest

from dlbhc.nets import backbones
from dlbhc.nets.model import HashNet
from dlbhc.search.codes import pack_codes

ROOT = Path(__file__).resolve().parents[1]

BN_NET = """name: "bn_net"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 bias_term: false kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 stride: 2 weight_filler { type: "msra" } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" batch_norm_param { use_global_stats: true } }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 16 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv3" top: "conv3" batch_norm_param { use_global_stats: true } }
layer { name: "scale3" type: "Scale" bottom: "conv3" top: "conv3" scale_param { bias_term: true } }
layer { name: "fc7" type: "Pooling" bottom: "conv3" top: "fc7" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc8_latent" type: "InnerProduct" bottom: "fc7" top: "fc8_latent"
  inner_product_param { num_output: 24 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "latent" type: "Sigmoid" bottom: "fc8_latent" top: "latent" }
"""


def random_bn_weights(caffe, deploy, out, seed=0):
    """Filler weights, with BatchNorm statistics and Scale factors far from
    the identity (a fold that ignored any of them would show)."""
    rng = np.random.default_rng(seed)
    net = caffe.Net(str(deploy), caffe.TEST)
    for name, layer in zip(net._layer_names, net.layers):
        blobs = net.params.get(name)
        if layer.type == "BatchNorm":
            factor = 0.5
            blobs[0].data[...] = rng.normal(0, 1, blobs[0].data.shape) * factor
            blobs[1].data[...] = rng.uniform(0.2, 3, blobs[1].data.shape) * factor
            blobs[2].data[...] = factor
        elif layer.type == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 2, blobs[0].data.shape)
            blobs[1].data[...] = rng.normal(0, 0.5, blobs[1].data.shape)
    net.save(str(out))
    return out


def compare(deploy, weights, crops, mean):
    plain = HashNet(deploy, weights, mean, fold=False)
    folded = HashNet(deploy, weights, mean)
    kinds = lambda net: [layer.type for layer in net.net.layers]
    assert "BatchNorm" in kinds(plain) and "BatchNorm" not in kinds(folded)
    assert "Scale" not in kinds(folded)
    fc7_a, latent_a = plain.forward_crops(crops)
    fc7_b, latent_b = folded.forward_crops(crops)
    # within 1e-4 (the bar), plus 1e-6 relative: the generated net's
    # fc7 reaches a few hundred, where one float32 step is 3e-5 and the two
    # nets (and the GEMM's blocking, which depends on the batch) round apart
    np.testing.assert_allclose(fc7_b, fc7_a, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(pack_codes(latent_b), pack_codes(latent_a))
    return fc7_a, latent_a, fc7_b, latent_b


def test_folded_generated_bn_net_equals_the_net_as_written(caffe, tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(BN_NET)
    weights = random_bn_weights(caffe, deploy, tmp_path / "w.caffemodel")
    crops = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    fc7, latent, _, latent_b = compare(deploy, weights, crops, "100,110,120")
    assert np.abs(fc7).max() > 0.1                     # not a dead net
    assert 0.1 < (latent > 0.5).mean() < 0.9
    np.testing.assert_allclose(latent_b, latent, rtol=0, atol=1e-5)


def test_a_net_without_batchnorm_is_left_as_it_is(caffe, tiny_net):
    deploy, weights = tiny_net
    net = HashNet(deploy, weights, "100,110,120")
    assert net.net is not None and net.fold
    kinds = [layer.type for layer in net.net.layers]
    assert "BatchNorm" not in kinds and len(kinds) > 3


def test_folded_backbone_gives_the_same_codes_and_fc7(caffe, tmp_path):
    deploy = ROOT / "prototxt/efficientnet_lite0_hash48_deploy.prototxt"
    backbone = backbones.paths(backbones.DEFAULT_BACKBONE)[1]
    if not Path(backbone).exists():
        pytest.skip(f"{backbone} missing: run `make backbone`")
    net = caffe.Net(str(deploy), caffe.TEST)            # latent layer: its filler
    net.copy_from(str(backbone))
    weights = tmp_path / "hash48.caffemodel"
    net.save(str(weights))
    crops = np.random.default_rng(2).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    # smooth images, closer to photos than noise
    crops = np.repeat(np.repeat(crops[:, ::16, ::16], 16, axis=1), 16, axis=2)
    fc7, _, fc7_b, _ = compare(deploy, weights, crops, "127,127,127")
    assert fc7.shape == (6, 1280) and np.abs(fc7).max() > 0.5
