#!/usr/bin/env python3
"""Write the hashing networks' prototxt files (train_val, deploy, solver).

The .prototxt files beside this script are the source of truth that users
read and edit; they are checked in. This generator only keeps the 20/48/128-
bit variants in step with each other: `python prototxt/generate.py` rewrites
them, and tests/test_networks.py fails when a checked-in file differs from
what the generator makes (edit the generator, then rerun it).

Two families:
  alexnet_hash{BITS}  AlexNet conv1..fc7 with bvlc_alexnet's layer names (so
                      ImageNet weights copy by name), then the latent layer
                      fc8_latent (InnerProduct BITS) + Sigmoid -> blob
                      "latent", then the classifier fc9_classifier. Neither
                      of the new layers is named fc8, whose 1000x4096 weights
                      Caffe would try to copy and refuse.
  cifar_hash{BITS}    a small net for 32x32 inputs that trains from scratch
                      on a CPU, with the same latent structure and blob names
                      (its last hidden layer is named fc7).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

# Data layers are built where the training runs rewrite them.
from dlbhc.training.prototxt import data_layer_pair  # noqa: E402
ALEXNET_BITS = (20, 48, 128)
CIFAR_BITS = (12, 48, 128)
# CIFAR-10's classes: the classifier fc9_classifier has this many outputs.
# Another collection needs copies with its own num_output there.
NUM_CLASSES = 10

# --------------------------------------------------------------------------
# A tiny prototxt writer: nested dicts/lists -> Caffe's text format.


# Fields whose values are protobuf enums (written bare, not quoted).
ENUM_FIELDS = {"pool", "phase", "backend", "solver_mode"}


def _value(v, key=None):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if key in ENUM_FIELDS else f'"{v}"'
    if isinstance(v, float):
        return repr(v) if abs(v) >= 1e-4 or v == 0 else f"{v:g}"
    return str(v)


def _render(fields, indent=0):
    pad = "  " * indent
    lines = []
    for key, value in fields:
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, tuple) and item and item[0] == "msg":
                lines.append(f"{pad}{key} {{")
                lines.extend(_render(item[1], indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_value(item, key)}")
    return lines


def msg(*fields):
    """A message: msg(("name", "conv1"), ("param", [...]), ...)."""
    return ("msg", list(fields))


def layer(name, type_, bottom=None, top=None, *extra):
    fields = [("name", name), ("type", type_)]
    for b in ([bottom] if isinstance(bottom, str) else bottom or []):
        fields.append(("bottom", b))
    for t in ([top] if isinstance(top, str) else top or []):
        fields.append(("top", t))
    fields.extend(extra)
    return ("layer", msg(*fields))


def lr(w_mult, b_mult):
    """The usual pair of param specs: weights decay, biases do not."""
    return ("param", [msg(("lr_mult", w_mult), ("decay_mult", 1)),
                      msg(("lr_mult", b_mult), ("decay_mult", 0))])


def filler(kind, **kw):
    return msg(("type", kind), *[(k, v) for k, v in kw.items()])


def conv(name, bottom, num, kernel, stride=1, pad=0, group=1, std=0.01,
         bias=0.0, w_filler=None, lr_mult=(1, 2)):
    p = [("num_output", num)]
    if pad:
        p.append(("pad", pad))
    p.append(("kernel_size", kernel))
    if stride != 1:
        p.append(("stride", stride))
    if group != 1:
        p.append(("group", group))
    p.append(("weight_filler", w_filler or filler("gaussian", std=std)))
    p.append(("bias_filler", filler("constant", value=bias)))
    return layer(name, "Convolution", bottom, name, lr(*lr_mult),
                 ("convolution_param", msg(*p)))


def fc(name, bottom, num, std=0.005, bias=0.0, lr_mult=(1, 2), w_filler=None):
    return layer(name, "InnerProduct", bottom, name, lr(*lr_mult),
                 ("inner_product_param", msg(
                     ("num_output", num),
                     ("weight_filler", w_filler or filler("gaussian", std=std)),
                     ("bias_filler", filler("constant", value=bias)))))


def relu(name, blob):
    return layer(name, "ReLU", blob, blob)


def pool(name, bottom, kernel=3, stride=2, kind="MAX"):
    return layer(name, "Pooling", bottom, name, ("pooling_param", msg(
        ("pool", kind), ("kernel_size", kernel), ("stride", stride))))


def lrn(name, bottom):
    return layer(name, "LRN", bottom, name, ("lrn_param", msg(
        ("local_size", 5), ("alpha", 0.0001), ("beta", 0.75))))


def dropout(name, blob, ratio=0.5):
    return layer(name, "Dropout", blob, blob,
                 ("dropout_param", msg(("dropout_ratio", ratio))))


def fields_msg(fields):
    """A message from [(field, value or [(field, value), ...])] (what
    dlbhc.training.prototxt.DataLayer.fields() gives)."""
    return msg(*[(key, fields_msg(value) if isinstance(value, list) else value)
                 for key, value in fields])


def data_layers(sources, batch_sizes, **transform):
    """The TRAIN (mirrored) and TEST Data layers reading `sources` in
    `batch_sizes`; transform: crop_size, mean_file or mean_value."""
    return [("layer", fields_msg(layer.fields()))
            for layer in data_layer_pair(sources, batch_sizes, **transform)]


def input_layer(shape):
    return layer("data", "Input", None, "data", ("input_param", msg(
        ("shape", msg(*[("dim", d) for d in shape])))))


def latent_and_classifier(bottom, bits, num_classes, classifier_lr_mult=(10, 20)):
    """The paper's latent layer H and the classifier on top of it.

    fc8_latent: InnerProduct(bits), gaussian std 0.005 as the official code;
    latent: Sigmoid, the activations whose threshold at 0.5 is the code;
    fc9_classifier: InnerProduct(num_classes) with lr_mult 10/20 (new layer,
    learns faster than the pretrained ones when fine-tuning). A net trained
    from scratch passes (1, 2): at its higher base_lr, x10 keeps the loss at
    ln(10) (measured: no progress in 150 iterations at base_lr 0.1).
    """
    return [
        fc("fc8_latent", bottom, bits, std=0.005, bias=0.0),
        layer("latent", "Sigmoid", "fc8_latent", "latent"),
        fc("fc9_classifier", "latent", num_classes, std=0.01, bias=0.0,
           lr_mult=classifier_lr_mult),
    ]


def train_heads():
    return [
        layer("accuracy", "Accuracy", ["fc9_classifier", "label"], "accuracy",
              ("include", msg(("phase", "TEST")))),
        layer("loss", "SoftmaxWithLoss", ["fc9_classifier", "label"], "loss"),
    ]


def deploy_head():
    return [layer("prob", "Softmax", "fc9_classifier", "prob")]


# --------------------------------------------------------------------------
# AlexNet + latent layer


def alexnet_body():
    """conv1..fc7 exactly as bvlc_alexnet (names, shapes, fillers)."""
    return [
        conv("conv1", "data", 96, 11, stride=4),
        relu("relu1", "conv1"), lrn("norm1", "conv1"), pool("pool1", "norm1"),
        conv("conv2", "pool1", 256, 5, pad=2, group=2, bias=0.1),
        relu("relu2", "conv2"), lrn("norm2", "conv2"), pool("pool2", "norm2"),
        conv("conv3", "pool2", 384, 3, pad=1),
        relu("relu3", "conv3"),
        conv("conv4", "conv3", 384, 3, pad=1, group=2, bias=0.1),
        relu("relu4", "conv4"),
        conv("conv5", "conv4", 256, 3, pad=1, group=2, bias=0.1),
        relu("relu5", "conv5"), pool("pool5", "conv5"),
        fc("fc6", "pool5", 4096, std=0.005, bias=0.1),
        relu("relu6", "fc6"), dropout("drop6", "fc6"),
        fc("fc7", "fc6", 4096, std=0.005, bias=0.1),
        relu("relu7", "fc7"), dropout("drop7", "fc7"),
    ]


def alexnet_train_val(bits):
    layers = data_layers(("data/cifar10/cifar10_train_256_lmdb",
                          "data/cifar10/cifar10_test_256_lmdb"), (32, 50), crop_size=227,
                         mean_file="data/cifar10/cifar10_train_256_mean.binaryproto")
    return (f"alexnet_hash{bits}", layers + alexnet_body()
            + latent_and_classifier("fc7", bits, NUM_CLASSES) + train_heads())


def alexnet_deploy(bits):
    return (f"alexnet_hash{bits}", [input_layer([10, 3, 227, 227])] + alexnet_body()
            + latent_and_classifier("fc7", bits, NUM_CLASSES) + deploy_head())


def alexnet_solver(bits):
    # The official DLBHC settings: base_lr 0.001, step 25,000 of 50,000
    # iterations, batch 32 (in train_val). test_iter x batch 50 = the 10,000
    # CIFAR-10 test images.
    return [
        ("net", f"prototxt/alexnet_hash{bits}_train_val.prototxt"),
        ("test_iter", 200), ("test_interval", 1000), ("test_initialization", False),
        ("base_lr", 0.001), ("lr_policy", "step"), ("gamma", 0.1),
        ("stepsize", 25000), ("max_iter", 50000),
        ("momentum", 0.9), ("weight_decay", 0.0005),
        ("display", 20), ("snapshot", 5000),
        ("snapshot_prefix", f"runs/alexnet_hash{bits}/snapshots/alexnet_hash{bits}"),
        ("solver_mode", "CPU"),
    ]


# --------------------------------------------------------------------------
# The small CPU-trainable net for 32x32 inputs


# Per-channel mean of the CIFAR-10 training images, BGR, 0..255 (the shared
# JPEG copy; the official PNGs differ by < 0.5). The Data layers subtract it
# as mean_value, exactly what extract.py does with the .npy mean (its
# per-channel average): a per-pixel mean_file would not fit the padded
# 40x40 training images, and would differ from deploy preprocessing anyway.
CIFAR_MEAN_BGR = (113.86, 122.93, 125.27)
# Training images padded by 4 pixels (data/pad_lmdb.py, reflected border):
# random 32x32 crops are the pad-and-crop augmentation; the TEST phase reads
# the plain 32x32 LMDB (centre crop 32 = the whole image), as extract.py.
CIFAR_TRAIN_LMDB = "data/cifar10/cifar10_train_32pad4_lmdb"
CIFAR_TEST_LMDB = "data/cifar10/cifar10_test_32_lmdb"


def bn_conv(name, bottom, num):
    """3x3 conv (no bias: BatchNorm+Scale supply it) + BN + Scale + ReLU."""
    return [
        layer(name, "Convolution", bottom, name,
              ("param", msg(("lr_mult", 1), ("decay_mult", 1))),
              ("convolution_param", msg(
                  ("num_output", num), ("bias_term", False), ("pad", 1),
                  ("kernel_size", 3), ("weight_filler", filler("msra"))))),
        # use_global_stats is left unset: Caffe uses batch statistics in
        # TRAIN and the running averages in TEST. The running averages forget
        # with 0.99 per iteration, not Caffe's default 0.999: a ~1,000-
        # iteration memory still holds the statistics of a much earlier net
        # after a short schedule (measured: test accuracy 0.38 vs 0.63 after
        # 800 iterations of the same training).
        layer(f"{name}_bn", "BatchNorm", name, name,
              ("param", [msg(("lr_mult", 0), ("decay_mult", 0))] * 3),
              ("batch_norm_param", msg(("moving_average_fraction", 0.99)))),
        layer(f"{name}_scale", "Scale", name, name,
              ("scale_param", msg(("bias_term", True)))),
        relu(f"{name}_relu", name),
    ]


def residual(name, bottom, num):
    """Two bn_convs and an identity shortcut: name = bottom + name_b."""
    return (bn_conv(f"{name}a", bottom, num) + bn_conv(f"{name}b", f"{name}a", num)
            + [layer(name, "Eltwise", [bottom, f"{name}b"], name)])


def cifar_body():
    """A quarter-width ResNet-9 (the fast CIFAR-10 recipe's layout, widths
    16/32/64/128 instead of 64/128/256/512): ~48 MFLOPs per image, about
    0.55 s per iteration of 100 images on the 2 shared cores.

    32x32: conv0 16, conv1 32, pool -> 16x16: res1 (2 x 32) + shortcut,
    conv2 64, pool -> 8x8: conv3 128, pool -> 4x4: res3 (2 x 128) + shortcut
    -> fc7 256 (ReLU) -> latent.
    """
    return (bn_conv("conv0", "data", 16)
            + bn_conv("conv1", "conv0", 32) + [pool("pool1", "conv1", kernel=2, stride=2)]
            + residual("res1", "pool1", 32)
            + bn_conv("conv2", "res1", 64) + [pool("pool2", "conv2", kernel=2, stride=2)]
            + bn_conv("conv3", "pool2", 128) + [pool("pool3", "conv3", kernel=2, stride=2)]
            + residual("res3", "pool3", 128)
            + [fc("fc7", "res3", 256, w_filler=filler("msra"), bias=0.0),
               relu("relu7", "fc7")])


def cifar_head(bits):
    return latent_and_classifier("fc7", bits, NUM_CLASSES, classifier_lr_mult=(1, 2))


def cifar_train_val(bits):
    layers = data_layers((CIFAR_TRAIN_LMDB, CIFAR_TEST_LMDB), (100, 100), crop_size=32,
                         mean_value=CIFAR_MEAN_BGR)
    return (f"cifar_hash{bits}", layers + cifar_body() + cifar_head(bits) + train_heads())


def cifar_deploy(bits):
    return (f"cifar_hash{bits}", [input_layer([100, 3, 32, 32])] + cifar_body()
            + cifar_head(bits) + deploy_head())


def cifar_solver(bits):
    # 6,500 iterations of 100 = 13 epochs: what fits the 60-minute training
    # budget on 2 quiet cores at 0.49 s per iteration (OPENBLAS_NUM_THREADS=1;
    # two BLAS threads took 0.68 s beside the Data layer's prefetch thread,
    # see benchmarks/bench_cifar_map.sh).
    # Nesterov, lr 0.1 decaying linearly to 0 (poly, power 1), no steps.
    return [
        ("net", f"prototxt/cifar_hash{bits}_train_val.prototxt"),
        ("test_iter", 100), ("test_interval", 3250), ("test_initialization", False),
        ("base_lr", 0.1), ("lr_policy", "poly"), ("power", 1.0), ("max_iter", 6500),
        ("type", "Nesterov"), ("momentum", 0.9), ("weight_decay", 0.0005),
        ("display", 50), ("snapshot", 1000),
        ("snapshot_prefix", f"runs/cifar_hash{bits}/snapshots/cifar_hash{bits}"),
        ("solver_mode", "CPU"),
    ]


# --------------------------------------------------------------------------
# The fast from-scratch net for small images (issue 19; the recipe is
# python/dlbhc/training/fast.py, driven by pycaffe)
#
# airbench's layout (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a
# single GPU", arXiv 2404.00498): a frozen 2x2 patch-whitening convolution,
# then three blocks of [conv 3x3 -> max-pool 2x2 -> BatchNorm -> bias ->
# ReLU -> conv 3x3 -> BatchNorm -> bias -> ReLU], global max-pooling. Caffe
# has no GELU: ReLU stands in (ELU led ReLU after 2 epochs of CIFAR-10 but
# trailed it over a full run: 0.864 against 0.869 test accuracy with
# mirrors; docs/benchmarks.md). BatchNorm's scale is fixed at 1 as in
# airbench, so a Bias layer (one learned offset per channel) follows it
# instead of a Scale layer. Then the paper's head: fc7 (the pooled block-3
# activations) -> latent InnerProduct + Sigmoid -> classifier.
FAST_BITS = (12, 48, 128)
# Block widths: airbench94's are 64/256/256. On the 2-core machine one
# epoch of those costs ~7 min (caffe time); see fast.py for the measured
# choice.
FAST_WIDTHS = (64, 128, 128)
FAST_INPUT = 32
# whitening: 2x2 patches of 3 channels = 12 dimensions; each eigenvector
# and its negative (ReLU keeps both signs of a whitened patch).
FAST_WHITEN_KERNEL = 2
FAST_WHITEN_WIDTH = 2 * 3 * FAST_WHITEN_KERNEL ** 2


def fast_conv_bn(name, bottom, num, pool_after_conv=False):
    """conv 3x3 (no bias) [-> max-pool 2x2] -> BatchNorm -> Bias -> ReLU; the
    output blob is `name` (or `name`_pool)."""
    top = name
    layers = [layer(name, "Convolution", bottom, name,
                    ("param", msg(("lr_mult", 1), ("decay_mult", 1))),
                    ("convolution_param", msg(
                        ("num_output", num), ("bias_term", False), ("pad", 1),
                        ("kernel_size", 3), ("weight_filler", filler("msra")))))]
    if pool_after_conv:
        top = f"{name}_pool"
        layers.append(pool(top, name, kernel=2, stride=2))
    layers += [
        # use_global_stats unset: batch statistics in TRAIN, the running
        # averages in TEST. fast.py re-estimates the running averages after
        # training (the averaged weights' own statistics).
        layer(f"{name}_bn", "BatchNorm", top, top,
              ("param", [msg(("lr_mult", 0), ("decay_mult", 0))] * 3),
              ("batch_norm_param", msg(("moving_average_fraction", 0.9)))),
        layer(f"{name}_bias", "Bias", top, top,
              ("param", msg(("lr_mult", 1), ("decay_mult", 0)))),
        relu(f"{name}_relu", top),
    ]
    return top, layers


def fast_body(widths=FAST_WIDTHS):
    """data -> whiten (frozen) -> 3 blocks -> fc7 (global max, widths[-1])."""
    layers = [layer("whiten", "Convolution", "data", "whiten",
                    ("param", [msg(("lr_mult", 0), ("decay_mult", 0))] * 2),
                    ("convolution_param", msg(
                        ("num_output", FAST_WHITEN_WIDTH),
                        ("kernel_size", FAST_WHITEN_KERNEL),
                        ("weight_filler", filler("gaussian", std=0.1)),
                        ("bias_filler", filler("constant", value=0.0))))),
              relu("whiten_relu", "whiten")]
    h = "whiten"
    for block, width in enumerate(widths, start=1):
        h, first = fast_conv_bn(f"conv{block}_1", h, width, pool_after_conv=True)
        h, second = fast_conv_bn(f"conv{block}_2", h, width)
        layers += first + second
    layers.append(layer("fc7", "Pooling", h, "fc7", ("pooling_param", msg(
        ("pool", "MAX"), ("global_pooling", True)))))
    return layers


def fast_head(bits, num_classes=NUM_CLASSES):
    return latent_and_classifier("fc7", bits, num_classes, classifier_lr_mult=(1, 2))


def fast_train(bits):
    """The training net: inputs fed by fast.py (augmented batches), and
    label smoothing with stock layers: InfogainLoss over the softmax with
    H = (1 - eps) I + eps / K (its third input, set by fast.py) is the
    smoothed cross-entropy."""
    inputs = [layer(name, "Input", None, name, ("input_param", msg(
        ("shape", msg(*[("dim", d) for d in shape])))))
        for name, shape in (("data", [500, 3, FAST_INPUT, FAST_INPUT]), ("label", [500]),
                            ("smoothing", [1, 1, NUM_CLASSES, NUM_CLASSES]))]
    return (f"fast_hash{bits}", inputs + fast_body() + fast_head(bits) + [
        layer("prob", "Softmax", "fc9_classifier", "prob"),
        layer("loss", "InfogainLoss", ["prob", "label", "smoothing"], "loss")])


def fast_deploy(bits):
    return (f"fast_hash{bits}", [input_layer([100, 3, FAST_INPUT, FAST_INPUT])] + fast_body()
            + fast_head(bits) + deploy_head())


# --------------------------------------------------------------------------
# EfficientNet-Lite0, converted from ImageNet weights (python/dlbhc/nets/backbones.py)

# Stages of EfficientNet-Lite0 (= B0's without squeeze-excitation; the stem
# (32) and head (1280) are not scaled in the Lite models):
# (repeats, kernel, stride of the first block, expand ratio, output channels)
EFFNET_LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40),
                       (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192),
                       (1, 3, 1, 6, 320)]
EFFNET_STEM, EFFNET_HEAD = 32, 1280
EFFNET_BN_EPS = 0.001      # TensorFlow's batch-norm epsilon, which the weights were trained with
EFFNET_BACKBONE = "efficientnet_lite0"
EFFNET_BITS = (12, 20, 48, 128)
# Input sides: ImageNet's 224 for the converted model and own collections;
# any multiple of 32 works (the SAME-padding trick below needs even sizes at
# every stride-2 layer), and run folders get deploy copies at their own size.
EFFNET_INPUT = 224
# The converted nets take Caffe's usual input: BGR, 0..255, minus this mean
# (per channel). The weights were trained on (RGB - 127) / 128: the
# converter folds the 1/128 and the channel swap into the stem convolution.
EFFNET_MEAN_BGR = (127.0, 127.0, 127.0)


def effnet_conv(name, bottom, num, kernel, stride=1, group=1, top=None):
    """Convolution with TensorFlow's SAME padding, no bias (BatchNorm follows).

    Stride 1, odd kernel: SAME is symmetric, pad = kernel // 2. Stride 2 on
    an even input: SAME pads (kernel - 2) in total, one less before than
    after; stock Caffe only pads symmetrically, so the kernel grows by one
    with a zero first row and column (the converter writes them) and pad =
    kernel // 2: the windows then cover exactly TensorFlow's, and the output
    has the same size (tests/test_backbones.py checks it against a numpy
    forward with explicit asymmetric padding)."""
    k = kernel + 1 if stride == 2 else kernel
    p = [("num_output", num), ("bias_term", False), ("pad", kernel // 2),
         ("kernel_size", k)]
    if stride != 1:
        p.append(("stride", stride))
    if group != 1:
        p.append(("group", group))
    p.append(("weight_filler", filler("msra")))
    return layer(name, "Convolution", bottom, top or name,
                 ("param", msg(("lr_mult", 1), ("decay_mult", 1))),
                 ("convolution_param", msg(*p)))


def effnet_bn(conv_name, blob, relu6=True):
    """BatchNorm (ImageNet statistics, kept: use_global_stats in every phase,
    so fine-tuning with small CPU batches neither needs nor disturbs batch
    statistics) + Scale (trainable gamma/beta) [+ ReLU6], all in place."""
    layers = [
        layer(f"{conv_name}_bn", "BatchNorm", blob, blob,
              ("param", [msg(("lr_mult", 0), ("decay_mult", 0))] * 3),
              ("batch_norm_param", msg(("use_global_stats", True), ("eps", EFFNET_BN_EPS)))),
        layer(f"{conv_name}_scale", "Scale", blob, blob,
              ("param", [msg(("lr_mult", 1), ("decay_mult", 0))] * 2),
              ("scale_param", msg(("bias_term", True)))),
    ]
    if relu6:
        layers.append(layer(f"{conv_name}_relu", "ReLU6", blob, blob))
    return layers


def effnet_block(i, bottom, in_ch, out_ch, kernel, stride, expand):
    """MBConv without squeeze-excitation: [1x1 expand] -> depthwise -> 1x1
    project, with an identity shortcut when shape allows. Output blob b<i>."""
    layers = []
    h = bottom
    mid = in_ch * expand
    if expand != 1:
        layers += [effnet_conv(f"b{i}_expand", h, mid, 1)] + effnet_bn(f"b{i}_expand", f"b{i}_expand")
        h = f"b{i}_expand"
    layers += [effnet_conv(f"b{i}_dw", h, mid, kernel, stride, group=mid)] \
        + effnet_bn(f"b{i}_dw", f"b{i}_dw")
    residual = stride == 1 and in_ch == out_ch
    project_top = f"b{i}_project" if residual else f"b{i}"
    layers += [effnet_conv(f"b{i}_project", f"b{i}_dw", out_ch, 1, top=project_top)] \
        + effnet_bn(f"b{i}_project", project_top, relu6=False)
    if residual:
        layers.append(layer(f"b{i}_add", "Eltwise", [bottom, project_top], f"b{i}"))
    return layers


def effnet_blocks():
    """[(index, kernel, stride, expand, in, out)] of the 16 blocks."""
    blocks, channels = [], EFFNET_STEM
    for repeats, kernel, stride, expand, out in EFFNET_LITE0_STAGES:
        for r in range(repeats):
            blocks.append((len(blocks), kernel, stride if r == 0 else 1, expand, channels, out))
            channels = out
    return blocks


def effnet_body(pooled):
    """data -> stem -> 16 blocks -> head (1x1 conv 1280, ReLU6) -> global
    average pooling into blob `pooled`. Layer names follow the PyTorch
    state dict's (see backbones.TORCH_TO_CAFFE)."""
    layers = [effnet_conv("stem", "data", EFFNET_STEM, 3, stride=2)] + effnet_bn("stem", "stem")
    h = "stem"
    for i, kernel, stride, expand, in_ch, out_ch in effnet_blocks():
        layers += effnet_block(i, h, in_ch, out_ch, kernel, stride, expand)
        h = f"b{i}"
    layers += [effnet_conv("head", h, EFFNET_HEAD, 1)] + effnet_bn("head", "head")
    layers.append(layer(pooled, "Pooling", "head", pooled, ("pooling_param", msg(
        ("pool", "AVE"), ("global_pooling", True)))))
    return layers


