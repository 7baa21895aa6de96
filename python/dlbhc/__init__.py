"""dlbhc: content-based image retrieval with deep binary hash codes.

A Caffe reproduction of Lin et al., "Deep Learning of Binary Hash Codes for
Fast Image Retrieval" (CVPR 2015 workshops). One module per concern, in
dependency order (a module imports only modules above it):

    errors      UserError: a mistake the user can fix, shown without traceback
    progress    the progress line of long jobs (count, rate, ETA)
    files       file digests, atomic writes and folder swaps, checked
                downloads, database kind
    native      the project's own C kernels (csrc/), compiled on first use
                into a cache and loaded with ctypes
    torch_legacy  legacy (pre-zip) PyTorch checkpoints read without torch,
                through a restricted unpickler
    caffe_env   finding the built pycaffe/libcaffe, CPU/GPU mode
    protos      Caffe's prototxt and .caffemodel files, read with clear errors
    codes       the code format: threshold, packing, width, Hamming distance;
                the exhaustive scan of the coarse stage (its C kernel)
    pca         the compressed re-rank features: a PCA projection of fc7,
                learned once, applied identically to every row and query
    images      reading any image file into RGB, folder/list walking, labels,
                the list of unreadable images
    cifar10     CIFAR-10 acquisition: download or local archive -> folders
    collection  a user's collection for training: classes, labels, the
                held-out split, the run's lists
    photos      a small collection of real photos in class folders from a
                Debian package (Qt resource bundles read), to try training
    datum       image sets -> Caffe Datum LMDB/LevelDB, padding, mean images
    model       deploy net, preprocessing, forward -> fc7 + latent
    weights     pretrained weights from Caffe's model zoo, sha1-checked
    backbones   registry ImageNet weights (pip package, sha256) converted
                into Caffe nets under models/<name>/
    frozen      frozen lower layers: nets cut at a blob, BatchNorm folded,
                cached features (with mirror images), merged weights
    training    `caffe train` runs with progress, per-run prototxts, resume;
                training on a collection (run prototxts from the templates)
    store       the feature database: schema, backends, metadata, shards,
                the PCA re-rank store
    pipeline    bulk extraction: workers, batching, commits, resume
    ray_extract extraction as a Ray job: shards on actors holding one net,
                merged in input order (imports ray only when a job runs)
    pivots      the coarse stage's pruned scan (pivot groups and runs)
    rerank      the fine stage: fc7 (or PCA) distances and their tie rule,
                the two-step PCA-then-fc7 ranking
    index       bucket table and the batched coarse-to-fine search
    milvus_index  the index on Milvus: loading a database, the same search
                with Milvus as coarse stage (imports pymilvus only to connect)
    retrieval   a database opened for queries; tables, JSON, montages
    metrics     mAP@k, P@k, radius precision, PR curves, plots (runs the
                index's search)
    service     a database served for queries: the net kept loaded (batched,
                in a thread or worker processes), growth, thumbnails, limits
    webapp      the HTTP API and the search page over a service (FastAPI)
    reference   brute-force truths, for tests and benchmarks only

Only caffe_env, protos, datum, model, backbones, frozen, training, pipeline
and ray_extract import Caffe (and only when a function needs it; service
through model, in the thread or process that runs the net); codes, pca,
pivots, rerank, index, milvus_index, store, retrieval, metrics, service,
webapp and photos never do, so search can be tested and benchmarked without a net.
The names below are the public surface; everything else is reached
through its module.
"""
from .datasets.cifar10 import get_cifar10
from .search.codes import CODE_THRESHOLD, code_bytes, hamming_distances, hamming_matrix, pack_codes
from .datasets.datum import compute_mean, convert_imageset
from .errors import UserError
from .images import BadImage, list_images, read_image
from .search.index import HashIndex
from .search.params import SearchParams, default_min_candidates
from .search.results import SearchResult, SearchResults
from .search.metrics import evaluate
from .nets.model import FEATURE_BLOB, LATENT_BLOB, HashNet, Preprocessing
from .search.pca import Projection
from .datasets.photos import get_photos
from .extraction.pipeline import extract
from .search.rerank import ReducedRows, fc7_sq_distances
from .serving.retrieval import Query, Retriever
from .store.database import FeatureStore
from .training.recipes import train

__all__ = [
    "CODE_THRESHOLD", "FEATURE_BLOB", "LATENT_BLOB",
    "BadImage", "FeatureStore", "HashIndex", "HashNet", "Preprocessing", "Projection", "Query",
    "ReducedRows", "Retriever", "SearchParams", "SearchResult", "SearchResults", "UserError",
    "code_bytes", "compute_mean", "convert_imageset", "default_min_candidates", "evaluate",
    "extract", "fc7_sq_distances", "get_cifar10", "get_photos", "hamming_distances",
    "hamming_matrix", "list_images", "pack_codes", "read_image", "train",
]

__version__ = "0.2.0"
