#!/usr/bin/env python3
"""Stand-in for python/evaluate.py, used by bench_cifar_map.sh only when that
script is missing (and useful to cross-check it): the DLBHC CIFAR-10 protocol
on two feature stores made by extract.py.

- mAP@k (Hamming): rank the database by Hamming distance to the query code,
  ties broken by database order (a stable sort, as MATLAB's sort in the
  official precision.m); AP = sum over the relevant items in the top k of
  the precision at their rank, divided by the number of relevant items in
  the top k (the official code's definition; 0 when there is none).
- P@k: the fraction of relevant items in the top k.
- mAP over all: the usual AP over the whole Hamming ranking (all 5,000
  relevant items).
- coarse-to-fine: candidates = every database item within the Hamming
  distance of the k-th ranked one (so at least k), re-ranked by the L2
  distance of fc7; mAP@k and P@k of that ranking.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from dlbhc.store import FeatureStore  # noqa: E402


POP = np.array([bin(i).count('1') for i in range(256)], dtype=np.uint8)


def load(path, fc7=True):
    with FeatureStore.open(path) as s:
        codes, labels = s.codes(), s.labels()
        f = s.fc7(np.arange(s.count)) if fc7 else None
    return codes, labels, f


def evaluate(db, q, k=1000, chunk=200):
    dc, dl, df = load(db); qc, ql, qf = load(q)
    n, m = len(dc), len(qc)
    ap_k = np.zeros(m); ap_c2f = np.zeros(m); ap_all = np.zeros(m); p_k = np.zeros(m); p_c2f = np.zeros(m)
    ranks = np.arange(1, k + 1)
    dn2 = (df.astype(np.float64) ** 2).sum(1)
    for s in range(0, m, chunk):
        qq = qc[s:s + chunk]
        d = POP[dc[None, :, :] ^ qq[:, None, :]].sum(2, dtype=np.int32)  # (c, n)
        for j in range(len(qq)):
            i = s + j
            order = np.argsort(d[j], kind='stable')
            rel = (dl[order] == ql[i])
            top = rel[:k]
            if top.any():
                ap_k[i] = (np.cumsum(top) / ranks)[top].sum() / top.sum()
            p_k[i] = top.mean()
            # mAP over all: standard AP over the full ranking (ties by db order)
            hits = np.flatnonzero(rel)
            ap_all[i] = ((np.arange(1, len(hits) + 1)) / (hits + 1)).mean() if len(hits) else 0
            # coarse-to-fine: all items within the k-th item's distance, by fc7 L2
            radius = d[j][order[k - 1]]
            cand = np.flatnonzero(d[j] <= radius)
            l2 = dn2[cand] - 2 * df[cand] @ qf[i].astype(np.float64)
            o2 = cand[np.argsort(l2, kind='stable')[:k]]
            top2 = dl[o2] == ql[i]
            if top2.any():
                ap_c2f[i] = (np.cumsum(top2) / np.arange(1, len(top2) + 1))[top2].sum() / top2.sum()
            p_c2f[i] = top2.mean()
    return {"queries": m, "database": n, "k": k,
            "map_at_k_hamming": ap_k.mean(), "precision_at_k_hamming": p_k.mean(),
            "map_all_hamming": ap_all.mean(),
            "map_at_k_coarse_to_fine": ap_c2f.mean(), "precision_at_k_coarse_to_fine": p_c2f.mean()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("database"); p.add_argument("queries")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--out", help="write the figures as JSON here too")
    args = p.parse_args(argv)
    t = time.time()
    r = evaluate(args.database, args.queries, args.k)
    r["seconds"] = round(time.time() - t, 1)
    text = json.dumps(r, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
