"""dlbhc: content-based image retrieval with deep binary hash codes.

A Caffe reproduction of Lin et al., "Deep Learning of Binary Hash Codes for
Fast Image Retrieval" (CVPR 2015 workshops). One module per concern:

    caffe_env   find the built pycaffe/libcaffe, CPU/GPU mode
    images      read any image file robustly, walk folders and list files
    dataset     CIFAR-10 download/unpack, image set -> Caffe Datum LMDB, mean
    model       deploy net, preprocessing, forward -> fc7 + latent + code
    store       the feature database (LMDB/LevelDB), metadata, resume, shards
    index       packed codes, bucket table, Hamming search, fc7 re-rank
    metrics     mAP@k, P@k, radius precision, PR curves, plots

Only caffe_env, dataset and model import Caffe; index and metrics never do,
so search can be tested and benchmarked without a net.
"""

# Blob names shared by every deploy net, the store and the tools.
FEATURE_BLOB = "fc7"
LATENT_BLOB = "latent"
from .codes import CODE_THRESHOLD  # noqa: E402,F401  (the public surface is stated at the end of the cleanup)

__version__ = "0.1.0"
