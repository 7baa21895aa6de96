"""Slow, plainly written truths that the fast paths are tested against.

For tests and benchmarks only: no production module imports this one (a
test checks that).  Everything here follows the documented rules the
straightforward way, query by query, over every database image:

    naive_hamming         bit by bit, from unpacked bits
    reference_coarse      the coarse stage's rule (smallest radius holding
                          >= min_candidates images, capped at max_radius)
    brute_force_search    coarse-to-fine by exhaustive Hamming + re-rank
                          (by fc7, or by compressed rows such as the PCA
                          store's, optionally the top part again by fc7)
    coarse_ranking        the evaluation's Hamming ranking of the database
    fine_ranking          the evaluation's coarse-to-fine ranking
    exact_sq_distances    float64 distances, to bound the float32 ones
    average_precision_at_k, average_precision, precision_at_k,
    precision_within_radius
                          per-query measures of the paper's protocol, as
                          the authors' analysis/precision.m computes them
    brute_force_pairs     every pair of images within a Hamming radius and
                          (optionally) a unit-length feature distance
    brute_force_groups    connected components of pairs, by depth-first walk

The fine orderings use rerank.fc7_sq_distances, the distance whose exact
ties the fast path orders by id: what is checked is which candidates are
ranked and in what order, not the float arithmetic itself.
"""
import numpy as np

from dlbhc.search.results import SearchResults
from dlbhc.search.rerank import fc7_sq_distances


# ---- codes and coarse stage ----------------------------------------------------
def naive_hamming(codes, query, bits):
    """Hamming distances of codes (N, B) to one query code, counted bit by
    bit on the unpacked codes."""
    a = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=bits)
    b = np.unpackbits(np.asarray(query, dtype=np.uint8)[None, :], axis=1, count=bits)
    return (a != b).sum(axis=1)


def reference_coarse(codes, query, bits, min_candidates, max_radius=None):
    """The coarse rule over all codes: (ids, Hamming distances, radius),
    ids ordered by (distance, id)."""
    d = naive_hamming(codes, query, bits)
    limit = bits if max_radius is None else min(max_radius, bits)
    radius = limit
    for r in range(limit + 1):
        if (d <= r).sum() >= min_candidates:
            radius = r
            break
    ids = np.flatnonzero(d <= radius)
    ids = ids[np.lexsort((ids, d[ids]))]
    return ids, d[ids], radius


def brute_force_search(codes, fc7_all, query_codes, query_fc7, k, max_radius=None, bits=None,
                       reduced_rows=None, query_reduced=None, exact_top=0,
                       hamming_first=False):
    """Exhaustive Hamming over all N codes, keep those within max_radius
    (all when None), rank them by fc7 distance with ties by id.  Returns
    SearchResults like HashIndex.search; radius is max_radius, or the
    farthest code's distance when None.

    With reduced_rows (N, d) and query_reduced (Q, d) (e.g. the PCA store's
    rows and the queries' projections) they are ranked by the distance
    between those instead, ties by id; then, with exact_top = E, the first E
    of that ranking are put in (fc7 distance, id) order.  hamming_first:
    ranked by (Hamming distance, reduced-row distance, id) instead (the
    "none" fine stage; without reduced_rows, by (Hamming distance, id)),
    none of them by fc7 (exact 0)."""
    codes = np.asarray(codes, dtype=np.uint8)
    bits = 8 * codes.shape[1] if bits is None else int(bits)
    query_codes = np.atleast_2d(np.asarray(query_codes, dtype=np.uint8))
    query_fc7 = np.atleast_2d(query_fc7)
    out = SearchResults.empty(len(query_codes), int(k))
    for i, (code, q_fc7) in enumerate(zip(query_codes, query_fc7)):
        ham = naive_hamming(codes, code, bits).astype(np.int32)
        ids = np.arange(len(codes), dtype=np.int64)
        if max_radius is not None:
            keep = ham <= int(max_radius)
            ids, ham = ids[keep], ham[keep]
        if hamming_first:
            d2 = (np.zeros(len(ids), np.float32) if reduced_rows is None else
                  fc7_sq_distances(np.asarray(reduced_rows)[ids],
                                   np.atleast_2d(query_reduced)[i]))
            ranked = np.lexsort((ids, d2, ham))
            n_exact = 0
        elif reduced_rows is None:
            d2 = fc7_sq_distances(np.asarray(fc7_all)[ids], q_fc7)
            ranked = np.lexsort((ids, d2))
            n_exact = len(ranked)
        else:
            d2 = fc7_sq_distances(np.asarray(reduced_rows)[ids], np.atleast_2d(query_reduced)[i])
            ranked = np.lexsort((ids, d2))
            n_exact = min(int(exact_top), len(ranked))
            head = ranked[:n_exact].copy()
            e2 = fc7_sq_distances(np.asarray(fc7_all)[ids[head]], q_fc7)
            ranked[:n_exact] = head[np.lexsort((ids[head], e2))]
            d2 = d2.copy()
            d2[head] = e2
        top = ranked[:int(k)]
        n = len(top)
        out.ids[i, :n], out.hamming[i, :n] = ids[top], ham[top]
        out.l2[i, :n] = np.sqrt(d2[top].astype(np.float64))
        out.candidates[i] = len(ids)
        out.radius[i] = (int(max_radius) if max_radius is not None
                         else int(ham.max()) if len(ham) else 0)
        out.exact[i] = min(n_exact, n)
    return out


