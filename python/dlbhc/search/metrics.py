"""Retrieval evaluation: mAP@k, precision@k, precision within a Hamming
radius, precision-recall curves, plots and a text table.

The paper's protocol (CIFAR-10): the database is the 50,000 training images,
the queries the 10,000 test images, an image is relevant to a query when it
has the same label, and mAP is computed over the top k = 1000 results the
way the authors' analysis/precision.m does it (AP over the top k normalised
by the relevant items found there; reference.average_precision_at_k is the
per-query definition the batched sums here are tested against).

Two rankings of the whole database are evaluated per query:

    coarse  Hamming distance only; equal distances keep database order (a
            stable sort, like MATLAB's sort in precision.m).
    fine    coarse-to-fine: exactly what HashIndex.search returns to users
            (the coarse candidates, every image within the smallest Hamming
            radius holding >= min_candidates images, re-ranked by fc7
            distance with ties by id), followed by every other image in
            coarse order, so the ranking is complete.  The search is the
            index's own: the figures measure the search retrieve.py runs.

Never imports caffe or the feature store: it works on arrays (the fc7 rows
may be the store's memory map).
"""
import numpy as np

from .codes import check_codes, hamming_matrix
from .index import HashIndex
from .params import SearchParams, coarse_target
from .rerank import describe

# Queries evaluated together: the (batch, N) work arrays stay around this
# many elements (a few hundred MB at the peak for int64 rankings).
BATCH_ELEMENTS = 1 << 23
# The paper's cut-off: mAP@1000 and P@1000 (evaluate.py's --top-k default).
EVALUATION_TOP_K = 1000
# Points of the precision-recall-by-rank curve (log- plus linear-spaced ranks).
PR_POINTS = 60


# ---- measures over all radii and ranks -------------------------------------------
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


def rank_cutoffs(n, points=PR_POINTS):
    """Ranks at which a PR-by-rank curve is sampled: log-spaced (detail at the
    head of the ranking) plus linear-spaced (even recall steps), and n."""
    if n < 1:
        return np.empty(0, dtype=np.int64)
    both = np.concatenate([np.geomspace(1, n, points), np.linspace(1, n, points), [n]])
    return np.unique(np.clip(np.round(both), 1, n).astype(np.int64))



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


