"""The search core: binary codes, the coarse-to-fine search and its evaluation.

Numpy and the project's own C kernel only: nothing here imports Caffe, the
feature store, the engines (Ray, Milvus) or faiss, so search is tested and
benchmarked without a net or a database (the .importlinter contracts say so).

Modules, from the code format up to the evaluation:

    codes     the code format: threshold, packing, width, Hamming distances;
              the exhaustive scan of the coarse stage (HammingBall, C)
    native    the C kernels of csrc/, compiled on first use into a cache and
              loaded with ctypes
    params    SearchParams: a search's parameters (top_k, candidates,
              max_radius), their defaults and their one validation
    costs     the cost model: measured unit costs that choose the coarse
              strategy of each query
    probing   the probe strategy: flip masks, hashed lookups of the codes at
              distance exactly r
    pivots    the pruned scan: pivot groups and the runs they give per radius
    rerank    the fine stage: fc7 (or PCA) distances and their tie rule, the
              two-step PCA-then-fc7 ranking
    results   what a search returns (CoarseResult, SearchResult(s)) and the
              fine stage every coarse stage ends with (fine_stage)
    index     HashIndex: the bucket table, its cache file, and the batched
              coarse-to-fine search
    pca       the compressed re-rank rows: a PCA projection of fc7
    metrics   mAP@k, P@k, radius precision, PR curves, plots (runs the
              index's search)
    choice    the fine stage chosen per model: the candidates (fc7, latent,
              pca, none), measured on held-out images, the never-below-coarse
              rule
    pairs     all pairs of codes within a Hamming radius (a self-join by
              probing, NearPairs) and those within a feature distance
    groups    connected components of pairs (union-find in numpy)

The names below are the room's public surface; anything else is reached
through its module (e.g. dlbhc.search.codes.HammingBall).
"""
from .choice import choose, measure_fine_stages
from .codes import CODE_THRESHOLD, code_bytes, hamming_distances, hamming_matrix, pack_codes
from .groups import components, groups
from .index import HashIndex
from .metrics import evaluate
from .pairs import NearPairs, close_pairs, near_pairs
from .params import DEFAULT_TOP_K, SearchParams, default_min_candidates
from .pca import Projection
from .rerank import DEFAULT_EXACT_TOP, ReducedRows, fc7_sq_distances
from .results import CoarseResult, SearchResult, SearchResults

__all__ = [
    "CODE_THRESHOLD", "DEFAULT_EXACT_TOP", "DEFAULT_TOP_K",
    "CoarseResult", "HashIndex", "NearPairs", "Projection", "ReducedRows", "SearchParams",
    "SearchResult", "SearchResults",
    "choose", "close_pairs", "code_bytes", "components", "default_min_candidates", "evaluate",
    "fc7_sq_distances", "groups", "hamming_distances", "hamming_matrix", "measure_fine_stages",
    "near_pairs", "pack_codes",
]
