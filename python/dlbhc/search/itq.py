"""Codes without labels: linear hashes of feature vectors, fitted in numpy.

A LinearHash is a mean and a projection W (D x bits): the code of x is
(x - mean) W > 0, bit by bit. That is exactly what a deploy net's latent
InnerProduct layer (weights W^T, bias -mean W) followed by its Sigmoid
computes, with codes latent > 0.5 (codes.CODE_THRESHOLD), so a hash fitted
here can be written into the net (training.unsupervised) and everything
downstream (extract.py, the service, Milvus) runs unchanged.

    fit_itq       ITQ, iterative quantisation (Gong & Lazebnik, PAMI 2013):
                  PCA to `bits` dimensions, then the orthogonal rotation R
                  that minimises the quantisation loss ||B - V R||^2,
                  alternating B = sign(V R) and R from the SVD of V^T B
                  (orthogonal Procrustes); seeded random start
    fit_pca_sign  PCA to `bits` dimensions, the sign of each (no rotation)
    fit_lsh       random Gaussian projections of the centred features (LSH)

The PCA is the top `bits` eigenvectors of the features' covariance; bits
may not exceed the feature dimension. Used by the unsupervised recipe and
by benchmarks/bench_unsupervised.py; never imports Caffe.
"""
from dataclasses import dataclass, field

import numpy as np

DEFAULT_ITERATIONS = 50


@dataclass
class LinearHash:
    """code = (x - mean) @ projection > 0; mean (D,), projection (D, bits)."""
    mean: np.ndarray
    projection: np.ndarray
    method: str
    losses: list = field(default_factory=list)     # ITQ: quantisation loss per iteration
    rotation: np.ndarray = None                    # ITQ: R (bits x bits)

    @property
    def bits(self):
        return self.projection.shape[1]

    def project(self, x):
        """(n, bits) real values whose signs are the codes."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.projection

    def codes(self, x):
        """(n, bits) bool codes of features x (n, D)."""
        return self.project(x) > 0

    def latent_layer(self):
        """(weights (bits, D), bias (bits,)) float32 of the InnerProduct whose
        output is project(x): written into the net's latent layer."""
        weights = self.projection.T
        return (weights.astype(np.float32),
                (-(self.mean @ self.projection)).astype(np.float32))


def _checked(features, bits):
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {x.shape}")
    if not 0 < bits <= x.shape[1]:
        raise ValueError(f"{bits} bits from {x.shape[1]}-dimensional features: "
                         f"at most {x.shape[1]}")
    if len(x) < 2:
        raise ValueError(f"{len(x)} feature vector(s): a hash is fitted on at least 2")
    return x


def pca(features, bits):
    """(mean (D,), components (D, bits)): the top `bits` principal
    directions, largest variance first, each with its largest entry positive
    (a fixed sign: the same features give the same directions)."""
    x = _checked(features, bits)
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / max(1, len(x) - 1)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, np.argsort(values)[::-1][:bits]]
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(bits)])
    return mean, top * np.where(signs == 0, 1, signs)


def random_rotation(bits, rng):
    """A random orthogonal bits x bits matrix (QR of a Gaussian one)."""
    q, r = np.linalg.qr(rng.standard_normal((bits, bits)))
    return q * np.sign(np.diag(r))


def fit_itq(features, bits, iterations=DEFAULT_ITERATIONS, seed=0):
    """ITQ (see the module docstring): a LinearHash whose projection is
    components @ R, with the loss after every iteration in .losses (never
    increasing) and R in .rotation."""
    mean, components = pca(features, bits)
    v = (np.asarray(features, dtype=np.float64) - mean) @ components
    rotation = random_rotation(bits, np.random.default_rng(seed))
    losses = []
    for _ in range(int(iterations)):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ b)
        rotation = u @ wt
        losses.append(float(((b - v @ rotation) ** 2).sum()))
    return LinearHash(mean, components @ rotation, "itq", losses, rotation)


def fit_pca_sign(features, bits):
    """The sign of each of the top `bits` principal components."""
    mean, components = pca(features, bits)
    return LinearHash(mean, components, "pca-sign")


def fit_lsh(features, bits, seed=0):
    """Random Gaussian projections of the centred features (sign random
    projections, Charikar 2002)."""
    x = _checked(features, bits)
    rng = np.random.default_rng(seed)
    return LinearHash(x.mean(axis=0), rng.standard_normal((x.shape[1], bits)), "lsh")


FITTERS = {"itq": fit_itq, "pca-sign": fit_pca_sign, "lsh": fit_lsh}
