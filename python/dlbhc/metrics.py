"""Retrieval evaluation: mAP@k, precision@k, precision within a Hamming
radius, precision-recall curves, plots and a text table.

The paper's protocol (CIFAR-10): the database is the 50,000 training images,
the queries the 10,000 test images, an image is relevant to a query when it
has the same label, and mAP is computed over the top k = 1000 results the
way the authors' analysis/precision.m does it (see average_precision_at_k).

Two rankings of the whole database are evaluated per query:

    coarse  Hamming distance only; equal distances keep database order (a
            stable sort, like MATLAB's sort in precision.m).
    fine    coarse-to-fine: the coarse candidates (every image within the
            smallest Hamming radius holding >= min_candidates images, exactly
            what index.HashIndex.coarse returns) re-ranked by fc7 Euclidean
            distance with ties by id, then every other image in coarse order,
            so the ranking is complete.  Distances are exact to float64
            (exact_sq_distances); index.HashIndex.search works in float32, so
            the two orders can differ only between candidates whose distances
            agree to ~1e-7 relative, which moves no figure beyond that.

Never imports caffe or the feature store: it works on arrays.
"""
import numpy as np

from .index import (default_min_candidates, hamming_matrix,
                    shell_radius, _assign_to_pivots, _check_codes, _choose_pivots,
                    _to_words)

# Queries evaluated together: the (batch, N) work arrays stay around this
# many elements (a few hundred MB at the peak for int64 rankings).
BATCH_ELEMENTS = 1 << 23
# Points of the precision-recall-by-rank curve (log- plus linear-spaced ranks).
PR_POINTS = 60


# ---- per-query measures (relevance given in ranked order) -------------------
def average_precision_at_k(relevant_ranked, k):
    """AP over the top k, as the official DLBHC code (analysis/precision.m):

        AP@k = sum_{j<=k, rel_j} P@j / (number of relevant items in the top k)

    and 0 when the top k holds no relevant item.  Note the normaliser: the
    relevant items *found* in the top k, not all relevant items.
    relevant_ranked: bool (N,) for one query (returns a float) or (Q, N)
    (returns (Q,) floats).
    """
    rel = np.asarray(relevant_ranked, dtype=bool)
    rel = rel[..., :int(k)]
    hits = np.cumsum(rel, axis=-1)
    ranks = np.arange(1, rel.shape[-1] + 1)
    summed = np.sum(np.where(rel, hits / ranks, 0.0), axis=-1)
    found = hits[..., -1] if rel.shape[-1] else np.zeros(rel.shape[:-1], dtype=np.int64)
    ap = np.where(found > 0, summed / np.maximum(found, 1), 0.0)
    return float(ap) if ap.ndim == 0 else ap


def average_precision(relevant_ranked, n_relevant=None):
    """Plain AP over a whole ranking: sum over relevant ranks j of P@j,
    divided by the number of relevant items in the database (n_relevant,
    default: those in the ranking, which is all of them for a complete
    ranking); 0 for a query with no relevant item."""
    rel = np.asarray(relevant_ranked, dtype=bool)
    hits = np.cumsum(rel, axis=-1)
    ranks = np.arange(1, rel.shape[-1] + 1)
    summed = np.sum(np.where(rel, hits / ranks, 0.0), axis=-1)
    total = rel.sum(axis=-1) if n_relevant is None else np.asarray(n_relevant)
    ap = np.where(total > 0, summed / np.maximum(total, 1), 0.0)
    return float(ap) if ap.ndim == 0 else ap


def precision_at_k(relevant_ranked, k):
    """Precision at every rank 1..k: (k,) for one query, (Q, k) for many."""
    rel = np.asarray(relevant_ranked, dtype=bool)[..., :int(k)]
    return np.cumsum(rel, axis=-1) / np.arange(1, rel.shape[-1] + 1)