def exact_sq_distances(rows, query):
    """Squared Euclidean distances in float64, row by row (difference,
    square, sum along the row)."""
    q = np.asarray(query, dtype=np.float64).ravel()
    diff = np.subtract(rows, q, dtype=np.float64)
    np.square(diff, out=diff)
    return diff.sum(axis=1)


# ---- rankings of the whole database ------------------------------------------------
def coarse_ranking(db_codes, q_codes, bits):
    """(Q, N) database ids by Hamming distance, equal distances in database
    order (MATLAB's stable sort in precision.m)."""
    return np.stack([np.argsort(naive_hamming(db_codes, q, bits), kind="stable")
                     for q in np.asarray(q_codes, dtype=np.uint8)])


def fine_ranking(db_codes, q_codes, db_fc7, q_fc7, min_candidates, max_radius=None,
                 bits=None):
    """Coarse-to-fine rankings (Q, N) and candidate counts (Q,): the coarse
    candidates of each query (reference_coarse) ordered by (fc7 distance,
    id), then every other image in coarse_ranking order."""
    db_codes = np.asarray(db_codes, dtype=np.uint8)
    bits = 8 * db_codes.shape[1] if bits is None else int(bits)
    coarse = coarse_ranking(db_codes, q_codes, bits)
    rankings, counts = [], []
    for i, code in enumerate(np.asarray(q_codes, dtype=np.uint8)):
        cand, _, _ = reference_coarse(db_codes, code, bits, min_candidates, max_radius)
        cand = np.sort(cand)
        d2 = fc7_sq_distances(np.asarray(db_fc7)[cand], q_fc7[i])
        first = cand[np.lexsort((cand, d2))]
        rest = coarse[i][~np.isin(coarse[i], cand)]
        rankings.append(np.concatenate([first, rest]))
        counts.append(len(cand))
    return np.stack(rankings), np.array(counts)


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


# ---- EfficientNet-Lite forward -------------------------------------------------
# An independent statement of the network the converted Caffe nets must
# compute, written from the published architecture (EfficientNet-B0's
# stages; Lite: no squeeze-excitation, ReLU6, stem and head not scaled) and
# TensorFlow's SAME padding rule, straight on the PyTorch state dict in
# float64. It shares nothing with prototxt/generate.py or backbones.py.

# (repeats, kernel, stride, expand ratio, output channels) per stage
EFFICIENTNET_LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40),
                             (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192),
                             (1, 3, 1, 6, 320)]


def tf_same_padding(size, kernel, stride):
    """TensorFlow's SAME: output ceil(size / stride); the total padding split
    with the smaller half before (asymmetric when it is odd)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d_same(x, w, stride=1, groups=1):
    """x (N, C, H, W), w (O, C/groups, k, k), TF SAME padding, no bias."""
    n, c, h, wd = x.shape
    out_c, c_per_group, k, _ = w.shape
    (top, bottom), (left, right) = (tf_same_padding(h, k, stride),
                                    tf_same_padding(wd, k, stride))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh, ow = -(-h // stride), -(-wd // stride)
    # windows[n, c, i, j, oh, ow] = xp[n, c, i + s*oh, j + s*ow]
    windows = np.stack([np.stack([xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                                  for j in range(k)], axis=2) for i in range(k)], axis=2)
    out_per_group = out_c // groups
    outs = []
    for g in range(groups):
        xs = windows[:, g * c_per_group:(g + 1) * c_per_group]
        ws = w[g * out_per_group:(g + 1) * out_per_group]
        outs.append(np.einsum("ncijhw,ocij->nohw", xs, ws, optimize=True))
    return np.concatenate(outs, axis=1)


def depthwise_same(x, w, stride=1):
    """Depthwise (one filter per channel) convolution, TF SAME padding."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    (top, bottom), (left, right) = (tf_same_padding(h, k, stride),
                                    tf_same_padding(wd, k, stride))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh, ow = -(-h // stride), -(-wd // stride)
    out = np.zeros((n, c, oh, ow))
    for i in range(k):
        for j in range(k):
            out += xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] \
                * w[None, :, 0, i, j, None, None]
    return out


