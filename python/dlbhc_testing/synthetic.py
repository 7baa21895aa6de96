"""Seeded synthetic data for the tests and the benchmarks: hash codes that
cluster as a trained net's do, fc7 rows, and feature databases written with
the project's own store.  Every function takes its numpy Generator (or a
seed), so the same arguments give the same data in every process.

Two code models:

clustered_codes (tests): n codes around a few uniform random centres, each
bit flipped with a small probability; small and quick.

zipf_clustered_codes (benchmarks: search, scale, Milvus, serving): the
distribution the benchmarks time (images of one kind share nearly the same
code, and kinds are unequally common, so the buckets of identical codes are
very uneven):
  * `centres` cluster centres, uniform random codes (each bit 1 w.p. 1/2);
  * each image picks centre i (i = 1..C) with probability proportional to
    1 / i ** zipf (Zipf sizes: with C = 1000, s = 1 the largest cluster
    holds ~13% of the images, the smallest ~0.013%);
  * its code is the centre with f ~ Poisson(mean_flips) bit flips at
    uniformly random positions (drawn with replacement: a position drawn
    twice flips back), so many images of a cluster share its exact code
    (P(f = 0) = e^-3 ~ 5% at the default) and the rest spread over nearby
    codes;
  * queries are further draws from the same process, not in the database;
  * ids are in draw order, so a cluster's images are spread over the ids
    (a query's candidates are scattered rows of fc7.bin).

fc7 rows come from a fixed pool of FC7_POOL_ROWS random non-negative vectors
(fc7_pool; row i of a database = pool[i % FC7_POOL_ROWS]): their values
change no timing, and re-rank ties are common.  open_or_write_store writes
such a database with FeatureStore.create/append in batches of ~64 MB of fc7
(and reuses a complete one left by an earlier run).
"""
import shutil
import time
from pathlib import Path

import numpy as np

from dlbhc.errors import UserError
from dlbhc.progress import Progress
from dlbhc.search.codes import pack_codes
from dlbhc.store.database import FeatureStore

FC7_POOL_ROWS = 4096
# fc7 widths a benchmark database may get, widest first (fc7_dim_within)
FC7_DIMS = (4096, 2048, 1024, 512, 256, 128)
FC7_BUDGET_MB = 2600            # fc7 of a benchmark database fits this (the page cache)
# zipf_clustered_codes' defaults, the benchmarks' --centres, --zipf, --mean-flips
CENTRES = 1000
ZIPF = 1.0
MEAN_FLIPS = 3.0
STORE_BATCH_BYTES = 64 << 20    # fc7 bytes per FeatureStore.append when writing a store


# ---- codes ------------------------------------------------------------------------

def clustered_codes(rng, n, bits, n_centres=6, flip_p=0.08):
    """n codes around n_centres random centres, each bit flipped w.p. flip_p
    (hash codes cluster like this: images of one kind share nearly a code)."""
    centres = rng.random((n_centres, bits)) < 0.5
    latent = centres[rng.integers(0, n_centres, n)] ^ (rng.random((n, bits)) < flip_p)
    return pack_codes(latent.astype(np.float32))


def codes_from_ints(values, bits):
    """Codes whose bit j (0 = first) is bit (bits-1-j) of the integer."""
    latent = (np.asarray(values)[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return pack_codes(latent.astype(np.float32))


def zipf_clustered_codes(n, n_queries, bits, rng, centres=CENTRES, zipf=ZIPF,
                         mean_flips=MEAN_FLIPS):
    """(database codes (n, B), query codes (n_queries, B)) of Zipf-sized
    clusters (see the module docstring)."""
    centre_codes = np.packbits(rng.random((centres, bits)) < 0.5, axis=1)
    weights = 1.0 / np.arange(1, centres + 1) ** zipf
    total = n + n_queries
    cluster = rng.choice(centres, size=total, p=weights / weights.sum())
    codes = centre_codes[cluster]
    flips = rng.poisson(mean_flips, total)
    rows = np.repeat(np.arange(total), flips)
    pos = rng.integers(0, bits, len(rows))
    np.bitwise_xor.at(codes, (rows, pos // 8), (1 << (7 - pos % 8)).astype(np.uint8))
    return codes[:n], codes[n:]


def add_cluster_args(p):
    """zipf_clustered_codes' options, for every benchmark that uses it."""
    p.add_argument("--centres", type=int, default=CENTRES, help="cluster centres")
    p.add_argument("--zipf", type=float, default=ZIPF, help="Zipf exponent of cluster sizes")
    p.add_argument("--mean-flips", type=float, default=MEAN_FLIPS,
                   help="mean random bit flips from a code's centre")


# ---- fc7 and databases ---------------------------------------------------------------

def fc7_pool(dim, rng):
    """FC7_POOL_ROWS random non-negative fc7 rows of `dim` values (float32)."""
    return np.abs(rng.standard_normal((FC7_POOL_ROWS, dim))).astype(np.float32)


def fc7_dim_within(n, budget_mb=FC7_BUDGET_MB):
    """The widest of FC7_DIMS whose n float32 rows fit budget_mb (else the
    narrowest)."""
    for dim in FC7_DIMS:
        if n * dim * 4 <= budget_mb * 1e6:
            return dim
    return FC7_DIMS[-1]


def open_or_write_store(path, n, dim, bits, codes, pool, fc7_dtype="float32"):
    """(FeatureStore, seconds spent writing) of n images with fc7 rows
    pool[i % len(pool)], written with the store's own writer (reused, 0 s,
    when a previous run left it complete)."""
    path = Path(path)
    if path.exists():
        try:
            store = FeatureStore.open(path)
            if store.count == n and store.fc7_dim == dim and store.bits == bits \
                    and store.meta["fc7_dtype"] == fc7_dtype:
                return store, 0.0
            store.close()
        except UserError:
            pass
        shutil.rmtree(path)
    start = time.perf_counter()
    store = FeatureStore.create(path, {"bits": bits, "fc7_dim": dim, "fc7_dtype": fc7_dtype,
                                       "synthetic": True})
    # Large batches: one fc7 write + fsync and one LMDB transaction per batch.
    itemsize = np.dtype(fc7_dtype).itemsize
    batch = int(min(200_000, max(10_000, STORE_BATCH_BYTES // (itemsize * dim))))
    progress = Progress(n, label=f"writing fc7 store N={n} dim={dim}", interval=10)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        ids = np.arange(lo, hi)
        latent = np.unpackbits(codes[lo:hi], axis=1, count=bits).astype(np.float32)
        store.append(pool[ids % len(pool)], latent, codes[lo:hi],
                     [{"path": "", "label": -1, "seq": int(i)} for i in ids])
        progress.update(hi - lo)
    progress.close()
    store.close()
    return FeatureStore.open(path), time.perf_counter() - start