def precision_within_radius(hamming, relevant, radius=2):
    """Precision of the images within Hamming distance `radius` of the query.

    hamming, relevant: (N,) or (Q, N) in any (the same) database order.  A
    query with no image within the radius counts as precision 0 (the common
    convention, e.g. in the CNNH and DPSH evaluations); it is not skipped.
    """
    inside = np.asarray(hamming) <= radius
    relevant = np.asarray(relevant, dtype=bool)
    retrieved = inside.sum(axis=-1)
    good = (inside & relevant).sum(axis=-1)
    p = np.where(retrieved > 0, good / np.maximum(retrieved, 1), 0.0)
    return float(p) if p.ndim == 0 else p


def pr_by_radius(hamming, relevant, bits):
    """Precision and recall of the Hamming ball, for every radius 0..bits.

    hamming, relevant: (Q, N).  Returns (precision, recall), each (Q, bits+1):
    precision 0 where the ball is empty (as precision_within_radius), recall
    0 for a query without relevant images.
    """
    hamming = np.atleast_2d(np.asarray(hamming))
    relevant = np.atleast_2d(np.asarray(relevant, dtype=bool))
    q = hamming.shape[0]
    n_r = int(bits) + 1
    flat = hamming.astype(np.int64) + n_r * np.arange(q)[:, None]
    retrieved = np.cumsum(np.bincount(flat.ravel(), minlength=q * n_r).reshape(q, n_r), axis=1)
    good = np.cumsum(np.bincount(flat[relevant], minlength=q * n_r).reshape(q, n_r), axis=1)
    n_rel = relevant.sum(axis=1)[:, None]
    precision = np.where(retrieved > 0, good / np.maximum(retrieved, 1), 0.0)
    recall = np.where(n_rel > 0, good / np.maximum(n_rel, 1), 0.0)
    return precision, recall


def pr_by_rank(relevant_ranked, ranks, n_relevant=None):
    """Precision and recall of the top-n results for each n in `ranks`
    (1-based).  relevant_ranked (Q, N); returns two (Q, len(ranks)) arrays,
    recall 0 for a query without relevant images."""
    rel = np.atleast_2d(np.asarray(relevant_ranked, dtype=bool))
    ranks = np.asarray(ranks, dtype=np.int64)
    hits = np.cumsum(rel, axis=1)[:, ranks - 1]
    total = rel.sum(axis=1) if n_relevant is None else np.asarray(n_relevant)
    total = total[:, None]
    return hits / ranks, np.where(total > 0, hits / np.maximum(total, 1), 0.0)


def rank_cutoffs(n, points=PR_POINTS):
    """Ranks at which a PR-by-rank curve is sampled: log-spaced (detail at the
    head of the ranking) plus linear-spaced (even recall steps), and n."""
    if n < 1:
        return np.empty(0, dtype=np.int64)
    both = np.concatenate([np.geomspace(1, n, points), np.linspace(1, n, points), [n]])
    return np.unique(np.clip(np.round(both), 1, n).astype(np.int64))


# ---- rankings ----------------------------------------------------------------
def coarse_ranking(db_codes, q_codes, bits=None):
    """(Q, N) int64: database ids by Hamming distance, ties in database order."""
    ham = hamming_matrix(db_codes, q_codes, bits)
    return np.argsort(ham, axis=1, kind="stable")


def fine_ranking(db_codes, q_codes, db_fc7, q_fc7, min_candidates, max_radius=None,
                 bits=None):
    """Coarse-to-fine rankings (Q, N) int64 and candidate counts (Q,).

    For each query the coarse candidates (images within the smallest radius
    holding >= min_candidates, capped at max_radius: the rule of
    index.HashIndex.coarse) come first, ordered by fc7 distance then id; all
    other images follow in coarse order.  All queries are ranked at once
    (Q x N arrays): evaluate() works through large query sets in batches.
    """
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    ham = hamming_matrix(db_codes, q_codes, bits)
    coarse = np.argsort(ham, axis=1, kind="stable")
    db_fc7 = np.asarray(db_fc7, dtype=np.float32)
    db_sq = _row_sq_norms(db_fc7)
    return _fine_batch(ham, coarse, db_fc7, db_sq, np.asarray(q_fc7, dtype=np.float32),
                       int(min_candidates), max_radius, bits)


