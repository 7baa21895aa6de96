"""The hashing net at deploy time: preprocessing and forward -> fc7, latent, code.

Preprocessing follows Caffe's own tools and the training data exactly:
the image is squash-resized to the size the training LMDB was made at (256
for AlexNet, 32 for the small net; see data/convert_imageset.py), centre-
cropped to the net's input (227 / 32, as the TEST phase of the Data layer
does), then caffe.io.Transformer's steps turn it into the net's input: HWC ->
CHW, RGB -> BGR, [0,1] -> [0,255], minus the per-channel mean (the average of
the training set's mean image, as Caffe's classify.py does). BatchTransformer
does those steps for a whole batch, bit-identical to the Transformer.

The whole recipe is a plain dict (`Preprocessing.as_dict()`), recorded in the
feature store so that a query is always prepared like its database, and, by
python/train.py, in the run folder beside the trained weights
(preprocessing.json): a net is then prepared as it was trained without a
--mean, and a --mean (or --resize) that contradicts the record is refused.
"""
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .caffe_env import import_caffe, set_mode
from .fold import folded_net
from ..search.codes import CODE_THRESHOLD, pack_codes
from ..errors import UserError
from ..files import file_digest
from ..images import read_image, resize_for_net
from .protos import layer_param_shapes, parse_caffemodel, read_prototxt


# Blob names every deploy net exposes, whatever its backbone: the re-rank
# feature and the latent layer's sigmoid output (codes are latent > 0.5).
FEATURE_BLOB = "fc7"
LATENT_BLOB = "latent"