def batch_norm(x, state, prefix, eps=1e-3):
    g = lambda name: state[f"{prefix}.{name}"].astype(np.float64)[None, :, None, None]
    return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def efficientnet_lite_forward(state, x, stages=EFFICIENTNET_LITE0_STAGES):
    """Forward of EfficientNet-Lite on the normalised input x (N, 3, H, W),
    RGB, as the PyTorch port computes it. Returns {"stem", "block<i>" (each
    block's output), "head" (after the head's ReLU6), "pool" (global average,
    (N, 1280)), "logits" (N, 1000)}, float64."""
    w = lambda name: state[name].astype(np.float64)
    blobs = {}
    h = relu6(batch_norm(conv2d_same(x.astype(np.float64), w("_conv_stem.weight"), 2),
                         state, "_bn0"))
    blobs["stem"] = h
    block = 0
    for repeats, _kernel, stride, expand, _out in stages:
        for r in range(repeats):
            p = f"_blocks.{block}"
            s = stride if r == 0 else 1
            inp = h
            if expand != 1:
                h = relu6(batch_norm(conv2d_same(h, w(f"{p}._expand_conv.weight")), state,
                                     f"{p}._bn0"))
            h = relu6(batch_norm(depthwise_same(h, w(f"{p}._depthwise_conv.weight"), s),
                                 state, f"{p}._bn1"))
            h = batch_norm(conv2d_same(h, w(f"{p}._project_conv.weight")), state, f"{p}._bn2")
            if s == 1 and inp.shape == h.shape:
                h = h + inp
            blobs[f"block{block}"] = h
            block += 1
    h = relu6(batch_norm(conv2d_same(h, w("_conv_head.weight")), state, "_bn1"))
    blobs["head"] = h
    blobs["pool"] = h.mean(axis=(2, 3))
    blobs["logits"] = blobs["pool"] @ w("_fc.weight").T + w("_fc.bias")
    return blobs


# ---- near-duplicates ------------------------------------------------------------
def brute_force_pairs(codes, bits, radius, rows=None, threshold=None, ids=None, near=0.0,
                      ratio=1.0, k=0):
    """{(i, j): (hamming, distance or None)} for every pair i < j of `ids`
    (default: all) within `radius`, and with `rows`, whose unit-length rows
    pass pairs.close_pairs' rule (float64): distance <= near, or <= threshold
    and <= ratio x min(scale(i), scale(j)), where an image's scale is the
    distance to its k-th nearest image within the radius, capped at
    threshold / ratio (k = 0: no scale)."""
    ids = np.arange(len(codes)) if ids is None else np.sort(np.asarray(ids))
    within = {}
    for i in ids:
        ham = naive_hamming(codes[ids], codes[i], bits)
        for y in np.flatnonzero(ham <= radius):
            if ids[y] != i:
                within[(int(i), int(ids[y]))] = int(ham[y])
    if rows is None:
        return {(i, j): (h, None) for (i, j), h in within.items() if i < j}

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / (np.linalg.norm(x) or 1)

    dist = {key: float(np.linalg.norm(unit(rows[key[0]]) - unit(rows[key[1]])))
            for key in within}
    cap = threshold / ratio if k and ratio < 1 else threshold
    scale = {}
    for i in ids:
        mine = sorted(d for (a, _), d in dist.items() if a == i)
        scale[int(i)] = min(mine[k - 1], cap) if k and len(mine) >= k else cap
    found = {}
    for (i, j), h in within.items():
        d = dist[(i, j)]
        local = d <= threshold and (not k or ratio >= 1 or d <= ratio * min(scale[i], scale[j]))
        if i < j and (d <= near or local):
            found[(i, j)] = (h, d)
    return found


def brute_force_groups(pairs, min_size=2):
    """Connected components (sorted id lists) of the graph of `pairs`
    (iterable of (i, j)), at least min_size ids each, as a set of tuples."""
    neighbours = {}
    for i, j in pairs:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    seen, out = set(), set()
    for start in neighbours:
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            node = stack.pop()
            group.append(node)
            for nxt in neighbours[node] - seen:
                seen.add(nxt)
                stack.append(nxt)
        if len(group) >= min_size:
            out.add(tuple(sorted(group)))
    return out
