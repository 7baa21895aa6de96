"""The fine stage chosen per model (issue 20): which rows re-rank the coarse
candidates best depends on the net (the small net's fc7 helps, a fine-tuned
backbone's fc7 can rank worse than the codes alone), so it is measured once
per trained model, on its held-out images, and recorded.

The candidates (stage_rows builds each as the search's rerank.ReducedRows):

    fc7         Euclidean distance of fc7 (the paper's fine stage)
    latent      Euclidean distance of the stored sigmoid activations
    asymmetric  Euclidean distance of the query's latent activations to
                each candidate's code bits (0/1): the query keeps its
                real values, the database only its codes (the asymmetric
                distance of Dong et al. 2008 and Gordo et al., PAMI 2014)
    pca         the database's PCA rows of fc7 (compress.py), the best
                rerank.DEFAULT_EXACT_TOP again by fc7
    none        Hamming order, ties broken by latent distance
and the fallback
    hamming     Hamming order, ties by id: exactly the coarse ranking

measure_fine_stages runs every candidate through metrics.evaluate, the
search users run: the held-out images query a sample of the training
images (the situation of use: unseen queries, a database the net was
trained on; on seven runs this chose as well or better than held-out
against held-out, docs/benchmarks.md), with k shrunk by the sample's
share of the whole (sampled_top_k: mAP@100 against 5,000 of CIFAR-10's
50,000 for mAP@1000 against all), or, without training images, the
held-out images split in two (queries: odd positions, database: even
positions; collection lists are grouped by class, so both halves hold
every class).  choose() applies the rule: the best candidate that does not
score below the coarse (Hamming) ranking, else "hamming", so the chosen
fine stage never scores below coarse where it was measured.  With fewer
than MIN_CHOICE_QUERIES queries the record keeps UNMEASURED_STAGE (marked
measured: false, with the scores beside).
The same rule picks among the stages a database offers (a "pca" choice
needs its PCA store) when a search opens it ("auto").

Pure numpy: the features come from the caller (training/ measures a new
model, nets/records.py keeps the record).
"""
import numpy as np

from .codes import code_bits
from .metrics import EVALUATION_TOP_K, evaluate
from .params import SearchParams
from .pca import Projection
from .rerank import DEFAULT_EXACT_TOP, ReducedRows

CANDIDATES = ("fc7", "latent", "asymmetric", "pca", "none")
# The stages that rank by the latent activations: the query's own, from
# its net, beside the database's stored ones.
LATENT_STAGES = ("latent", "asymmetric", "none")
# Equal scores go to the stage that stays closest to the codes' own order
# (a small held-out split ties often: 13 photos gave fc7 = latent = pca).
TIE_ORDER = ("none", "asymmetric", "latent", "pca", "fc7")
FALLBACK = "hamming"
STAGES = CANDIDATES + (FALLBACK,)
# The PCA candidate keeps this many components (fewer for narrower fc7).
PCA_CANDIDATE_DIM = 256
# Fewer held-out queries than this choose by noise (13 photos, 6 queries,
# picked fc7, which then scored below coarse on the full set: one query
# moves mAP by up to 0.08), so the record keeps UNMEASURED_STAGE instead.
MIN_CHOICE_QUERIES = 50
# The stage of a model that cannot measure its own (too few held-out
# queries, or no labels): the query's latent against the codes, above the
# Hamming order in every benchmark of docs/benchmarks.md (19 of 19:
# CIFAR-10, Fashion-MNIST, the photos; supervised and ITQ) and above the
# Hamming order with the latent as tie-break ("none", the stage before) in
# 13 of them: every backbone run and every ITQ case at 48 and 128 bits.
UNMEASURED_STAGE = "asymmetric"


def stage_rows(name, latent=None, projection=None, pca_rows=None, exact_top=DEFAULT_EXACT_TOP):
    """The rerank.ReducedRows of fine stage `name` (STAGES); None for fc7.
    latent: every image's latent rows (array or function ids -> rows);
    projection, pca_rows: a pca.Projection and the rows it gave."""
    if name == "fc7":
        return None
    if name == "latent":
        return ReducedRows(latent, None, 0, "latent")
    if name == "asymmetric":
        return ReducedRows(codes_of(latent), None, 0, "latent to codes")
    if name == "none":
        return ReducedRows(latent, None, 0, "latent tie-break", hamming_first=True)
    if name == FALLBACK:
        return ReducedRows(None, None, 0, "id tie-break", hamming_first=True)
    if name == "pca":
        return ReducedRows(pca_rows, projection.apply, int(exact_top), projection.name())
    raise ValueError(f"unknown fine stage {name!r}: one of {', '.join(STAGES)}")


def codes_of(latent):
    """Function ids -> the code bits (float32 0/1) of those rows of `latent`
    (an array or a function ids -> rows): gathered per query, so the
    database's code rows never take memory beside its latent rows."""
    if callable(latent):
        return lambda ids: code_bits(latent(ids))
    return lambda ids: code_bits(latent[ids])


