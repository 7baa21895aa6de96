"""The fine stage: candidates re-ranked by the Euclidean distance of their
fc7 features (or any re-rank rows) to the query's.

Ordering rule: by (squared distance, image id).  Distances are computed by
fc7_sq_distances in float32, row by row (the same arithmetic for every row,
wherever it sits in memory), so equal rows get equal distances and are
ordered by id.  The reported distance is the float64 square root of that
float32 value, so equal distances are exactly the ties.

The rows ranked are fc7, or compressed rows (ReducedRows: the database's PCA
store, Babenko et al.'s "neural codes"): then every candidate is ranked by
the distance between its compressed row and the query's projection, and
with exact_top = E > 0 the best E of that ranking are ranked again by exact
fc7 distance (the two-step fine stage: the compressed rows choose, fc7
orders the top).  Rows that are no projection of fc7 (the stored latent
activations) come with the queries' own rows (project None).  A ranking
with hamming_first orders by (Hamming distance, row distance, id): the
coarse order with the row distance as the tie-break ("none": the latent
breaks ties; with no rows, ties stay by id: the plain Hamming order).
fine_rank is that rule, for one query.

Pure numpy: knows nothing of codes, Caffe or the store.
"""
from dataclasses import dataclass

import numpy as np

# Two-step fine stage: the best this many by compressed distance are ranked
# again by exact fc7 (retrieve.py --exact-top; 0 turns it off).  The fc7 read
# is E random rows per query, so E is kept to a few hundred.
DEFAULT_EXACT_TOP = 200

# Rows per block of fc7_sq_distances's work buffer: ~1 MB of float32, so the
# differences are written and read back in cache (and the buffer is reused)
# instead of a new (M, D) array going through memory.
BLOCK_BYTES = 1 << 20


