"""Near-duplicates of a feature database: groups of near-identical images,
their listing (JSON, TSV) and a contact sheet per group.

Two named levels, each a Hamming radius on the codes and a rule on the
distance d between unit-length fc7 rows (search.pairs.pair_distances,
0..2; the rule is search.pairs.close_pairs'): d <= near, or d <= threshold
and d <= ratio x the k-th neighbour distance of both images (a local
scale: a copy is much closer to its original than the original's 10th
neighbour is, where a single global threshold either misses the cropped
and brightened copies or takes in look-alikes of a crowded class):

    duplicates  the same picture: re-encoded, resized, cropped by a few
                pixels, brightness changed
    similar     looser: near variants, more look-alikes

The pairs of images within the radius are found on the codes
(search.pairs.near_pairs: cost grows with the near pairs, not N^2), the
rule keeps the close ones, and the groups are their connected components
(search.groups).  Exact copies (the same file bytes) are told
apart by file digest: identical bytes decode to identical features, so
they are always among the pairs at distance 0, and only the images of the
groups found are read to take their digest (a stored "sha1" is used when
the info record has one).  The defaults were calibrated on generated
copies (benchmarks/bench_duplicates.py; docs/benchmarks.md has the
figures).
"""
import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ..errors import UserError
from ..files import file_digest
from ..report import get_logger
from ..search.groups import groups as connected_groups
from ..search.pairs import close_pairs, near_pairs
from .display import contact_sheet

log = get_logger(__name__)


@dataclass(frozen=True)
class Level:
    """A named strictness: Hamming radius on the codes, then close_pairs'
    rule on unit-length fc7 rows (threshold, near, ratio, k)."""
    name: str
    radius: int
    threshold: float
    near: float
    ratio: float
    k: int
    about: str


# Calibrated on generated copies of CIFAR-10 test images with the demo net
# (benchmarks/bench_duplicates.py, docs/benchmarks.md).
LEVELS = {
    "duplicates": Level("duplicates", 10, 0.5, 0.1, 0.7, 10, "the same picture (re-encoded, "
                        "resized, cropped by a few pixels, brightness changed)"),
    "similar": Level("similar", 12, 0.6, 0.15, 0.8, 10, "near variants: looser"),
}
DEFAULT_LEVEL = "duplicates"
SHEET_COLUMNS = 8
SHEET_MAX_TILES = 32        # a contact sheet shows at most this many of a group's images
JSON_FILE, TSV_FILE = "duplicates.json", "duplicates.tsv"


def live_rows(store):
    """The rows of the images a duplicate search considers: the store's live
    ones (FeatureStore.live_rows: removed images are never grouped)."""
    return store.live_rows()


def level_settings(level=DEFAULT_LEVEL, radius=None, threshold=None, bits=None):
    """(Level, radius, threshold): the level's, or the ones given, checked
    (UserError naming the bad value and what is allowed)."""
    if level not in LEVELS:
        raise UserError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
    chosen = LEVELS[level]
    top = bits if bits is not None else 1024
    # the level's radius on codes shorter than it: every code
    radius = min(chosen.radius, top) if radius is None else radius
    threshold = chosen.threshold if threshold is None else threshold
    try:
        radius = int(radius)
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise UserError(f"radius must be a whole number and threshold a number "
                        f"(got {radius!r}, {threshold!r})") from None
    if not 0 <= radius <= top:
        raise UserError(f"radius must be between 0 and {top} (the code's bits), got {radius}")
    if not 0 <= threshold <= 2:
        raise UserError("threshold must be between 0 and 2 (a distance between unit-length "
                        f"fc7 rows), got {threshold}")
    return chosen, radius, threshold


@dataclass
class Group:
    """One group: its images (ids ascending), their paths and labels, the
    close pairs inside it (i, j, hamming, distance), and the sets of exact
    copies among them (ids sharing a file digest)."""
    ids: list
    paths: list
    labels: list
    pairs: list
    exact: list

    def as_dict(self, number):
        return {"group": number, "size": len(self.ids), "ids": self.ids, "paths": self.paths,
                "labels": self.labels, "exact_copies": self.exact,
                "pairs": [{"a": a, "b": b, "hamming": h, "distance": round(d, 5)}
                          for a, b, h, d in self.pairs]}


@dataclass
class Duplicates:
    """What find_duplicates found, and with which settings."""
    level: str
    radius: int
    threshold: float
    images: int
    near_pairs: int         # image pairs within the radius
    close_pairs: int        # of those, within the threshold
    groups: list
    seconds: float

    def as_dict(self):
        rule = LEVELS[self.level]
        return {"level": self.level, "radius": self.radius, "threshold": self.threshold,
                "near": rule.near, "ratio": rule.ratio, "k": rule.k,
                "images": self.images, "near_pairs": self.near_pairs,
                "close_pairs": self.close_pairs, "seconds": round(self.seconds, 3),
                "groups": [g.as_dict(n + 1) for n, g in enumerate(self.groups)]}


