"""dlbhc: content-based image retrieval with deep binary hash codes.

A Caffe reproduction of Lin et al., "Deep Learning of Binary Hash Codes for
Fast Image Retrieval" (CVPR 2015 workshops). The package is made of rooms
(sub-packages) by concern; each room's __init__ states its public surface.
From the bottom up (a room imports only the rooms and modules below it; the
contract file .importlinter says so and tests/test_layout.py checks it with
import-linter):

    report      one logger tree for the library's messages (no log= arguments)
    errors      UserError: a mistake the user can fix, shown without traceback
    progress    the progress line of long jobs (count, rate, ETA)
    files       file digests, atomic writes and folder swaps, checked
                downloads, database kind
    images      reading any image file into RGB, folder and `path label` list
                walking, labels, the list of unreadable images
    search/     the code format and its C kernel, the bucket index and its cost
                model, the fine stage (fc7, PCA), search parameters, metrics
    store/      the feature database: keyed tables + flat fc7 rows, backends,
                metadata, shards and merge, the PCA re-rank rows
    nets/       finding pycaffe, prototxt/caffemodel reading, the deploy net
                and its preprocessing, model-zoo weights, converted backbones
    datasets/   Caffe Datum LMDBs and means, CIFAR-10, a user's collection,
                the real-photo sample
    training/   training recipes behind one protocol, run folders, solver and
                prototxt writing, `caffe train` and its log, frozen features
    extraction/ images -> net -> store, in workers, resumable
    scale/      the same contracts beyond one machine: extraction on Ray, the
                coarse stage on Milvus (engines imported only when used)
    serving/    a database opened for queries (Retriever), the query service
                and its net pool, the HTTP API and the search page
    cli         the scripts' shared arguments (search parameters, --gpu) and
                their one error style

search/ and store/ never import Caffe (serving loads the net through nets/
in the thread or process that runs it), so search is tested and benchmarked
without a net. Brute-force truths and synthetic data for tests and
benchmarks live apart, in python/dlbhc_testing (not installed). The names
below are the package's public surface; everything else is reached through
its room.
"""

from .datasets import compute_mean, convert_imageset, get_cifar10, get_photos
from .errors import UserError
from .extraction import extract
from .images import BadImage, list_images, read_image
from .nets import FEATURE_BLOB, LATENT_BLOB, HashNet, Preprocessing
from .search import (CODE_THRESHOLD, HashIndex, Projection, ReducedRows, SearchParams,
                     SearchResult, SearchResults, code_bytes, default_min_candidates, evaluate,
                     fc7_sq_distances, hamming_distances, hamming_matrix, pack_codes)
from .serving import Query, Retriever
from .store import FeatureStore
from .training import train

__all__ = [
    "CODE_THRESHOLD", "FEATURE_BLOB", "LATENT_BLOB",
    "BadImage", "FeatureStore", "HashIndex", "HashNet", "Preprocessing", "Projection", "Query",
    "ReducedRows", "Retriever", "SearchParams", "SearchResult", "SearchResults", "UserError",
    "code_bytes", "compute_mean", "convert_imageset", "default_min_candidates", "evaluate",
    "extract", "fc7_sq_distances", "get_cifar10", "get_photos", "hamming_distances",
    "hamming_matrix", "list_images", "pack_codes", "read_image", "train",
]

__version__ = "0.3.0"
