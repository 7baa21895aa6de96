"""Editing Caffe nets for a training run: Data layers, classes, input size.

Every Data layer the project writes or rewrites goes through here:
prototxt/generate.py builds the checked-in ones from DataLayer specs
(`DataLayer.fields()`, rendered by its own text writer), the recipes
rewrite them in a run's copy (`set_data_layers`, `move_data_files`),
frozen.top_net adds ones that read cached features (`DataLayer.add_to`),
and the tests point checked-in nets at their own LMDBs with the same
calls. The other edits size a net for a run: the classifier for the
collection's classes, the Input layer for the input side.

Nothing here imports Caffe at module level (generate.py runs without a
build); the functions that take a NetParameter got it from
nets.protos.read_prototxt, which does.
"""
import os
from pathlib import Path
from typing import NamedTuple

from google.protobuf import text_format

from ..errors import UserError
from ..nets.caffe_env import PROJECT_ROOT
from ..nets.model import LATENT_BLOB
from ..nets.protos import caffe_pb2, read_prototxt

PROTOTXT_DIR = PROJECT_ROOT / "prototxt"
# The layer whose outputs are the classes (prototxt/generate.py names it).
CLASSIFIER_LAYER = "fc9_classifier"
PHASES = ("TRAIN", "TEST")


class DataLayer(NamedTuple):
    """One phase's Caffe Data layer: what it reads and how it transforms it.
    None (or an empty mean_value) leaves a field out of the layer."""
    phase: str                    # "TRAIN" or "TEST"
    source: str                   # the LMDB
    batch_size: int
    name: str = "data"
    tops: tuple = ("data", "label")
    mirror: bool = None
    crop_size: int = None
    mean_file: str = None
    mean_value: tuple = ()

    def fields(self):
        """[(field, value or [(field, value), ...])] in the order the
        checked-in prototxts write them (prototxt/generate.py renders it)."""
        transform = [(key, value) for key, value in
                     (("mirror", self.mirror), ("crop_size", self.crop_size),
                      ("mean_file", self.mean_file)) if value is not None]
        transform += [("mean_value", float(v)) for v in self.mean_value]
        out = [("name", self.name), ("type", "Data")]
        out += [("top", top) for top in self.tops]
        out.append(("include", [("phase", self.phase)]))
        if transform:
            out.append(("transform_param", transform))
        out.append(("data_param", [("source", str(self.source)),
                                   ("batch_size", int(self.batch_size)),
                                   ("backend", "LMDB")]))
        return out

    def add_to(self, net):
        """Append this layer to a NetParameter; returns the new layer."""
        pb = caffe_pb2()
        layer = net.layer.add(name=self.name, type="Data")
        layer.top.extend(self.tops)
        layer.include.add(phase=getattr(pb, self.phase))
        if self.mirror is not None:
            layer.transform_param.mirror = bool(self.mirror)
        if self.crop_size is not None:
            layer.transform_param.crop_size = int(self.crop_size)
        if self.mean_file is not None:
            layer.transform_param.mean_file = str(self.mean_file)
        layer.transform_param.mean_value.extend(float(v) for v in self.mean_value)
        if not layer.transform_param.ListFields():
            layer.ClearField("transform_param")
        layer.data_param.source = str(self.source)
        layer.data_param.batch_size = int(self.batch_size)
        layer.data_param.backend = pb.DataParameter.LMDB
        return layer


def data_layer_pair(sources, batch_sizes, mirror=True, **transform):
    """(TRAIN, TEST) DataLayers reading `sources` in `batch_sizes` (pairs);
    with mirror, the training images are mirrored at random (the test
    layer says mirror: false); `transform`: DataLayer's other fields
    (crop_size, mean_file, mean_value, name, tops), the same for both."""
    return tuple(DataLayer(phase, source, batch,
                           mirror=(phase == "TRAIN") if mirror else None, **transform)
                 for phase, source, batch in zip(PHASES, sources, batch_sizes))


class Phases(NamedTuple):
    """A value per phase, for set_data_layers: Phases(train, test)."""
    train: object
    test: object


def layer_phase(layer):
    """"TRAIN", "TEST" or None (a layer in both phases)."""
    pb = caffe_pb2()
    for rule in layer.include:
        if rule.HasField("phase"):
            return "TRAIN" if rule.phase == pb.TRAIN else "TEST"
    return None