def evaluate(db_codes, db_labels, q_codes, q_labels, db_fc7=None, q_fc7=None, params=None,
             bits=None, batch_size=None, radius=2, progress=None, index=None, reduced=None,
             q_reduced=None, fine_stages=None):
    """All figures of the paper's protocol for one database / query set.

    db_codes (N, B), q_codes (Q, B): packed codes; db_labels (N,), q_labels
    (Q,): integer labels (relevant = same label).  With db_fc7 (N, D) (an
    array or the store's memory map) and q_fc7 (Q, D) the coarse-to-fine
    ranking is evaluated too, through HashIndex.search with params (a
    params.SearchParams, default SearchParams(top_k=EVALUATION_TOP_K):
    top_k is k, the cut-off of mAP@k and P@k, and the coarse stage gathers
    params.min_candidates within params.max_radius); `index` is
    the database's HashIndex when the caller has one (else it is built);
    `reduced` (rerank.ReducedRows, e.g. the database's PCA store) makes the
    fine stage rank by compressed rows, as HashIndex.search does with it
    (q_reduced: the queries' own rows when they are no projection, the
    latent).  fine_stages: {name: (reduced, q_reduced)} more fine stages
    measured through the same search (reduced None: fc7), the figures of
    each in results["fine_stages"][name].
    k is capped at N.  progress: an object with update(n) (e.g.
    dlbhc.progress.Progress), called per batch of queries.

    Returns a JSON-ready dict: n_database, n_queries, bits, k, and per method
    ("coarse", and "fine" with fc7) map_at_k, map, precision_at_k (P@k),
    precision_curve (P@1..k), pr_rank ({rank, precision, recall}); coarse
    adds precision_radius (within `radius`, default 2) and pr_radius
    ({radius, precision, recall} for radius 0..bits); fine adds
    min_candidates and mean/median candidate counts.
    """
    db_codes, db_labels, q_codes, q_labels, bits = _checked_inputs(
        db_codes, db_labels, q_codes, q_labels, bits)
    n, nq = len(db_codes), len(q_codes)
    fine = db_fc7 is not None and q_fc7 is not None
    if fine:
        q_fc7 = np.asarray(q_fc7, dtype=np.float32)
        if len(db_fc7) != n or len(q_fc7) != nq or tuple(db_fc7.shape[1:]) != q_fc7.shape[1:]:
            raise ValueError(f"fc7 shapes {tuple(db_fc7.shape)} and {q_fc7.shape} do not "
                             f"match {n} database images and {nq} queries")
        if index is None:
            index = HashIndex.build(db_codes, bits)
        elif index.count != n or index.bits != bits:
            raise ValueError(f"the index holds {index.count} {index.bits}-bit codes, the "
                             f"database {n} {bits}-bit ones")
    params = SearchParams(top_k=EVALUATION_TOP_K) if params is None else params
    if params.top_k is None:
        raise ValueError("the evaluation needs a cut-off k (params.top_k)")
    k = min(int(params.top_k), n)
    need = coarse_target(k, params.candidates)
    if batch_size is None:
        batch_size = max(1, BATCH_ELEMENTS // n)

    coarse = _CoarseFigures(k, rank_cutoffs(n), bits)
    stages = {"fine": (reduced, q_reduced), **(fine_stages or {})} if fine else {}
    figures = {name: _FineFigures(k, rank_cutoffs(n), index, db_fc7, need, params.max_radius,
                                  stage) for name, (stage, _) in stages.items()}
    for lo in range(0, nq, batch_size):
        batch = slice(lo, lo + batch_size)
        ham = hamming_matrix(db_codes, q_codes[batch], bits)
        ranking = np.argsort(ham, axis=1, kind="stable")
        labels = q_labels[batch]
        n_relevant = (db_labels[None, :] == labels[:, None]).sum(axis=1)
        coarse.add(ham, ranking, db_labels, labels, n_relevant)
        for name, (_, q_rows) in stages.items():
            figures[name].add(q_codes[batch], q_fc7[batch], ranking, db_labels, labels,
                              n_relevant, None if q_rows is None else q_rows[batch])
        if progress is not None:
            progress.update(len(labels))

    results = {"n_database": n, "n_queries": nq, "bits": bits, "k": k,
               "coarse": coarse.result(radius)}
    if fine:
        results["fine"] = figures.pop("fine").result()
    if figures:
        results["fine_stages"] = {name: f.result() for name, f in figures.items()}
    return results


def _checked_inputs(db_codes, db_labels, q_codes, q_labels, bits):
    """The codes and labels as arrays, or ValueError saying what does not fit."""
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    q_codes = np.asarray(q_codes, dtype=np.uint8)
    if db_codes.ndim != 2 or q_codes.ndim != 2:
        raise ValueError("codes must be 2-D (N, bytes)")
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    check_codes(db_codes, bits, "database codes")
    check_codes(q_codes, bits, "query codes")
    db_labels = np.asarray(db_labels).ravel()
    q_labels = np.asarray(q_labels).ravel()
    n, nq = len(db_codes), len(q_codes)
    if len(db_labels) != n or len(q_labels) != nq:
        raise ValueError(f"labels ({len(db_labels)}, {len(q_labels)}) do not match the "
                         f"codes ({n}, {nq})")
    if n == 0 or nq == 0:
        raise ValueError("need at least one database image and one query")
    return db_codes, db_labels, q_codes, q_labels, bits


class _CoarseFigures(_Accumulator):
    """The Hamming ranking's figures, plus precision and recall by radius."""

    def __init__(self, k, cutoffs, bits):
        super().__init__(k, cutoffs)
        self.bits = bits
        self.radius_p = np.zeros(bits + 1)
        self.radius_r = np.zeros(bits + 1)

    def add(self, ham, ranking, db_labels, q_labels, n_relevant):
        super().add(ranking, db_labels, q_labels, n_relevant)
        p, r = pr_by_radius(ham, db_labels[None, :] == q_labels[:, None], self.bits)
        self.radius_p += p.sum(axis=0)
        self.radius_r += r.sum(axis=0)

    def result(self, radius):
        nq = max(self.n, 1)
        r2 = min(int(radius), self.bits)
        return dict(super().result(), precision_radius=float(self.radius_p[r2] / nq),
                    radius=r2,
                    pr_radius={"radius": list(range(self.bits + 1)),
                               "precision": (self.radius_p / nq).tolist(),
                               "recall": (self.radius_r / nq).tolist()})


class _FineFigures(_Accumulator):
    """The coarse-to-fine ranking's figures: HashIndex.search's ranked
    candidates of each query, then the rest of the database in coarse order."""

    def __init__(self, k, cutoffs, index, db_fc7, min_candidates, max_radius, reduced=None):
        super().__init__(k, cutoffs)
        self.index = index
        self.db_fc7 = db_fc7
        self.min_candidates = min_candidates
        self.max_radius = max_radius
        self.reduced = reduced
        self.candidates = []

    def add(self, q_codes, q_fc7, coarse_ranking, db_labels, q_labels, n_relevant,
            q_reduced=None):
        found = self.index.search(q_codes, q_fc7, self.db_fc7, None,
                                  min_candidates=self.min_candidates,
                                  max_radius=self.max_radius, reduced=self.reduced,
                                  query_reduced=q_reduced)
        ranking = np.empty_like(coarse_ranking)
        member = np.zeros(coarse_ranking.shape[1], dtype=bool)
        for i, row in enumerate(coarse_ranking):
            cand = found.ids[i, :found.candidates[i]]
            member[cand] = True
            ranking[i, :len(cand)] = cand
            ranking[i, len(cand):] = row[~member[row]]
            member[cand] = False
        super().add(ranking, db_labels, q_labels, n_relevant)
        self.candidates.append(found.candidates)

    def result(self):
        cand = np.concatenate(self.candidates)
        return dict(super().result(), min_candidates=self.min_candidates,
                    max_radius=self.max_radius,
                    rerank=describe(self.reduced),
                    candidates_mean=float(cand.mean()),
                    candidates_median=float(np.median(cand)))


# ---- reporting -------------------------------------------------------------------
METHOD_NAMES = {"coarse": "coarse (Hamming)", "fine": "fine (Hamming + fc7)"}


def method_name(method, figures):
    """How a table or plot calls a method's figures ("fine (Hamming + pca256
    + fc7 top 200)" when a PCA store re-ranked)."""
    rerank = figures.get("rerank", "fc7")
    if method == "fine" and rerank != "fc7":
        return f"fine (Hamming + {rerank})"
    return METHOD_NAMES[method]


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
        rows = [(method_name(method, res[method]), res[method])
                for method in ("coarse", "fine") if method in res]
        rows += [(f"  also: {name}", m) for name, m in res.get("fine_stages", {}).items()]
        for name, m in rows:
            pr = f"{m['precision_radius']:7.4f}" if "precision_radius" in m else f"{'':>7}"
            cand = f"{m['candidates_mean']:7.0f}" if "candidates_mean" in m else f"{'':>7}"
            lines.append(f"{label:<14} {name:<22} {m['map_at_k']:7.4f} "
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
                        label=f"{label}, {method_name(method, res[method])}")
    return _save(fig, ax, "number of top retrieved images (k)", "precision at k", path)


def plot_precision_recall(results, path):
    """PNG of precision-recall: by rank for every method (lines), and by
    Hamming radius for the coarse ranking (dots)."""
    fig, ax = _figure()
    for label, res in _as_runs(results):
        for method in ("coarse", "fine"):
            if method in res:
                pr = res[method]["pr_rank"]
                ax.plot(pr["recall"], pr["precision"],
                        label=f"{label}, {method_name(method, res[method])}")
        pr = res["coarse"]["pr_radius"]
        ax.plot(pr["recall"], pr["precision"], linestyle=":", marker=".",
                label=f"{label}, Hamming radius 0..{res['bits']}")
    ax.set_xlim(0, 1.02)
    return _save(fig, ax, "recall", "precision-recall", path)
