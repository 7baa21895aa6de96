"""Shard databases joined into one, in input order.

extract.py --shard i/n and the Ray job (scale.ray_extract) each write shard
databases; merge() appends their records to one database ordered by each
record's position in the full input list (`seq`), so the result equals a
single run over the same inputs.
"""
from pathlib import Path

import numpy as np

from ..files import database_backend
from .backends import DEFAULT_BACKEND
from .database import FeatureStore, check_compatible


def merge(shard_paths, out_path, backend=DEFAULT_BACKEND, batch=256, append=False):
    """Join shard databases (extract.py --shard i/n, or the shards of a Ray
    extraction) into one.

    Records are ordered by their position in the full input list (`seq`),
    so merged shards equal a single run over the same inputs.  With
    append=True `out_path` may already exist (same model): the records whose
    path it holds are left out and the rest appended, so a merge cut short
    by a crash (each batch is one transaction) is finished by running it
    again.  Returns the number of records written.
    """
    shards = [FeatureStore.open(p) for p in shard_paths]
    out = None
    try:
        base = shards[0].meta
        for s in shards[1:]:
            check_compatible(base, s.meta, what=f"shard {s.path}")
        existing = database_backend(out_path) if Path(out_path).exists() else None
        if append and existing is not None:
            out = FeatureStore.open(out_path, readonly=False)
            check_compatible(out.meta, base, what=f"shard {shards[0].path}")
            have = out.stored_paths() if out.count else set()
        else:
            # A shard's PCA store stays behind (its files are the shard's): the
            # merged database gets one with compress.py (--projection
            # SHARD/pca-*.npz keeps the shards' projection).
            meta = {k: v for k, v in base.items()
                    if k not in ("count", "created", "schema_version", "backend", "shard", "pca")}
            out = FeatureStore.create(out_path, meta, backend=backend)
            have = set()
        entries = []
        for si, s in enumerate(shards):
            for i, info in enumerate(s.infos()):
                if info["path"] not in have:
                    entries.append((info.get("seq", 0), info["path"], si, i))
        entries.sort()
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]
            # one read per shard and table, then back into seq order
            parts = {}
            for si in sorted({e[2] for e in chunk}):
                pos = [j for j, e in enumerate(chunk) if e[2] == si]
                ids = [chunk[j][3] for j in pos]
                s = shards[si]
                parts[si] = (pos, s.fc7(ids), s.latent(ids), s.code_rows(ids), s.infos(ids))
            order = np.concatenate([p[0] for p in parts.values()])
            back = np.argsort(order)
            fc7, latent, codes = (np.concatenate([p[k] for p in parts.values()])[back]
                                  for k in (1, 2, 3))
            infos = [info for p in parts.values() for info in p[4]]
            out.append(fc7, latent, codes, [infos[j] for j in back])
        return len(entries)
    finally:
        if out is not None:
            out.close()
        for s in shards:
            s.close()
