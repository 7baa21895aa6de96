"""Answering queries over a feature database: the index cache, the query's
features, coarse-to-fine search, and how results are shown (table, JSON,
montage picture).

The index (packed codes + bucket table) is built once from the database and
cached beside it as `<db>.index.npz`; it is rebuilt whenever the database's
fingerprint (creation time, image count, model) changes, e.g. after extract.py
appended images. Codes stay in RAM; fc7 rows are read from the database only
for the candidates of each query.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .index import HashIndex, default_min_candidates
from .store import FeatureStore, check_compatible


def index_cache_path(db_path):
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".index.npz")


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    label: int
    hamming: int
    l2: float


@dataclass
class Answer:
    query: str
    query_label: int
    hits: list
    candidates: int
    radius: int
    search_ms: float
    query_path: str = ""   # the query's image file, when it has one

    def as_dict(self):
        return {"query": self.query, "query_path": self.query_path,
                "query_label": self.query_label,
                "candidates": self.candidates, "radius": self.radius,
                "search_ms": round(self.search_ms, 3),
                "results": [h.__dict__ for h in self.hits]}


class Retriever:
    """A database opened for search, with its index in memory."""

    def __init__(self, db_path, log=sys.stderr):
        self.db_path = Path(db_path)
        self.store = FeatureStore.open(self.db_path)
        if self.store.count == 0:
            raise UserError(f"{db_path} holds no images yet: run extract.py on a collection first")
        start = time.monotonic()
        try:
            self.index, rebuilt = HashIndex.load_or_build(
                index_cache_path(self.db_path), self.store.fingerprint(),
                self.store.codes, self.store.bits)
        except OSError:  # a read-only folder: build in memory, do not cache
            self.index, rebuilt = HashIndex.build(self.store.codes(), self.store.bits), True
        if rebuilt:
            print(f"built the search index of {self.store.count} images "
                  f"({self.index.n_buckets} buckets) in {time.monotonic() - start:.1f} s",
                  file=log)
        self._net = None

    def close(self):
        self.store.close()

    # ---- the query's features ----------------------------------------------
    def load_model(self, deploy=None, weights=None, gpu=None):
        """The net that made the database (recorded in its metadata), unless
        another deploy/weights pair is given; either way it must match."""
        from .model import HashNet
        recorded = self.store.meta.get("model", {})
        deploy = deploy or recorded.get("deploy")
        weights = weights or recorded.get("weights")
        if not deploy or not weights:
            raise UserError("the database does not record its model: pass --deploy and --weights")
        for what, path in (("deploy", deploy), ("weights", weights)):
            if not Path(path).exists():
                raise UserError(f"the {what} file {path} (recorded in {self.db_path}) is gone: "
                                f"pass --{what} with the file the database was built with")
        prep = self.store.meta["preprocessing"]
        net = HashNet(deploy, weights, prep["mean_bgr"], gpu=gpu, resize=prep["resize"])
        described = net.describe()
        check_compatible(self.store.meta, dict(described, fc7_dtype=self.store.meta["fc7_dtype"]),
                         what=f"the model ({Path(deploy).name})")
        if recorded.get("weights_sha1") and described["model"]["weights_sha1"] != recorded["weights_sha1"]:
            raise UserError(f"{weights} are not the weights {self.db_path} was built with "
                            f"({recorded.get('weights')}): their codes would not be comparable")
        self._net = net
        return net

    def features_of_images(self, paths):
        if self._net is None:
            self.load_model()
        from .images import BadImage
        try:
            fc7, _latent, codes = self._net.features_of_paths(paths)
        except BadImage as err:
            raise UserError(f"cannot read query image {err.path}: {err.reason}") from None
        return fc7, codes

    def features_of_id(self, image_id):
        if not 0 <= image_id < self.store.count:
            raise UserError(f"--id {image_id}: the database holds ids 0..{self.store.count - 1}")
        return self.store.fc7([image_id])[0], self.store.code_rows([image_id])[0]

    # ---- search ------------------------------------------------------------
    def search(self, code, fc7, k=10, candidates=None, max_radius=None, query="", query_label=-1,
               exclude_id=None, query_path=""):
        start = time.perf_counter()
        want = k + (1 if exclude_id is not None else 0)
        result = self.index.search(code, fc7, self.store.fc7, want,
                                   min_candidates=candidates or default_min_candidates(want),
                                   max_radius=max_radius)
        elapsed = (time.perf_counter() - start) * 1000
        keep = [i for i in range(len(result.ids)) if result.ids[i] != exclude_id][:k]
        infos = self.store.infos(result.ids[keep]) if keep else []
        hits = [Hit(rank=r + 1, id=int(result.ids[i]), path=info["path"],
                    label=int(info["label"]), hamming=int(result.hamming[i]),
                    l2=float(result.l2[i]))
                for r, (i, info) in enumerate(zip(keep, infos))]
        return Answer(query=query, query_label=query_label, hits=hits,
                      candidates=int(result.candidates), radius=int(result.radius),
                      search_ms=elapsed, query_path=query_path or query)


# ---- showing results ---------------------------------------------------------

def format_table(answer, shown=10):
    lines = [f"query {answer.query}" + (f" (label {answer.query_label})"
                                        if answer.query_label >= 0 else ""),
             f"{answer.candidates} candidates within Hamming radius {answer.radius}, "
             f"search {answer.search_ms:.2f} ms",
             f"{'rank':>4}  {'id':>8}  {'ham':>3}  {'L2':>9}  {'label':>5}  path"]
    for hit in answer.hits[:shown]:
        lines.append(f"{hit.rank:>4}  {hit.id:>8}  {hit.hamming:>3}  {hit.l2:>9.3f}  "
                     f"{hit.label:>5}  {hit.path}")
    if len(answer.hits) > shown:
        lines.append(f"... {len(answer.hits) - shown} more (--show N, or --json for all)")
    return "\n".join(lines)


def to_json(answers):
    return json.dumps([a.as_dict() for a in answers], indent=2)


MONTAGE_TILE_INCHES = 1.6
MONTAGE_DPI = 100


def montage(answer, out_path, shown=10):
    """PNG grid: the query, then the top results with Hamming and L2 distance.
    A result's frame is green when its label equals the query's, red when it
    differs (no frame when labels are unknown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .images import BadImage, read_image

    hits = answer.hits[:shown]
    cols = len(hits) + 1
    fig, axes = plt.subplots(1, cols, figsize=(MONTAGE_TILE_INCHES * cols, MONTAGE_TILE_INCHES + 0.5),
                             dpi=MONTAGE_DPI, squeeze=False)
    tiles = [("query", answer.query_path, None)] + \
        [(f"#{h.rank} H{h.hamming} L2 {h.l2:.1f}", h.path, h.label) for h in hits]
    for ax, (title, path, label) in zip(axes[0], tiles):
        try:
            img = read_image(path)
        except (BadImage, OSError):
            img = np.full((8, 8, 3), 200, dtype=np.uint8)
            title += " (unreadable)"
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if label is not None and answer.query_label >= 0 and label >= 0:
            color = "tab:green" if label == answer.query_label else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
    fig.savefig(out_path, dpi=MONTAGE_DPI)
    plt.close(fig)
    return Path(out_path)