def _row_sq_norms(x, chunk=4096):
    """Squared norms of the rows of x, in float64."""
    out = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), chunk):
        block = np.asarray(x[lo:lo + chunk], dtype=np.float64)
        out[lo:lo + chunk] = np.einsum("ij,ij->i", block, block)
    return out


def exact_sq_distances(rows, query):
    """Squared Euclidean distances in float64, row by row (difference, square,
    numpy's pairwise sum along the row): the same arithmetic for every row,
    so equal rows get equal distances.  The fine ranking's ordering key."""
    q = np.asarray(query, dtype=np.float64).ravel()
    diff = np.subtract(rows, q, dtype=np.float64)
    np.square(diff, out=diff)
    return diff.sum(axis=1)


def _tie_tolerance(dim, d2_max, q_sq, x_sq_max):
    """Twice a bound on |float64 GEMM-formula distance - exact_sq_distances|.

    exact_sq_distances rounds each difference and square (3u relative per
    term, u = float64 unit roundoff) and sums with numpy's pairwise sum (8
    accumulators over 128-value blocks, then halving: <= (19 + log2 D) u
    relative for non-negative terms), so it is within (24 + log2 D) u d2 of
    the true d2; ||x||^2 - 2 x.q + ||q||^2 in float64 is within about
    2 (D + 2) u (||x||^2 + ||q||^2) of it.  Two candidates whose formula
    distances differ by more than twice the sum cannot swap.
    """
    u = np.finfo(np.float64).eps / 2
    return 2.0 * ((24 + np.log2(max(dim, 2))) * u * d2_max
                  + 2 * (dim + 2) * u * (q_sq + x_sq_max))


def _rerank_exact(ids, approx, db_fc7, q, tol):
    """Order of candidates by (exact_sq_distances, id) from approximate
    distances within tol/2 of it: sort by the approximation, recompute every
    run of neighbours closer than tol (in practice: duplicated rows) and
    order those runs by the exact value.  Candidates further apart than tol
    cannot change order, so the result is the exact order, ties included."""
    order = np.lexsort((ids, approx))
    a = approx[order]
    close = np.diff(a) <= tol
    if not close.any():
        return order
    group = np.concatenate([[0], np.cumsum(~close)])
    in_multi = np.bincount(group)[group] > 1
    key = a.copy()
    key[in_multi] = exact_sq_distances(db_fc7[ids[order[in_multi]]], q)
    return order[np.lexsort((ids[order], key, group))]


def _fine_batch(ham, coarse, db_fc7, db_sq, q_fc7, need, max_radius, bits, block=2048):
    q, n = ham.shape
    n_r = bits + 1
    counts = np.bincount((ham.astype(np.int64) + n_r * np.arange(q)[:, None]).ravel(),
                         minlength=q * n_r).reshape(q, n_r)
    radius = shell_radius(np.cumsum(counts, axis=1), need, max_radius)
    n_cand = np.cumsum(counts, axis=1)[np.arange(q), radius]
    cands = [coarse[i, :n_cand[i]] for i in range(q)]
    # Distances of the batch's queries to the union of their candidates by
    # matrix products in float64 (accurate to ~1e-12, so only exact ties need
    # the row-wise recomputation); the union is small when the queries of a
    # batch have similar codes.
    union = np.unique(np.concatenate(cands)) if q else np.empty(0, np.int64)
    q64 = np.asarray(q_fc7, dtype=np.float64)
    q_sq = np.einsum("ij,ij->i", q64, q64)
    approx = np.empty((q, len(union)))
    for lo in range(0, len(union), block):
        part = union[lo:lo + block]
        rows = np.asarray(db_fc7[part], dtype=np.float64)
        approx[:, lo:lo + block] = db_sq[part][None, :] - 2.0 * (q64 @ rows.T)
    approx += q_sq[:, None]
    dim = q_fc7.shape[1]
    fine = coarse.copy()
    for i, cand in enumerate(cands):
        if not len(cand):
            continue
        pos = np.searchsorted(union, cand)
        a = approx[i, pos]
        tol = _tie_tolerance(dim, a.max(), q_sq[i], db_sq[cand].max())
        fine[i, :len(cand)] = cand[_rerank_exact(cand, a, db_fc7, q_fc7[i], tol)]
    return fine, n_cand