def data_layers(net):
    """The Data layers of a NetParameter, in order."""
    return [layer for layer in net.layer if layer.type == "Data"]


def set_data_layers(net, source=None, batch_size=None, mean_value=None, mean_file=None,
                    crop_size=None, mirror=None):
    """Rewrite a NetParameter's Data layers in place (returns net). Each
    argument left None keeps that field; a value applies to both phases,
    Phases(train, test) one per phase. mean_value replaces the per-channel
    mean; crop_size with mirror=True crops and mirrors the training images
    only (the test layer gets mirror: false)."""
    for layer in data_layers(net):
        is_train = layer_phase(layer) == "TRAIN"

        def pick(value):
            return (value.train if is_train else value.test) if isinstance(value, Phases) \
                else value
        if pick(source) is not None:
            layer.data_param.source = str(pick(source))
        if pick(batch_size) is not None:
            layer.data_param.batch_size = int(pick(batch_size))
        if pick(crop_size) is not None:
            layer.transform_param.crop_size = int(pick(crop_size))
        if pick(mirror) is not None:
            layer.transform_param.mirror = bool(pick(mirror)) and is_train
        if pick(mean_file) is not None:
            layer.transform_param.mean_file = str(pick(mean_file))
        if pick(mean_value) is not None:
            del layer.transform_param.mean_value[:]
            layer.transform_param.mean_value.extend(float(v) for v in pick(mean_value))
    return net


def data_files(net):
    """The files a net's Data layers read: every source and mean_file."""
    return [path for layer in data_layers(net)
            for path in (layer.data_param.source, layer.transform_param.mean_file) if path]


def move_data_files(net, data_dir):
    """Every Data layer's source and mean_file moved to the same file name
    under `data_dir` (made absolute); returns net (changed in place)."""
    data_dir = Path(os.path.abspath(data_dir))
    for layer in data_layers(net):
        if layer.data_param.source:
            layer.data_param.source = str(data_dir / Path(layer.data_param.source).name)
        if layer.transform_param.mean_file:
            layer.transform_param.mean_file = str(
                data_dir / Path(layer.transform_param.mean_file).name)
    return net


def project_path(path):
    """A path from a checked-in prototxt: relative ones start at the project."""
    return Path(path) if os.path.isabs(path) else PROJECT_ROOT / path


# ---- sizing a net for a run ---------------------------------------------------------

def set_num_classes(net, num_classes):
    """The classifier's num_output in a NetParameter."""
    found = [layer for layer in net.layer if layer.name == CLASSIFIER_LAYER]
    if not found:
        raise UserError(f"{net.name} has no layer {CLASSIFIER_LAYER} to size for the classes")
    found[0].inner_product_param.num_output = int(num_classes)
    return net


def set_input(net, size, batch):
    """The Input layer's shape (batch, 3, size, size) in a deploy NetParameter."""
    for layer in net.layer:
        if layer.type == "Input":
            del layer.input_param.shape[0].dim[:]
            layer.input_param.shape[0].dim.extend([batch, 3, size, size])
            return net
    raise UserError(f"{net.name} has no Input layer")


def deploy_input_size(deploy):
    """The side of a deploy net's square input (its Input layer's shape)."""
    net = read_prototxt(deploy, "NetParameter")
    for layer in net.layer:
        if layer.type == "Input":
            return int(layer.input_param.shape[0].dim[-1])
    if net.input_shape:
        return int(net.input_shape[0].dim[-1])
    raise UserError(f"{deploy} has no Input layer: not a deploy net")


def write_net(net, path, header):
    """A NetParameter (or SolverParameter) as prototxt text at `path`, under
    `header` as comment lines; returns the path."""
    Path(path).write_text("".join(f"# {line}\n" for line in header.splitlines())
                          + text_format.MessageToString(net))
    return Path(path)


def latent_layer_name(net_param):
    """The InnerProduct whose output the Sigmoid writing LATENT_BLOB reads."""
    sigmoid = [layer for layer in net_param.layer if LATENT_BLOB in layer.top]
    if not sigmoid or sigmoid[-1].type != "Sigmoid":
        raise UserError(f"{net_param.name} has no Sigmoid writing '{LATENT_BLOB}'")
    source = sigmoid[-1].bottom[0]
    for layer in net_param.layer:
        if source in layer.top and layer.type == "InnerProduct":
            return layer.name
    raise UserError(f"{net_param.name}: no InnerProduct feeds the '{LATENT_BLOB}' Sigmoid")
