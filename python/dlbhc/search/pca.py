"""The compressed re-rank features: a PCA projection of fc7 (Babenko et al.,
"Neural Codes for Image Retrieval", ECCV 2014: PCA-compressed CNN features
re-rank almost as well as the full ones).

A Projection is learned once, on a sample of a database's fc7 rows
(Projection.learn), saved as a small .npz file (Projection.save / load), and
from then on applied unchanged to every row the database gets and to every
query (Projection.apply).  The store keeps the projected rows in a flat file
beside fc7.bin (store.py); the fine stage ranks by distances between them
(rerank.py).

Why apply() is not one matrix product: a BLAS matrix product (sgemm) sums in
an order that depends on how many rows are multiplied together (a single row
goes through sgemv; edge tiles differ), so the same fc7 row projected alone,
in a commit batch or in the full-database pass would get slightly different
values, and an image used as its own query would not be at distance 0.
apply() computes every output value as one dot product of a whole
(centred) row with one component (numpy.vecdot, one BLAS sdot call per
value, as rerank.fc7_sq_distances does), so a row's projection depends on
that row alone.  It costs ~2.5x a matrix product, once per row.

Pure numpy: knows nothing of the store, codes or Caffe.
"""
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_write

FORMAT_VERSION = 1
# Default number of fc7 rows the projection is learned on (fewer when the
# database is smaller): 50,000 rows estimate a 4096 x 4096 covariance well
# enough for the leading few hundred components and take ~1 minute on 2 cores.
DEFAULT_SAMPLE = 50_000
# Whitening divides by sqrt(eigenvalue + WHITEN_EPS * largest eigenvalue): the
# regulariser keeps near-empty directions (dead ReLU units give eigenvalue 0)
# from being blown up into noise.
WHITEN_EPS = 1e-4
# Rows projected per block by apply() (bounds its work memory).
APPLY_BLOCK_ROWS = 4096