def fc7_sq_distances(rows, query_fc7, ids=None):
    """Squared Euclidean distances (float32) of rows (M, D) to a query (D,).

    With `ids`, the rows are rows[ids] of a larger array (an ndarray or the
    store's memory map), gathered block by block into the work buffer
    instead of into a separate (M, D) copy.

    Every row goes through the same float32 arithmetic: its difference to the
    query (float16 rows are widened first) is written to a contiguous float32
    buffer and reduced by numpy.vecdot, a generalized ufunc whose core is one
    whole row, i.e. one call of the same dot routine (BLAS sdot) per row.  So
    identical rows give identical distances wherever they sit in memory or in
    the block: the basis of the exact tie rules.  (einsum is not safe here: it
    splits rows longer than numpy's buffer, 8192 values, at offsets that
    depend on the row's position.)
    """
    q = np.asarray(query_fc7, dtype=np.float32).ravel()
    if not hasattr(rows, "shape"):
        rows = np.asarray(rows)
    if len(rows.shape) != 2 or rows.shape[1] != q.shape[0]:
        raise ValueError(f"fc7 rows {tuple(rows.shape)} do not match the query's "
                         f"{q.shape[0]} values")
    if isinstance(rows, np.memmap):
        rows = rows.view(np.ndarray)   # the same mapping, without memmap's per-index wrapper
    m = rows.shape[0] if ids is None else len(ids)
    dim = rows.shape[1]
    out = np.empty(m, dtype=np.float32)
    step = max(1, BLOCK_BYTES // (4 * max(dim, 1)))
    buf = np.empty((min(step, m), dim), dtype=np.float32)
    for lo in range(0, m, step):
        diff = buf[:min(m - lo, step)]
        block = rows[lo:lo + len(diff)] if ids is None else rows[ids[lo:lo + len(diff)]]
        np.subtract(block, q, out=diff, dtype=np.float32)
        np.vecdot(diff, diff, out=out[lo:lo + len(diff)])
    return out


def rank_by_distance(ids, sq_distances, k=None):
    """Positions of the k best candidates by (squared distance, id); all of
    them, ranked, when k is None."""
    if k is None or int(k) >= len(ids):
        return np.lexsort((ids, sq_distances))
    k = max(int(k), 0)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # Only the candidates up to the k-th distance (all of those tied with
    # it included) need sorting: the top k by (distance, id) are among them.
    kth = np.partition(sq_distances, k - 1)[k - 1]
    head = np.flatnonzero(sq_distances <= kth)
    return head[np.lexsort((ids[head], sq_distances[head]))][:k]


def candidate_sq_distances(fc7, ids, query_fc7):
    """Squared distances of candidates `ids` (ascending int64) to the query.

    fc7 is either an array (N, D) of every image's rows (ndarray or memory
    map: rows are gathered block by block), or a function ids -> rows
    (len(ids), D), called once with the ascending ids (friendlier to a B-tree
    or a file than random order)."""
    if callable(fc7):
        rows = fc7(ids)
        d2 = fc7_sq_distances(rows, query_fc7)
    else:
        d2 = fc7_sq_distances(fc7, query_fc7, ids=ids)
    if len(d2) != len(ids):
        raise ValueError(f"the fc7 source returned {len(d2)} rows for {len(ids)} ids")
    return d2


@dataclass
class ReducedRows:
    """Compressed rows the fine stage ranks by instead of fc7.

        rows       every image's compressed row: an array (N, d) (ndarray or
                   the store's memory map) or a function ids -> rows, as fc7
                   in candidate_sq_distances; None with hamming_first: no
                   tie-break but the id
        project    function (Q, D) query fc7 -> (Q, d) rows of that space
                   (pca.Projection.apply); None: the search is given the
                   queries' rows (the latent activations)
        exact_top  the best this many by compressed distance are ranked
                   again by exact fc7 distance (0: compressed ranking only)
        name       what the ranking is called in results ("pca256")
        hamming_first  rank by (Hamming distance, row distance, id)
    """
    rows: object
    project: object
    exact_top: int = 0
    name: str = "reduced"
    hamming_first: bool = False

    def describe(self):
        """e.g. "pca256", "pca256 + fc7 top 200"."""
        return self.name + (f" + fc7 top {self.exact_top}" if self.exact_top else "")


def describe(reduced):
    """What a fine stage ranks by: "fc7" (reduced is None), "pca256",
    "pca256 + fc7 top 200"."""
    return "fc7" if reduced is None else reduced.describe()


def query_rows(reduced, query_fc7, query_reduced=None):
    """The queries' rows (Q, d) of a fine stage: the projection of their fc7
    (reduced.project), their fc7 (reduced None), or the rows given
    (query_reduced: the latent); ValueError when a stage needs rows that
    were not given."""
    if reduced is None:
        return query_fc7
    if reduced.project is not None:
        return reduced.project(query_fc7)
    if reduced.rows is None:
        return np.zeros((len(query_fc7), 0), dtype=np.float32)
    if query_reduced is None or len(query_reduced) != len(query_fc7):
        raise ValueError(f"the {reduced.name} fine stage needs the queries' own rows "
                         "(their latent activations)")
    return np.asarray(query_reduced, dtype=np.float32)


def fine_rank(ids, query_fc7, fc7, k=None, reduced=None, query_reduced=None, hamming=None):
    """The fine stage for one query: its candidates `ids` (ascending int64)
    ranked by (squared distance, id).

    Without `reduced`, by fc7 distance.  With it, by the distance of the
    reduced rows to `query_reduced` (the query's projection), the best
    reduced.exact_top of them then ranked by fc7 distance.  Returns
    (positions into ids of the top k, or of all when k is None; their
    squared distances (float32); how many of the leading ones are ranked and
    measured by fc7 distance).  With reduced.hamming_first, `hamming` (the
    candidates' Hamming distances) orders first, the rows' distance breaks
    its ties.
    """
    if reduced is not None and reduced.hamming_first:
        if reduced.rows is None:
            d2 = np.zeros(len(ids), dtype=np.float32)
        else:
            d2 = candidate_sq_distances(reduced.rows, ids, query_reduced)
        order = np.lexsort((ids, d2, np.asarray(hamming)))
        if k is not None:
            order = order[:max(int(k), 0)]
        return order, d2[order], 0
    if reduced is None:
        d2 = candidate_sq_distances(fc7, ids, query_fc7)
        top = rank_by_distance(ids, d2, k)
        return top, d2[top], len(top)
    d2 = candidate_sq_distances(reduced.rows, ids, query_reduced)
    n_exact = min(int(reduced.exact_top), len(ids))
    order = rank_by_distance(ids, d2, None if k is None else max(int(k), n_exact))
    dist = d2[order]
    if n_exact:
        # The head in ascending id order (ids are ascending): one forward
        # pass over the fc7 rows, as for the whole candidate set.
        head = np.sort(order[:n_exact])
        exact = candidate_sq_distances(fc7, ids[head], query_fc7)
        by_exact = rank_by_distance(ids[head], exact)
        order[:n_exact] = head[by_exact]
        dist[:n_exact] = exact[by_exact]
    if k is not None:
        order, dist = order[:max(int(k), 0)], dist[:max(int(k), 0)]
        n_exact = min(n_exact, len(order))
    return order, dist, n_exact