def effnet_backbone_deploy():
    """The converted ImageNet model itself: pooled features -> 1000 classes."""
    return (EFFNET_BACKBONE, [input_layer([1, 3, EFFNET_INPUT, EFFNET_INPUT])]
            + effnet_body("pool")
            + [layer("classifier", "InnerProduct", "pool", "classifier",
                     ("inner_product_param", msg(("num_output", 1000)))),
               layer("prob", "Softmax", "classifier", "prob")])


def effnet_hash_head(bits):
    """fc7 (the pooled 1280-d head activations, ReLU6: the feature
    ImageNet's classifier reads) -> dropout 0.2 as EfficientNet-Lite0 in
    training -> latent layer -> classifier (new layers learn 10x faster)."""
    return ([dropout("drop7", "fc7", ratio=0.2)]
            + latent_and_classifier("fc7", bits, NUM_CLASSES))


def effnet_train_val(bits):
    name = f"{EFFNET_BACKBONE}_hash{bits}"
    layers = data_layers((f"data/cifar10/cifar10_train_{EFFNET_INPUT}_lmdb",
                          f"data/cifar10/cifar10_test_{EFFNET_INPUT}_lmdb"), (32, 50),
                         crop_size=EFFNET_INPUT, mean_value=EFFNET_MEAN_BGR)
    return (name, layers + effnet_body("fc7") + effnet_hash_head(bits) + train_heads())


