"""The parameters of a search, in one place: their names, defaults and rules.

A coarse-to-fine search asks three things, whoever asks it (retrieve.py,
evaluate.py, the service's HTTP API, metrics.evaluate, the Milvus path):

    top_k       results per query (default DEFAULT_TOP_K); None ranks every
                coarse candidate (the evaluation's full ranking)
    candidates  the coarse stage gathers at least this many images (default
                default_min_candidates(top_k) = 2 x top_k)
    max_radius  it never looks beyond this Hamming radius (default: no limit;
                clamped to the code width by radius_limit)

SearchParams holds them, checks them once when made (UserError naming the
parameter and the rule it broke) and, with within(), against a server's
upper limits.  The command lines spell them --top-k, --candidates and
--max-radius (cli.add_search_arguments), the API top_k, candidates and
max_radius.

The engines' batched searches (HashIndex.search, milvus_index's) are the
low-level, faiss-like call under SearchParams: they keep faiss's k and take
what a SearchParams holds (k, min_candidates, max_radius), with the same
defaults and clamp (coarse_target, radius_limit) but the looser contract of
a library call (k >= 0, min_candidates 0 for the query's own shell only).
"""
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# Results per query when nobody says: retrieve.py, the API and the library.
DEFAULT_TOP_K = 10


def default_min_candidates(k):
    """Coarse candidates gathered for a top-k fine search: 2 * k.

    The fine stage can only return what the coarse stage found.  Gathering
    twice k lets fc7 promote images from just beyond the k-th Hamming rank
    (the paper's reason for re-ranking), while the re-rank cost (one fc7 read
    per candidate) stays proportional to k.  The whole boundary shell is
    added on top, so the actual pool is often larger.
    """
    return 2 * int(k)


def coarse_target(k, min_candidates=None):
    """The number of images the coarse stage gathers at least: min_candidates,
    else default_min_candidates(k) (0 when k is None: every candidate is
    ranked, and none was asked for)."""
    if min_candidates is not None:
        return int(min_candidates)
    return default_min_candidates(k if k is not None else 0)


def radius_limit(max_radius, bits):
    """The largest Hamming radius a search may reach: max_radius clamped to
    0..bits (bits when max_radius is None)."""
    return bits if max_radius is None else max(0, min(int(max_radius), int(bits)))


def _check_integer(name, value, low, high=None):
    """UserError unless value is None or an integer in low..high (no upper
    bound with high None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name} must be an integer (got {value!r})")
    if value < low or (high is not None and value > high):
        rule = f"at least {low}" if high is None else f"between {low} and {high}"
        raise UserError(f"{name} must be {rule} (got {value})")


@dataclass(frozen=True)
class SearchParams:
    """What one search asks (see the module docstring); checked when made."""
    top_k: int = DEFAULT_TOP_K
    candidates: int = None
    max_radius: int = None

    def __post_init__(self):
        self.within()

    def within(self, max_top_k=None, max_candidates=None):
        """self, after checking every parameter against its rule and the
        given upper limits (a server's); UserError naming the first broken."""
        _check_integer("top_k", self.top_k, 1, max_top_k)
        _check_integer("candidates", self.candidates, 1, max_candidates)
        _check_integer("max_radius", self.max_radius, 0)
        return self

    @property
    def min_candidates(self):
        """The coarse stage's target: candidates, else 2 x top_k (see
        coarse_target)."""
        return coarse_target(self.top_k, self.candidates)

    def radius_limit(self, bits):
        """max_radius clamped to the code width (see radius_limit)."""
        return radius_limit(self.max_radius, bits)
