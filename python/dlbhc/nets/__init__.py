"""Nets: the Caffe build, Caffe's files, the hashing model and its weights.

Everything that knows about a net, from finding pycaffe to running a
forward pass that gives fc7 features and latent codes.

Modules:
    caffe_env     the project's Caffe build (.caffe or $CAFFE_ROOT): pycaffe
                  imported on demand, tools, CPU/GPU mode, BLAS threads
    protos        Caffe's protobuf files (prototxt, .caffemodel) read with a
                  clear error instead of Caffe's abort
    model         HashNet (deploy net + weights -> fc7 and latent), the input
                  Preprocessing and its record beside the weights
    records       the model's record beyond preprocessing: its chosen fine
                  stage (rerank.json) and class names (classes.txt)
    weights       pretrained weights from Caffe's model zoo, sha1-checked
    backbones     ImageNet backbones converted from pinned registry packages
                  (DEFAULT_BACKBONE: EfficientNet-Lite0)
    torch_legacy  reading a legacy PyTorch pickle without torch

Caffe is imported only inside functions (import_caffe), never at import.
"""
from .backbones import DEFAULT_BACKBONE, backbone_names, convert
from .caffe_env import PROJECT_ROOT, import_caffe
from .model import FEATURE_BLOB, LATENT_BLOB, HashNet, Preprocessing
from .protos import read_prototxt
from .weights import fetch

__all__ = [
    "DEFAULT_BACKBONE", "FEATURE_BLOB", "LATENT_BLOB", "PROJECT_ROOT",
    "HashNet", "Preprocessing",
    "backbone_names", "convert", "fetch", "import_caffe", "read_prototxt",
]