def effnet_deploy(bits):
    return (f"{EFFNET_BACKBONE}_hash{bits}",
            [input_layer([10, 3, EFFNET_INPUT, EFFNET_INPUT])] + effnet_body("fc7")
            + effnet_hash_head(bits) + deploy_head())


def effnet_solver(bits):
    # Fine-tuning from ImageNet: SGD with momentum, lr 0.01 decaying
    # linearly to 0. A run folder's copy gets max_iter, the data and the
    # frozen split from python/train.py (see dlbhc/training/).
    name = f"{EFFNET_BACKBONE}_hash{bits}"
    return [
        ("net", f"prototxt/{name}_train_val.prototxt"),
        ("test_iter", 200), ("test_interval", 2000), ("test_initialization", False),
        ("base_lr", 0.01), ("lr_policy", "poly"), ("power", 1.0), ("max_iter", 10000),
        ("momentum", 0.9), ("weight_decay", 0.0001),
        ("display", 20), ("snapshot", 2000),
        ("snapshot_prefix", f"runs/{name}/snapshots/{name}"),
        ("solver_mode", "CPU"),
    ]


# --------------------------------------------------------------------------


def net_text(name_and_layers, header):
    name, layers = name_and_layers
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append(f'name: "{name}"')
    lines.extend(_render(layers))
    return "\n".join(lines) + "\n"