def choose(scores, coarse, available=STAGES):
    """The fine stage to use: the best of `scores` ({name: mAP@k}) among
    `available` that scores at least `coarse`, else "hamming" (the coarse
    order itself).  Equal scores go to the earlier of TIE_ORDER."""
    good = [name for name in TIE_ORDER
            if name in available and name in scores and scores[name] >= coarse]
    if not good:
        return FALLBACK
    return max(good, key=lambda name: (scores[name], -TIE_ORDER.index(name)))


def split_halves(n):
    """(query positions, database positions) of n held-out images: odd and
    even positions."""
    if n < 4:
        raise ValueError(f"{n} held-out images: measuring the fine stages needs at least 4")
    positions = np.arange(n)
    return positions[1::2], positions[0::2]


def sampled_top_k(top_k, sample, whole):
    """The k that ranks a database sample of `sample` images as `top_k`
    ranks the `whole` database it was drawn from: k times the sample's
    share, at least 1. Then the top k holds the same share of each class's
    images, and the coarse candidates (2 k) the same share of the database,
    as on the whole. At k = 1000 against a 5,000 sample of CIFAR-10's
    50,000 the candidates were 40% of the sample, fc7 re-ranked other
    classes into the top k, and the choice (asymmetric: fc7 0.768 against
    0.870) was the weakest fine stage on the whole database (0.8614
    against latent's 0.8665); mAP@100 chose latent on two seeded samples
    (docs/benchmarks.md)."""
    if whole is None or whole <= sample:
        return int(top_k)
    return max(1, int(round(top_k * sample / whole)))


def measure_fine_stages(codes, labels, fc7, latent, bits, top_k=EVALUATION_TOP_K,
                        progress=None, database=None, database_size=None):
    """Every candidate's mAP@k on held-out images (codes (N, B) packed,
    labels (N,), fc7 (N, D), latent (N, bits)), and the choice: the record
    nets.records writes (choice, coarse, map_at_k per candidate, k, queries,
    database, pca_dim, split).

    database: (codes, labels, fc7, latent) of training images: then every
    held-out image queries them, as a user's queries meet a database the net
    was trained on (its codes are surer of themselves than unseen images').
    database_size: how many training images that sample was drawn from;
    the scores are then mAP@sampled_top_k, standing for mAP@top_k against
    them all. Without `database` the held-out images split in two
    (split_halves)."""
    def arrays(codes, labels, fc7, latent):
        return (np.asarray(codes), np.asarray(labels), np.asarray(fc7, dtype=np.float32),
                np.asarray(latent, dtype=np.float32))
    held = arrays(codes, labels, fc7, latent)
    if database is None:
        q_pos, db_pos = split_halves(len(held[0]))
        queries, base = (tuple(a[q_pos] for a in held), tuple(a[db_pos] for a in held))
        split = "held-out images: odd positions query the even positions"
    else:
        queries, base = held, arrays(*database)
        split = f"every held-out image queries {len(base[0])} training images"
        if database_size:
            top_k = sampled_top_k(top_k, len(base[0]), database_size)
            split += f" of {database_size}, at k = {top_k}"
    (q_codes, q_labels, q_fc7, q_latent), (db_codes, db_labels, db_fc7, db_latent) = queries, base
    pca_dim = int(min(PCA_CANDIDATE_DIM, max(1, db_fc7.shape[1] // 2)))
    projection = Projection.learn(db_fc7, pca_dim)
    pca_rows = projection.apply(db_fc7)
    stages = {name: (stage_rows(name, db_latent, projection, pca_rows),
                     q_latent if name in LATENT_STAGES else None)
              for name in CANDIDATES if name != "fc7"}
    params = SearchParams(top_k=min(int(top_k), len(db_codes)))
    results = evaluate(db_codes, db_labels, q_codes, q_labels, db_fc7=db_fc7,
                       q_fc7=q_fc7, params=params, bits=bits, progress=progress,
                       fine_stages=stages)
    scores = {"fc7": results["fine"]["map_at_k"]}
    scores.update({name: m["map_at_k"] for name, m in results["fine_stages"].items()})
    coarse = results["coarse"]["map_at_k"]
    n_queries = len(q_codes)
    record = {"coarse": coarse, "map_at_k": scores, "k": results["k"], "queries": n_queries,
              "database": len(db_codes), "pca_dim": pca_dim, "split": split,
              "database_size": int(database_size or len(db_codes))}
    if n_queries >= MIN_CHOICE_QUERIES:
        return dict(record, choice=choose(scores, coarse))
    return dict(record, choice=UNMEASURED_STAGE, measured=False, reason=(
        f"{n_queries} held-out queries are too few to choose by (at least "
        f"{MIN_CHOICE_QUERIES}): the query's latent against the codes, at or above the "
        "Hamming order in every benchmark"))