def close_image_pairs(store, radius, threshold, level=None):
    """(i, j, hamming, distance) arrays (i, j: rows) of the live images' pairs within
    `radius` on the codes that pass the level's rule with `threshold` (no
    level: distance <= threshold), and the number of pairs within the
    radius."""
    pairs = near_pairs(store.codes(), store.bits, radius, ids=live_rows(store))
    rule = {} if level is None else {"near": min(level.near, threshold), "ratio": level.ratio,
                                     "k": level.k}
    return close_pairs(pairs, store.fc7_rows(), threshold, **rule), pairs.count()


def find_duplicates(store, level=DEFAULT_LEVEL, radius=None, threshold=None):
    """Duplicates of a FeatureStore at `level` (radius and threshold override
    the level's)."""
    start = time.perf_counter()
    chosen, radius, threshold = level_settings(level, radius, threshold, store.bits)
    (i, j, ham, dist), n_near = close_image_pairs(store, radius, threshold, chosen)
    found = connected_groups(store.count, i, j)
    member_ids = np.concatenate(found) if found else np.empty(0, np.int64)
    infos = dict(zip(member_ids.tolist(), store.infos(member_ids))) if len(member_ids) else {}
    group_of = {m: g for g, members in enumerate(found) for m in members.tolist()}
    pair_lists = [[] for _ in found]
    # rows -> ids (the same until a compaction: store/live.py) for what is shown
    id_of = lambda rows: store.ids_of_rows(np.asarray(rows, dtype=np.int64)).tolist()
    pair_ids = (id_of(i), id_of(j)) if len(i) else ([], [])
    for a, a_id, b_id, h, d in zip(i.tolist(), *pair_ids, ham.tolist(), dist.tolist()):
        pair_lists[group_of[a]].append((a_id, b_id, h, float(d)))
    result = []
    for members, pairs in zip(found, pair_lists):
        records = [infos[m] for m in members.tolist()]
        ids = id_of(members)
        result.append(Group(ids, [r["path"] for r in records],
                            [int(r.get("label", -1)) for r in records], pairs,
                            exact_copies(ids, records)))
    seconds = time.perf_counter() - start
    log.info("%d groups of near-duplicates (%s: radius %d, threshold %.3f) among %d images "
             "in %.1f s", len(result), chosen.name, radius, threshold, store.live_count, seconds)
    return Duplicates(chosen.name, radius, threshold, store.live_count, n_near, len(i), result,
                      seconds)


def exact_copies(ids, records):
    """Lists of ids (two or more) whose files have the same bytes; a file
    that cannot be read is nobody's copy."""
    by_digest = {}
    for image_id, record in zip(ids, records):
        digest = record.get("sha1")
        if digest is None:
            try:
                digest = file_digest(record["path"])
            except OSError:
                continue
        by_digest.setdefault(digest, []).append(image_id)
    return sorted(sorted(same) for same in by_digest.values() if len(same) > 1)


def write_listing(found, out_dir, sheets=True):
    """duplicates.json, duplicates.tsv and (sheets) group-NNNN.png per group
    in out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to {out_dir}: {err.strerror}") from None
    written = [out_dir / JSON_FILE, out_dir / TSV_FILE]
    written[0].write_bytes(orjson.dumps(found.as_dict(), option=orjson.OPT_INDENT_2))
    with open(written[1], "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(["group", "size", "id", "label", "exact_copy_of", "path"])
        for n, group in enumerate(found.groups, 1):
            copy_of = {m: same[0] for same in group.exact for m in same[1:]}
            for image_id, label, path in zip(group.ids, group.labels, group.paths):
                out.writerow([n, len(group.ids), image_id, label,
                              copy_of.get(image_id, ""), path])
    if sheets:
        for n, group in enumerate(found.groups, 1):
            written.append(group_sheet(group, out_dir / f"group-{n:04d}.png"))
    return written


def group_sheet(group, out_path):
    """A contact sheet of one group: each image titled with its id, its
    Hamming and fc7 distance to the group's first image when the two are a
    close pair, and "copy" for an exact copy (framed blue)."""
    first = group.ids[0]
    to_first = {b if a == first else a: (h, d) for a, b, h, d in group.pairs
                if first in (a, b)}
    copies = {m for same in group.exact for m in same[1:]}
    tiles = []
    for image_id, path in list(zip(group.ids, group.paths))[:SHEET_MAX_TILES]:
        title = f"#{image_id}"
        if image_id in to_first:
            h, d = to_first[image_id]
            title += f" H{h} d{d:.2f}"
        if image_id in copies:
            title += " copy"
        tiles.append((title, path, "tab:blue" if image_id in copies else None))
    return contact_sheet(tiles, out_path, columns=SHEET_COLUMNS)