@dataclass(frozen=True)
class Preprocessing:
    resize: int              # squash-resize to resize x resize first
    crop: int                # then centre crop to crop x crop (the net input)
    mean_bgr: tuple          # per-channel mean subtracted, BGR, 0..255 scale
    channel_order: str = "BGR"
    raw_scale: float = 255.0
    # features = the mean of the image's and its mirror image's (the fast
    # recipe's test-time flip averaging); recorded only when on, so the
    # records of every other model stay as they were
    flip_average: bool = False
    # those views at half weight, and a quarter each to the same views of
    # the image shifted one pixel down-right and up-left (edges reflected):
    # airbench's test-time augmentation level 2; recorded only when on
    shift_average: bool = False

    def as_dict(self):
        d = asdict(self)
        d["mean_bgr"] = [round(float(m), 4) for m in self.mean_bgr]
        for view in ("flip_average", "shift_average"):
            if not d[view]:
                del d[view]
        return d

    def views(self, crops):
        """The test-time views of a batch of crops (n, h, w, 3), whose
        outputs are averaged with the weights given: [(weight, views)], the
        weights summing to 1. Without flip or shift averaging: [(1, crops)]."""
        crops = np.asarray(crops)

        def with_mirror(batch):
            return [batch, batch[:, :, ::-1]] if self.flip_average else [batch]

        views = [(1.0, v) for v in with_mirror(crops)]
        if self.shift_average:
            h, w = crops.shape[1:3]
            padded = np.pad(crops, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
            views = ([(0.5, v) for _, v in views]
                     + [(0.25, v) for v in with_mirror(padded[:, :h, :w])
                        + with_mirror(padded[:, 2:, 2:])])
        per_group = len(with_mirror(crops))
        return [(weight / per_group, np.ascontiguousarray(v)) for weight, v in views]

    @classmethod
    def from_dict(cls, d):
        return cls(resize=int(d["resize"]), crop=int(d["crop"]),
                   mean_bgr=tuple(float(m) for m in d["mean_bgr"]),
                   channel_order=d.get("channel_order", "BGR"),
                   raw_scale=float(d.get("raw_scale", 255.0)),
                   flip_average=bool(d.get("flip_average", False)),
                   shift_average=bool(d.get("shift_average", False)))


def _squeezed(shape):
    # Old caffemodels store 4-d (num, channels, height, width) shapes with
    # leading 1s where current nets use 2-d or 1-d blobs: compare without them.
    return tuple(int(d) for d in shape if d != 1)


def check_weights_match(net, trained, weights, deploy):
    """Refuse weights whose layers have other shapes than the deploy net's.

    net: the caffe.Net built from `deploy` without weights; trained: the
    NetParameter parsed from the `weights` file (protos.parse_caffemodel).
    Caffe's copy of mismatched weights aborts the process; this says why.
    """
    trained_shapes = layer_param_shapes(trained)
    problems = []
    for name, params in net.params.items():
        expected = [tuple(p.data.shape) for p in params]
        have = trained_shapes.get(name)
        if have is None:
            problems.append(f"layer {name}: no weights in {Path(weights).name}")
        elif [_squeezed(s) for s in have] != [_squeezed(s) for s in expected]:
            problems.append(f"layer {name}: weights have shapes {have}, the net needs {expected}")
    if problems:
        raise UserError(f"{weights} does not fit {deploy}:\n  " + "\n  ".join(problems[:8])
                        + "\nUse the weights trained with this net (same bits and layers).")


def load_mean_bgr(mean):
    """Per-channel BGR mean from a .npy (C,H,W or C), a .binaryproto, or
    'B,G,R' values."""
    if mean is None:
        raise UserError("no mean given: pass --mean FILE.npy|FILE.binaryproto or --mean B,G,R")
    if isinstance(mean, (list, tuple, np.ndarray)):
        values = np.asarray(mean, dtype=np.float64).ravel()
    elif "," in str(mean) and not Path(str(mean)).exists():
        try:
            values = np.array([float(v) for v in str(mean).split(",")])
        except ValueError:
            raise UserError(f"--mean {mean!r}: expected three numbers B,G,R") from None
    else:
        path = Path(mean)
        if not path.exists():
            raise UserError(f"mean file {path} does not exist (make it with "
                            "python data/convert_imageset.py ... --mean PREFIX)")
        if path.suffix == ".npy":
            arr = np.load(path)
        elif path.suffix == ".binaryproto":
            caffe = import_caffe()
            blob = caffe.proto.caffe_pb2.BlobProto()
            try:
                blob.ParseFromString(path.read_bytes())
            except Exception as err:
                raise UserError(f"{path} is not a Caffe BlobProto: {err}") from err
            arr = caffe.io.blobproto_to_array(blob)[0]
        else:
            raise UserError(f"mean file {path}: expected .npy or .binaryproto")
        values = arr.reshape(arr.shape[0], -1).mean(axis=1) if arr.ndim > 1 else arr
    if values.shape != (3,):
        raise UserError(f"mean must have 3 channels, got shape {values.shape}")
    return tuple(float(v) for v in values)


# The record of a trained model's preprocessing, beside its weights.
PREPROCESSING_FILE = "preprocessing.json"
# Means are recorded rounded, and the same images give means that differ by
# a fraction of a grey level between decoders (CIFAR-10's PNGs vs its JPEG
# copy: < 0.5); a mean further off than this was computed on other data.
MEAN_TOLERANCE = 1.0


def preprocessing_record_path(weights):
    """Where a model's preprocessing.json is looked for: beside the weights
    (the run folder), or one folder up for a snapshot in runs/<run>/snapshots/."""
    weights = Path(weights)
    for folder in (weights.parent, weights.parent.parent):
        path = folder / PREPROCESSING_FILE
        if path.exists():
            return path
        if folder.name != "snapshots":
            break
    return None


def write_preprocessing_record(folder, prep, note=""):
    """preprocessing.json in `folder` (a run folder): the Preprocessing a
    model was trained with, and a note on where it came from."""
    path = Path(folder) / PREPROCESSING_FILE
    path.write_text(json.dumps(dict(prep.as_dict(), note=note), indent=2) + "\n")
    return path


def read_preprocessing_record(path):
    try:
        return Preprocessing.from_dict(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable preprocessing record ({err}): "
                        "delete it and pass --mean, or retrain") from None


def resolve_preprocessing(weights, crop, mean=None, resize=None):
    """The Preprocessing for a net with input `crop`: the record beside
    `weights` when there is one (a given mean or resize must agree with it),
    else built from `mean` and `resize` (default_resize)."""
    record_path = preprocessing_record_path(weights)
    if record_path is None:
        if mean is None:
            raise UserError(f"no mean given, and no {PREPROCESSING_FILE} beside {weights} "
                            "records the model's preprocessing: pass --mean (the training "
                            "data's mean: .npy, .binaryproto or B,G,R)")
        return Preprocessing(resize=int(resize or default_resize(crop)), crop=crop,
                             mean_bgr=load_mean_bgr(mean))
    recorded = read_preprocessing_record(record_path)
    if mean is not None:
        given = load_mean_bgr(mean)
        if max(abs(a - b) for a, b in zip(given, recorded.mean_bgr)) > MEAN_TOLERANCE:
            shown = lambda m: ", ".join(f"{v:.2f}" for v in m)
            raise UserError(f"the mean given ({mean}: B,G,R {shown(given)}) is not the one the "
                            f"model was trained with (B,G,R {shown(recorded.mean_bgr)}, "
                            f"recorded in {record_path}): features would not match the "
                            "training. Leave out --mean to use the recorded one.")
    if resize is not None and int(resize) != recorded.resize:
        raise UserError(f"--resize {resize} contradicts the model's training resize "
                        f"{recorded.resize} (recorded in {record_path}); leave it out")
    if recorded.crop != crop:
        raise UserError(f"the deploy net's input is {crop}x{crop}, but the model was trained "
                        f"on {recorded.crop}x{recorded.crop} crops (recorded in {record_path}): "
                        "use the deploy prototxt of its run folder")
    return recorded


def default_resize(crop):
    """The training LMDB size for a net input: AlexNet 227 <- 256, else none."""
    return 256 if crop == 227 else crop


def prepare_crop(rgb, prep):
    """Resize + centre crop a HxWx3 uint8 RGB image; stays uint8 (the worker
    processes hand a quarter of the bytes of float32 to the net's process)."""
    img = resize_for_net(rgb, prep.resize)
    off = (prep.resize - prep.crop) // 2
    return np.ascontiguousarray(img[off:off + prep.crop, off:off + prep.crop])


class BatchTransformer:
    """caffe.io.Transformer.preprocess for a whole batch of uint8 crops.

    The same float32 operations in the same order as Caffe's Transformer
    applied to caffe.io.load_image's [0, 1] floats (x / 255, HWC -> CHW,
    RGB -> BGR, x raw_scale, - mean), so the result is bit-identical to
    preprocessing image by image (tests/test_extract.py). It works one
    output channel at a time, written straight into the destination (the
    net's input blob): for a 227x227 batch that is 0.18 ms per image against
    0.84 ms for whole-array numpy steps and ~0.6 ms for the Transformer.
    """

    def __init__(self, prep):
        self.order = [2, 1, 0] if prep.channel_order == "BGR" else [0, 1, 2]
        self.raw_scale = np.float32(prep.raw_scale)
        self.mean = np.asarray(prep.mean_bgr, dtype=np.float32)

    def __call__(self, crops, out=None):
        """(n, H, W, 3) uint8 RGB -> (n, 3, H, W) float32 net input, in `out`
        when given (a C-contiguous float32 array of that shape)."""
        crops = np.asarray(crops)
        n, height, width, _ = crops.shape
        if out is None:
            out = np.empty((n, 3, height, width), dtype=np.float32)
        for channel, source in enumerate(self.order):
            plane = out[:, channel]
            np.divide(crops[..., source], np.float32(255.0), out=plane, dtype=np.float32)
            plane *= self.raw_scale
            plane -= self.mean[channel]
        return out


class ImagePreparer:
    """Path -> uint8 crop (crop, crop, 3) RGB. Picklable for worker pools."""

    def __init__(self, prep):
        self.prep = prep

    def __call__(self, path):
        return prepare_crop(read_image(path), self.prep)


class HashNet:
    """A deploy net with the blobs fc7 and latent, its weights loaded."""

    def __init__(self, deploy, weights, mean=None, gpu=None, resize=None, check=True,
                 fold=True, views=True):
        """mean/resize: the training data's; by default the run folder's
        record (preprocessing.json beside the weights), which they must not
        contradict (resolve_preprocessing). fold: BatchNorm + Scale folded
        into the convolutions at load (nets.fold: the same codes, fc7 within
        float rounding, a faster forward); False runs the net as written.
        views=False: one forward per image, whatever test-time views
        (flip_average, shift_average) the record asks for (training's head
        refit fits on single views: a sixth of the forwards)."""
        for what, path in (("deploy prototxt", deploy), ("weights", weights)):
            if not Path(path).is_file():
                raise UserError(f"{what} {path} does not exist")
        caffe = set_mode(gpu)
        self.gpu = gpu
        self.deploy = str(deploy)
        self.weights = str(weights)
        self._weights_sha1 = None
        self.fold = bool(fold)
        self.net = self._load(caffe, check)
        for blob in (FEATURE_BLOB, LATENT_BLOB):
            if blob not in self.net.blobs:
                raise UserError(f"{deploy} has no blob '{blob}': the deploy net must expose "
                                f"'{FEATURE_BLOB}' and '{LATENT_BLOB}' (see prototxt/)")
        shape = self.net.blobs["data"].data.shape
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
            raise UserError(f"{deploy}: expected a square 3-channel input, got {shape}")
        crop = shape[2]
        self.bits = self.net.blobs[LATENT_BLOB].data[0].size
        self.fc7_dim = self.net.blobs[FEATURE_BLOB].data[0].size
        self.prep = resolve_preprocessing(weights, crop, mean, resize)
        if not views:
            self.prep = replace(self.prep, flip_average=False, shift_average=False)
        self.transform = BatchTransformer(self.prep)
        if self.prep.resize < crop:
            raise UserError(f"resize {self.prep.resize} is smaller than the net input {crop}")

    def _load(self, caffe, check):
        """The net built once, then its weights copied in: what
        caffe.Net(deploy, TEST, weights=...) does, with the checks between.

        Caffe aborts the whole process (glog FATAL) on a malformed prototxt
        or a weight shape mismatch, so with `check` both are checked first,
        where a clear message can still be given: the weights file is read
        once here, parsed for the shape check and hashed for describe().
        extract.py's forward workers pass check=False (the parent checked).
        With fold, the loaded net is then rebuilt with its BatchNorm folded.
        """
        trained, net_param = None, None
        if check or self.fold:
            net_param = read_prototxt(self.deploy, "NetParameter")
        if check:
            data = Path(self.weights).read_bytes()
            self._weights_sha1 = hashlib.sha1(data).hexdigest()
            trained = parse_caffemodel(data, self.weights)
        net = caffe.Net(self.deploy, caffe.TEST)
        if trained is not None:
            check_weights_match(net, trained, self.weights, self.deploy)
        net.copy_from(self.weights)
        return folded_net(caffe, net, net_param) if self.fold else net

    def describe(self):
        """What the feature store records about the model."""
        if self._weights_sha1 is None:
            self._weights_sha1 = file_digest(self.weights, "sha1")
        return {
            "bits": int(self.bits), "fc7_dim": int(self.fc7_dim),
            "threshold": CODE_THRESHOLD, "preprocessing": self.prep.as_dict(),
            "model": {"deploy": self.deploy, "weights": self.weights,
                      "deploy_sha1": file_digest(self.deploy, "sha1"),
                      "weights_sha1": self._weights_sha1},
            "feature_blob": FEATURE_BLOB, "latent_blob": LATENT_BLOB,
        }

    def _input_blob(self, n):
        data = self.net.blobs["data"]
        if data.data.shape[0] != n:
            data.reshape(n, *data.data.shape[1:])
            self.net.reshape()
        return data.data

    def forward_crops(self, crops):
        """crops: (n, crop, crop, 3) uint8 RGB (ImagePreparer's) -> fc7 (n, D),
        latent (n, bits); preprocessed straight into the net's input blob."""
        views = self.prep.views(crops)
        if len(views) == 1:
            return self._forward(views[0][1])
        # the views' features, averaged (Preprocessing.flip_average, shift_average)
        fc7, latent = 0, 0
        for weight, view in views:
            view_fc7, view_latent = self._forward(view)
            fc7 = fc7 + np.float32(weight) * view_fc7
            latent = latent + np.float32(weight) * view_latent
        return fc7, latent

    def _forward(self, crops):
        n = len(crops)
        self.transform(crops, out=self._input_blob(n))
        self.net.forward(end=LATENT_BLOB)
        fc7 = self.net.blobs[FEATURE_BLOB].data.reshape(n, -1).copy()
        latent = self.net.blobs[LATENT_BLOB].data.reshape(n, -1).copy()
        return fc7, latent

    def features_of_paths(self, paths):
        """fc7, latent, codes (codes.pack_codes) for a few image files (queries)."""
        prepare = ImagePreparer(self.prep)
        fc7, latent = self.forward_crops(np.stack([prepare(p) for p in paths]))
        return fc7, latent, pack_codes(latent)