def solver_text(fields, header):
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.extend(_render(fields))
    return "\n".join(lines) + "\n"


GENERATED = "Generated by prototxt/generate.py; edit the generator and rerun it."


def family(base, train_val, deploy, solver, headers):
    """{file name: text} of one net's three files; headers: their comments."""
    return {f"{base}_train_val.prototxt": net_text(train_val, headers[0]),
            f"{base}_deploy.prototxt": net_text(deploy, headers[1]),
            f"{base}_solver.prototxt": solver_text(solver, headers[2])}


def all_files():
    """{file name: text} for every prototxt this project ships."""
    files = {}
    for bits in ALEXNET_BITS:
        base = f"alexnet_hash{bits}"
        files.update(family(base, alexnet_train_val(bits), alexnet_deploy(bits),
                            alexnet_solver(bits), (
            f"AlexNet + {bits}-bit latent layer, fine-tuning on CIFAR-10 (256x256 LMDB,\n"
            f"random 227 crops and mirroring). Train: make train NET=alexnet BITS={bits}\n"
            f"(caffe train -solver prototxt/{base}_solver.prototxt -weights\n"
            f"models/bvlc_alexnet/bvlc_alexnet.caffemodel). {GENERATED}",
            f"AlexNet + {bits}-bit latent layer, deploy: blobs fc7 (4096, after ReLU)\n"
            f"and latent ({bits} sigmoid activations; code = latent > 0.5). {GENERATED}",
            f"Fine-tuning solver for alexnet_hash{bits} (the official DLBHC schedule).\n"
            f"solver_mode is overridden by `make train GPU=1`. {GENERATED}")))
    for bits in CIFAR_BITS:
        base = f"cifar_hash{bits}"
        files.update(family(base, cifar_train_val(bits), cifar_deploy(bits), cifar_solver(bits), (
            f"Small CPU-trainable net for 32x32 CIFAR-10 with a {bits}-bit latent layer,\n"
            f"trained from scratch: make train NET=cifar BITS={bits}. {GENERATED}",
            f"Small net, deploy: blobs fc7 (256) and latent ({bits}). {GENERATED}",
            f"Solver for cifar_hash{bits}, from scratch on the CPU. {GENERATED}")))
    for bits in FAST_BITS:
        base = f"fast_hash{bits}"
        files[f"{base}_train.prototxt"] = net_text(fast_train(bits), (
            f"The fast from-scratch net for 32x32 images with a {bits}-bit latent layer:\n"
            f"the training net, fed and stepped by python/dlbhc/training/fast.py\n"
            f"(make train NET=fast BITS={bits}). {GENERATED}"))
        files[f"{base}_deploy.prototxt"] = net_text(fast_deploy(bits), (
            f"The fast net, deploy: blobs fc7 ({FAST_WIDTHS[-1]}, global max of block 3) and\n"
            f"latent ({bits}). {GENERATED}"))
    for bits in EFFNET_BITS:
        base = f"{EFFNET_BACKBONE}_hash{bits}"
        files.update(family(base, effnet_train_val(bits), effnet_deploy(bits), effnet_solver(bits), (
            f"EfficientNet-Lite0 (ImageNet, models/{EFFNET_BACKBONE}) + {bits}-bit latent layer.\n"
            f"A template: python/train.py writes the run's copy with its data, classes\n"
            f"and input size (make train NET={EFFNET_BACKBONE} BITS={bits} [DATA=...]). {GENERATED}",
            f"EfficientNet-Lite0 + {bits}-bit latent layer, deploy: blobs fc7 (1280, the\n"
            f"global average of the head's ReLU6 activations) and latent ({bits}). {GENERATED}",
            f"Fine-tuning solver for {base}; python/train.py adapts a copy per run. {GENERATED}")))
    files[f"../models/{EFFNET_BACKBONE}/deploy.prototxt"] = net_text(effnet_backbone_deploy(), (
        f"EfficientNet-Lite0, ImageNet 1000 classes, converted to Caffe by `make backbone`\n"
        f"(python/dlbhc/nets/backbones.py). Input: BGR 0..255 minus {EFFNET_MEAN_BGR[0]:g},\n"
        f"{EFFNET_INPUT}x{EFFNET_INPUT}. {GENERATED}"))
    return files


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, text in all_files().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if check and stale:
        print("out of date (run python prototxt/generate.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