def _query_order(db_codes, q_codes, bits):
    """Queries sorted by their nearest pivot (index.py's choice: the most
    populated database codes, i.e. the modes of the code clusters), then by
    their distance to it."""
    words = _to_words(db_codes)
    order = np.lexsort(tuple(words[:, j] for j in range(words.shape[1] - 1, -1, -1)))
    ordered = words[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(ordered)))
    pivots = _choose_pivots(ordered[starts], sizes, bits)
    group, band = _assign_to_pivots(_to_words(q_codes), pivots, bits)
    return np.lexsort((band, group))


# ---- evaluation ----------------------------------------------------------------
class _Accumulator:
    """Sums of per-query figures for one ranking method."""

    def __init__(self, k, cutoffs):
        self.k = k
        self.cutoffs = cutoffs
        self.n = 0
        self.ap_k = 0.0
        self.ap = 0.0
        self.curve = np.zeros(k)
        self.pr_p = np.zeros(len(cutoffs))
        self.pr_r = np.zeros(len(cutoffs))

    def add(self, ranking, db_labels, q_labels, n_relevant):
        rel = db_labels[ranking] == q_labels[:, None]
        q = len(rel)
        hits = np.cumsum(rel, axis=1, dtype=np.int32)
        ranks = np.arange(1, rel.shape[1] + 1)
        # AP@k (precision.m) and AP over the whole ranking, from the
        # positions of the relevant items only.
        qi, j = np.nonzero(rel)
        prec = hits[qi, j] / (j + 1)
        top = j < self.k
        found = hits[:, self.k - 1]
        sum_k = np.bincount(qi[top], weights=prec[top], minlength=q)
        sum_all = np.bincount(qi, weights=prec, minlength=q)
        self.ap_k += float(np.where(found > 0, sum_k / np.maximum(found, 1), 0.0).sum())
        self.ap += float(np.where(n_relevant > 0, sum_all / np.maximum(n_relevant, 1), 0.0).sum())
        self.curve += (hits[:, :self.k] / ranks[:self.k]).sum(axis=0)
        at = hits[:, self.cutoffs - 1]
        self.pr_p += (at / self.cutoffs).sum(axis=0)
        self.pr_r += np.where(n_relevant[:, None] > 0,
                              at / np.maximum(n_relevant, 1)[:, None], 0.0).sum(axis=0)
        self.n += q

    def result(self):
        n = max(self.n, 1)
        curve = self.curve / n
        return {"map_at_k": self.ap_k / n, "map": self.ap / n,
                "precision_at_k": float(curve[-1]),
                "precision_curve": curve.tolist(),
                "pr_rank": {"rank": self.cutoffs.tolist(), "precision": (self.pr_p / n).tolist(),
                            "recall": (self.pr_r / n).tolist()}}


