"""Groups from pairs: the connected components of the graph whose edges are
the given pairs (union-find, vectorised in numpy).

Components are found by minimum-label propagation with pointer jumping:
every image starts as its own label, each pass gives both ends of every
edge the smaller of their labels' roots, and labels then jump to their
roots, until nothing changes.  Each pass is a few numpy operations over the
edges; the number of passes grows with the logarithm of a component's
diameter, not with the number of images.
"""
import numpy as np


def components(n, i, j):
    """The component of each of n nodes (the smallest node of its component)
    under the edges (i[k], j[k])."""
    labels = np.arange(int(n), dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    if len(i) != len(j):
        raise ValueError(f"{len(i)} pair starts for {len(j)} pair ends")
    if not len(i):
        return labels
    while True:
        li, lj = labels[i], labels[j]
        low = np.minimum(li, lj)
        before = labels.copy()
        np.minimum.at(labels, li, low)      # roots take the smaller label
        np.minimum.at(labels, lj, low)
        while True:                         # every node jumps to its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before) and np.array_equal(labels[i], labels[j]):
            return labels


def groups(n, i, j, min_size=2):
    """The components of at least min_size nodes, as sorted id arrays, largest
    group first (ties: by smallest id)."""
    labels = components(n, i, j)
    order = np.argsort(labels, kind="stable")
    cut = np.flatnonzero(np.diff(labels[order])) + 1
    found = [g for g in np.split(order, cut) if len(g) >= min_size]
    found.sort(key=lambda g: (-len(g), int(g[0])))
    return found