class Projection:
    """x -> ((x - mean) . components_j) * scale_j for j < dim, in float32.

        mean        (D,) float32   mean of the sample's fc7 rows
        components  (dim, D) float32  leading eigenvectors of their covariance,
                                   by decreasing eigenvalue (sign: largest
                                   |value| positive, so learning is repeatable)
        scale       (dim,) float32 1 (plain PCA) or 1/sqrt(eigenvalue + eps)
                                   (whitened)
        eigenvalues (dim,) float64 variance along each component
        info        dict: whiten, sample (rows learned on), explained
                    (fraction of the sample's variance kept), model (the
                    database's model record: which net made the features)
    """

    def __init__(self, mean, components, scale, eigenvalues, info):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.info = dict(info)
        if self.components.ndim != 2 or self.components.shape[1] != self.mean.shape[0] \
                or self.scale.shape != (self.components.shape[0],):
            raise ValueError(f"inconsistent projection: mean {self.mean.shape}, components "
                             f"{self.components.shape}, scale {self.scale.shape}")

    @property
    def dim(self):
        return self.components.shape[0]

    @property
    def fc7_dim(self):
        return self.mean.shape[0]

    @property
    def whiten(self):
        return bool(self.info.get("whiten"))

    def name(self):
        """pca256 or pca256w (whitened): how tables and options call it."""
        return f"pca{self.dim}{'w' if self.whiten else ''}"

    # ---- learning ----------------------------------------------------------
    @classmethod
    def learn(cls, sample, dim, whiten=False, model=None):
        """PCA of the rows of `sample` (S, D), keeping `dim` components."""
        sample = np.asarray(sample)
        if sample.ndim != 2 or len(sample) < 2:
            raise UserError(f"PCA needs at least 2 fc7 rows, got {sample.shape[0] if sample.ndim else 0}")
        n, d = sample.shape
        if not 1 <= dim <= d:
            raise UserError(f"--pca {dim}: the features have {d} values, choose 1..{d}")
        mean = sample.mean(axis=0, dtype=np.float64)
        # Covariance through one float32 matrix product of the centred sample
        # (the expensive part, S x D x D), eigen-decomposed in float64.
        centred = np.subtract(sample, mean.astype(np.float32), dtype=np.float32)
        cov = (centred.T @ centred).astype(np.float64) / (n - 1)
        all_values, vectors = np.linalg.eigh(cov)
        total = float(np.maximum(all_values, 0.0).sum())
        order = np.argsort(all_values)[::-1][:dim]
        values = np.maximum(all_values[order], 0.0)
        components = vectors[:, order].T
        signs = np.sign(components[np.arange(dim), np.argmax(np.abs(components), axis=1)])
        components *= np.where(signs == 0, 1.0, signs)[:, None]
        if whiten:
            scale = 1.0 / np.sqrt(values + WHITEN_EPS * max(float(values[0]), 1e-30))
        else:
            scale = np.ones(dim)
        info = {"whiten": bool(whiten), "sample": int(n),
                "explained": float(values.sum() / total) if total > 0 else 1.0,
                "model": model or {}}
        return cls(mean, components, scale, values, info)

    # ---- applying ----------------------------------------------------------
    def apply(self, rows, out=None):
        """Projected rows (M, dim) float32 of fc7 rows (M, D) (float16 rows
        are widened first).  Each value depends only on its own row (see the
        module docstring), so a row projected alone, in a batch or from a
        memory map gives the same bits."""
        if not hasattr(rows, "shape"):
            rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.fc7_dim:
            raise ValueError(f"rows {tuple(rows.shape)} do not match the projection's "
                             f"{self.fc7_dim} input values")
        m = rows.shape[0]
        if out is None:
            out = np.empty((m, self.dim), dtype=np.float32)
        buf = np.empty((min(m, APPLY_BLOCK_ROWS), self.fc7_dim), dtype=np.float32)
        comps = self.components[None, :, :]
        for lo in range(0, m, APPLY_BLOCK_ROWS):
            hi = min(m, lo + APPLY_BLOCK_ROWS)
            centred = buf[:hi - lo]
            np.subtract(rows[lo:hi], self.mean, out=centred, dtype=np.float32)
            np.vecdot(centred[:, None, :], comps, out=out[lo:hi])
            out[lo:hi] *= self.scale
        return out

    # ---- the file -----------------------------------------------------------
    def to_bytes(self):
        """The .npz file's bytes (deterministic: the same projection gives the
        same bytes, so its digest names it)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, arr in (("format_version", np.array(FORMAT_VERSION)),
                              ("mean", self.mean), ("components", self.components),
                              ("scale", self.scale), ("eigenvalues", self.eigenvalues),
                              ("info", np.array(_json(self.info)))):
                item = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(item, "w") as f:
                    np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
        return buf.getvalue()

    def digest(self):
        return hashlib.sha1(self.to_bytes()).hexdigest()

    def save(self, path):
        """Write the projection atomically; returns its sha1."""
        data = self.to_bytes()
        atomic_write(path, lambda f: f.write(data), fsync=True)
        return hashlib.sha1(data).hexdigest()

    @classmethod
    def load(cls, path):
        """A projection saved by save(); UserError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"projection file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format_version"]) != FORMAT_VERSION:
                    raise UserError(f"{path} is a projection of format {int(data['format_version'])}, "
                                    f"this tool reads format {FORMAT_VERSION}: learn it again "
                                    "with compress.py")
                info = json.loads(str(data["info"]))
                return cls(data["mean"], data["components"], data["scale"],
                           data["eigenvalues"], info)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{path} is not a projection file written by compress.py "
                            f"({type(err).__name__}: {err})") from None

    def mismatch(self, fc7_dim, model):
        """Why this projection cannot be applied to the features of a database
        with `fc7_dim` values per row made by `model` (its metadata's model
        record), or None when it can."""
        problems = []
        if self.fc7_dim != int(fc7_dim):
            problems.append(f"it projects {self.fc7_dim}-value features, the database's "
                            f"fc7 has {fc7_dim} values")
        mine = (self.info.get("model") or {}).get("weights_sha1")
        theirs = (model or {}).get("weights_sha1")
        if mine and theirs and mine != theirs:
            problems.append(f"it was learned on features of other weights (sha1 {mine[:12]}…, "
                            f"{self.info['model'].get('weights')}); the database's weights "
                            f"have sha1 {theirs[:12]}…")
        return "; ".join(problems) or None


def _json(value):
    return json.dumps(value, sort_keys=True)


def sample_ids(count, size, seed=0):
    """Ascending ids of a fixed-seed random sample of `size` rows of `count`
    (all of them when size >= count): ascending, so a memory map reads the
    file in one forward pass."""
    if size >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=int(size), replace=False)).astype(np.int64)