def evaluate(db_codes, db_labels, q_codes, q_labels, db_fc7=None, q_fc7=None, k=1000,
             bits=None, min_candidates=None, max_radius=None, batch_size=None,
             radius=2, progress=None):
    """All figures of the paper's protocol for one database / query set.

    db_codes (N, B), q_codes (Q, B): packed codes; db_labels (N,), q_labels
    (Q,): integer labels (relevant = same label).  With db_fc7 (N, D) and
    q_fc7 (Q, D) the coarse-to-fine ranking is evaluated too, with
    min_candidates (default index.default_min_candidates(k)) and max_radius.
    k is capped at N.  progress: an object with update(n) (e.g.
    dlbhc.progress.Progress), called per batch of queries.

    Returns a JSON-ready dict: n_database, n_queries, bits, k, and per method
    ("coarse", and "fine" with fc7) map_at_k, map, precision_at_k (P@k),
    precision_curve (P@1..k), pr_rank ({rank, precision, recall}); coarse
    adds precision_radius (within `radius`, default 2) and pr_radius
    ({radius, precision, recall} for radius 0..bits); fine adds
    min_candidates and mean/median candidate counts.
    """
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    q_codes = np.asarray(q_codes, dtype=np.uint8)
    if db_codes.ndim != 2 or q_codes.ndim != 2:
        raise ValueError("codes must be 2-D (N, bytes)")
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    _check_codes(db_codes, bits, "database codes")
    _check_codes(q_codes, bits, "query codes")
    db_labels = np.asarray(db_labels).ravel()
    q_labels = np.asarray(q_labels).ravel()
    n, nq = len(db_codes), len(q_codes)
    if len(db_labels) != n or len(q_labels) != nq:
        raise ValueError(f"labels ({len(db_labels)}, {len(q_labels)}) do not match the "
                         f"codes ({n}, {nq})")
    if n == 0 or nq == 0:
        raise ValueError("need at least one database image and one query")
    fine = db_fc7 is not None and q_fc7 is not None
    if fine:
        # float32 once (a float16 store would otherwise be converted per batch).
        db_fc7 = np.asarray(db_fc7, dtype=np.float32)
        q_fc7 = np.asarray(q_fc7, dtype=np.float32)
        if db_fc7.shape[0] != n or q_fc7.shape[0] != nq or db_fc7.shape[1:] != q_fc7.shape[1:]:
            raise ValueError(f"fc7 shapes {db_fc7.shape} and {q_fc7.shape} do not match "
                             f"{n} database images and {nq} queries")
    k = max(1, min(int(k), n))
    need = default_min_candidates(k) if min_candidates is None else int(min_candidates)
    r2 = min(int(radius), bits)
    if batch_size is None:
        batch_size = max(1, BATCH_ELEMENTS // n)

    cutoffs = rank_cutoffs(n)
    acc = {"coarse": _Accumulator(k, cutoffs)}
    if fine:
        acc["fine"] = _Accumulator(k, cutoffs)
        db_sq = _row_sq_norms(db_fc7)
    radius_p = np.zeros(bits + 1)
    radius_r = np.zeros(bits + 1)
    candidates = []
    # Queries grouped by the database's code clusters: a batch of similar
    # queries shares candidates, so the fine stage's matrix product covers
    # few database rows.  The sums below do not depend on the order.
    order = _query_order(db_codes, q_codes, bits) if fine else np.arange(nq)
    for lo in range(0, nq, batch_size):
        batch = order[lo:lo + batch_size]
        ham = hamming_matrix(db_codes, q_codes[batch], bits)
        coarse = np.argsort(ham, axis=1, kind="stable")
        labels = q_labels[batch]
        relevant_db = db_labels[None, :] == labels[:, None]
        n_relevant = relevant_db.sum(axis=1)
        acc["coarse"].add(coarse, db_labels, labels, n_relevant)
        p, r = pr_by_radius(ham, relevant_db, bits)
        radius_p += p.sum(axis=0)
        radius_r += r.sum(axis=0)
        del relevant_db
        if fine:
            ranking, n_cand = _fine_batch(ham, coarse, db_fc7, db_sq, q_fc7[batch], need,
                                          max_radius, bits)
            acc["fine"].add(ranking, db_labels, labels, n_relevant)
            candidates.append(n_cand)
        if progress is not None:
            progress.update(len(batch))

    results = {"n_database": n, "n_queries": nq, "bits": bits, "k": k}
    coarse = acc["coarse"].result()
    coarse["precision_radius"] = float(radius_p[r2] / nq)
    coarse["radius"] = r2
    coarse["pr_radius"] = {"radius": list(range(bits + 1)),
                           "precision": (radius_p / nq).tolist(),
                           "recall": (radius_r / nq).tolist()}
    results["coarse"] = coarse
    if fine:
        cand = np.concatenate(candidates)
        results["fine"] = dict(acc["fine"].result(), min_candidates=need,
                               max_radius=max_radius,
                               candidates_mean=float(cand.mean()),
                               candidates_median=float(np.median(cand)))
    return results


# ---- reporting -------------------------------------------------------------------
METHOD_NAMES = {"coarse": "coarse (Hamming)", "fine": "fine (Hamming + fc7)"}


def _as_runs(results):
    """evaluate() output, or a dict of label -> evaluate() output, as a list
    of (label, result)."""
    if "coarse" in results:
        return [(f"{results['bits']} bits", results)]
    return list(results.items())


def format_table(results):
    """A text table of the headline figures (one row per run and method)."""
    runs = _as_runs(results)
    header = (f"{'run':<14} {'method':<22} {'mAP@k':>7} {'mAP':>7} {'P@k':>7} "
              f"{'P(r<=R)':>7} {'k':>5} {'queries':>7} {'cand.':>7}")
    lines = [header, "-" * len(header)]
    for label, res in runs:
        for method in ("coarse", "fine"):
            if method not in res:
                continue
            m = res[method]
            pr = f"{m['precision_radius']:7.4f}" if "precision_radius" in m else f"{'':>7}"
            cand = f"{m['candidates_mean']:7.0f}" if "candidates_mean" in m else f"{'':>7}"
            lines.append(f"{label:<14} {METHOD_NAMES[method]:<22} {m['map_at_k']:7.4f} "
                         f"{m['map']:7.4f} {m['precision_at_k']:7.4f} {pr} {res['k']:>5} "
                         f"{res['n_queries']:>7} {cand}")
    radii = {res["coarse"].get("radius") for _, res in runs}
    lines.append(f"mAP@k: AP over the top k normalised by the relevant items found there "
                 f"(DLBHC precision.m); P(r<=R): precision within Hamming radius "
                 f"{'/'.join(str(r) for r in sorted(radii))}, 0 for an empty ball.")
    return "\n".join(lines)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, ax, xlabel, title, path):
    """The styling both plots share (precision on y), then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title)
    fig.savefig(path, format="png")
    return path


def plot_precision_at_k(results, path):
    """PNG of precision at rank 1..k for every run and method."""
    fig, ax = _figure()
    for label, res in _as_runs(results):
        for method in ("coarse", "fine"):
            if method in res:
                curve = res[method]["precision_curve"]
                ax.plot(np.arange(1, len(curve) + 1), curve,
                        label=f"{label}, {METHOD_NAMES[method]}")
    return _save(fig, ax, "number of top retrieved images (k)", "precision at k", path)


def plot_precision_recall(results, path):
    """PNG of precision-recall: by rank for every method (lines), and by
    Hamming radius for the coarse ranking (dots)."""
    fig, ax = _figure()
    for label, res in _as_runs(results):
        for method in ("coarse", "fine"):
            if method in res:
                pr = res[method]["pr_rank"]
                ax.plot(pr["recall"], pr["precision"], label=f"{label}, {METHOD_NAMES[method]}")
        pr = res["coarse"]["pr_radius"]
        ax.plot(pr["recall"], pr["precision"], linestyle=":", marker=".",
                label=f"{label}, Hamming radius 0..{res['bits']}")
    ax.set_xlim(0, 1.02)
    return _save(fig, ax, "recall", "precision-recall", path)
