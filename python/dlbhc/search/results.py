"""What a search returns, whichever engine ran its coarse stage.

CoarseResult is one query's coarse candidates; fine_stage ranks them
(rerank.fine_rank) into the row SearchResults.from_ranked lays out in
faiss's batch layout, and SearchResults[i] is one query's SearchResult.
HashIndex (index.py) and the Milvus path (scale/milvus_index.py) both end
here, so they order, pad and time their answers alike; this is why these
types live apart from the index.

Ordering rules (the brute-force functions of dlbhc_testing.reference follow
them, so the fast path can be compared with them exactly)
    coarse   by (Hamming distance, image id): sorted_by_hamming.
    fine     by (squared fc7 distance, image id): rerank.fc7_sq_distances
             (or the fine stage's rows, rerank.ReducedRows; the "none" and
             "hamming" stages by (Hamming distance, latent distance, id)).
"""
from dataclasses import dataclass

import numpy as np

from .rerank import fine_rank

# Sort keys of the coarse result: (hamming << _ID_BITS) | id in an int64
# (ids below 2**40, distances up to MAX_BITS = 1024 < 2**23).
_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


@dataclass
class CoarseResult:
    """Coarse candidates: ids (int64) ordered by (hamming, id), their Hamming
    distances (int32), and the radius the search stopped at."""
    ids: np.ndarray
    hamming: np.ndarray
    radius: int


@dataclass
class SearchResult:
    """Top-k of one query's coarse-to-fine search, ordered by (fc7 distance, id).

    l2 is the Euclidean fc7 distance: the float64 square root of the float32
    squared distance the ranking uses (so equal l2 values are exactly the
    ties ordered by id); candidates is how many images the coarse stage
    passed to the re-rank, radius where it stopped; seconds the time the
    query's coarse and fine stages took.  With a compressed (PCA) re-rank,
    only the first `exact` results are ranked and measured by fc7; the rest
    by the distance between compressed rows (in their l2)."""
    ids: np.ndarray
    hamming: np.ndarray
    l2: np.ndarray
    candidates: int
    radius: int
    seconds: float = 0.0
    exact: int = None

    def __post_init__(self):
        if self.exact is None:
            self.exact = len(self.ids)


@dataclass
class SearchResults:
    """A batch of searches in faiss's layout: row i is query i's top k.

        ids        (Q, k) int64    -1 where a query found fewer than k images
        hamming    (Q, k) int32    Hamming distance to the query, -1 padding
        l2         (Q, k) float64  fc7 distance (see SearchResult), inf padding
        candidates (Q,)   int64    images the coarse stage passed to the re-rank
        radius     (Q,)   int32    Hamming radius the coarse stage stopped at
        seconds    (Q,)   float64  time of each query's search
        exact      (Q,)   int64    leading results ranked and measured by fc7
                                   (all found, unless a compressed re-rank
                                   ranked the rest: see SearchResult)

    results[i] is query i's SearchResult, without the padding."""
    ids: np.ndarray
    hamming: np.ndarray
    l2: np.ndarray
    candidates: np.ndarray
    radius: np.ndarray
    seconds: np.ndarray
    exact: np.ndarray = None

    def __post_init__(self):
        if self.exact is None:
            self.exact = np.count_nonzero(self.ids >= 0, axis=1).astype(np.int64)

    @classmethod
    def empty(cls, n_queries, k):
        return cls(np.full((n_queries, k), -1, dtype=np.int64),
                   np.full((n_queries, k), -1, dtype=np.int32),
                   np.full((n_queries, k), np.inf),
                   np.zeros(n_queries, dtype=np.int64), np.zeros(n_queries, dtype=np.int32),
                   np.zeros(n_queries))

    @classmethod
    def from_ranked(cls, ranked, k):
        """Rows from per-query (ids, hamming, sq_distances, candidates,
        radius, exact, seconds), as fine_stage (+ the time) gives them;
        k=None: rows as wide as the longest."""
        width = max((len(r[0]) for r in ranked), default=0) if k is None else int(k)
        out = cls.empty(len(ranked), width)
        for i, (ids, ham, d2, n_cand, radius, n_exact, seconds) in enumerate(ranked):
            out.ids[i, :len(ids)] = ids
            out.hamming[i, :len(ids)] = ham
            out.l2[i, :len(ids)] = np.sqrt(d2.astype(np.float64))
            out.candidates[i], out.radius[i], out.seconds[i] = n_cand, radius, seconds
            out.exact[i] = n_exact
        return out

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        found = int(np.count_nonzero(self.ids[i] >= 0))
        return SearchResult(self.ids[i, :found], self.hamming[i, :found], self.l2[i, :found],
                            int(self.candidates[i]), int(self.radius[i]), float(self.seconds[i]),
                            int(self.exact[i]))


def fine_stage(coarse, query_fc7, fc7, k, reduced=None, query_reduced=None):
    """One query's fine stage over its CoarseResult: the candidates ranked
    by rerank.fine_rank (fc7 distance, or the compressed rows of `reduced`
    then exact fc7 on its best exact_top; ties by id), top k (all with None).
    Returns (ids, hamming, sq_distances, candidates, radius, exact).  Every
    coarse stage (this index's, or an engine's such as milvus_index's)
    ends here, so they rank alike."""
    # Ascending ids: one sequential pass over the rows.
    by_id = np.argsort(coarse.ids, kind="stable")
    ids, ham = coarse.ids[by_id], coarse.hamming[by_id]
    if not len(ids):
        return ids, ham, np.empty(0, np.float32), 0, coarse.radius, 0
    top, d2, n_exact = fine_rank(ids, query_fc7, fc7, k, reduced, query_reduced, ham)
    return ids[top], ham[top], d2, len(ids), coarse.radius, n_exact



def sorted_by_hamming(ids, dist):
    """(ids int64, distances int32) in the coarse stage's (hamming, id)
    order: one sort of int64 keys hamming << _ID_BITS | id, without
    lexsort's two passes and gathers."""
    keys = dist.astype(np.int64) << _ID_BITS
    keys |= ids
    keys.sort()
    return keys & _ID_MASK, (keys >> _ID_BITS).astype(np.int32)
