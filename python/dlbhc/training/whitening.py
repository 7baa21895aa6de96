"""Patch whitening: the fast net's frozen first convolution.

airbench (Keller Jordan, arXiv 2404.00498) starts with a k x k convolution
whose filters whiten the training images' k x k patches: each filter is an
eigenvector of the patch covariance divided by the square root of its
eigenvalue, so the layer's outputs are decorrelated with unit variance.
Each filter also appears negated, because the ReLU after the layer would
otherwise drop half of every whitened direction. The filters are computed
once from the training images and kept frozen (lr_mult 0).
"""
import numpy as np

from ..search.pca import sample_ids

# Added to each eigenvalue, relative to the mean patch variance: keeps the
# near-zero directions (pixel noise, JPEG blocking) from being blown up.
# airbench's 5e-4 on unit-variance inputs.
DEFAULT_RELATIVE_EPS = 5e-4
# Images the patch covariance is measured on (airbench: 5,000)
SAMPLE_IMAGES = 5000


def whitening_sample(images, size=SAMPLE_IMAGES, seed=0):
    """A seeded sample of `size` images (all if fewer), kept in their order.
    Not the first ones: image lists are often sorted by class (CIFAR-10's
    is), and the first 5,000 of its training list are all airplanes, whose
    patches (sky, metal) would set the whitening of every class."""
    images = np.asarray(images)
    return images[sample_ids(len(images), size, seed)]


def image_patches(images, kernel):
    """(n, C, H, W) float -> (n * (H-k+1) * (W-k+1), C*k*k) patches, each
    flattened in Caffe's filter order (channel, row, column)."""
    images = np.asarray(images, dtype=np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(images, (kernel, kernel), axis=(2, 3))
    # (n, C, H', W', k, k) -> (n, H', W', C, k, k)
    windows = windows.transpose(0, 2, 3, 1, 4, 5)
    return windows.reshape(-1, images.shape[1] * kernel * kernel)


def whitening_filters(images, kernel=2, relative_eps=DEFAULT_RELATIVE_EPS):
    """Filters (2 * C*k*k, C, k, k) float32 for `images` (n, C, H, W): the
    whitening filters and their negatives. The patches are whitened about
    their own mean: the net's input already has the training mean removed."""
    patches = image_patches(images, kernel)
    patches = patches - patches.mean(axis=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eps = relative_eps * float(np.trace(covariance)) / len(covariance)
    filters = (eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)).T
    filters = filters.reshape(-1, images.shape[1], kernel, kernel)
    return np.concatenate([filters, -filters]).astype(np.float32)
