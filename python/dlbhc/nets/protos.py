"""Caffe's protobuf files: prototxt text (nets, solvers) and binary
.caffemodel weights, read with a clear error instead of Caffe's abort.

Caffe stops the whole process (glog FATAL) on a malformed prototxt or a
weights file that does not fit its net, so every tool reads these files
through here first, where a message can still say what is wrong.
"""
from pathlib import Path

from google.protobuf import text_format

from .caffe_env import import_caffe
from ..errors import UserError


def caffe_pb2():
    """Caffe's generated protobuf module (NetParameter, SolverParameter, ...)."""
    return import_caffe().proto.caffe_pb2


def read_prototxt(path, message="NetParameter"):
    """A prototxt parsed into caffe_pb2.<message> (NetParameter or
    SolverParameter), or a UserError naming the file and where it is wrong."""
    proto = getattr(caffe_pb2(), message)()
    path = Path(path)
    try:
        text_format.Merge(path.read_text(), proto)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (text_format.ParseError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a valid Caffe {message} prototxt: {err}") from None
    return proto


def parse_caffemodel(data, name="weights"):
    """NetParameter from the bytes of a .caffemodel (`name` for messages)."""
    proto = caffe_pb2().NetParameter()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise UserError(f"{name} is not a Caffe .caffemodel: {err}") from None
    if not proto.layer:
        raise UserError(f"{name} holds no layers: not a (current-format) .caffemodel")
    return proto


def layer_param_shapes(net_param):
    """{layer name: [blob shapes]} of a NetParameter holding weights."""
    return {layer.name: [tuple(b.shape.dim) if b.HasField("shape")
                         else tuple(d for d in (b.num, b.channels, b.height, b.width))
                         for b in layer.blobs]
            for layer in net_param.layer if layer.blobs}
