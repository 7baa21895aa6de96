#!/usr/bin/env python3
"""Near-duplicates: pair precision and recall on a generated set, and the
time of all pairs within radius 2 at 1M synthetic codes.

    python benchmarks/bench_duplicates.py quality --originals 300 --skip 1 --grid
    python benchmarks/bench_duplicates.py quality --originals 400 --skip 0
    python benchmarks/bench_duplicates.py scale --n 1000000 --radius 2

quality: originals are CIFAR-10 test images (data/cifar10/test.txt, every
`stride`-th line from `skip`, so classes mix and two runs with different
--skip share no original), upscaled 4x (bicubic) to 128 px.  Each gets four
copies: re-encoded (JPEG quality 40), resized (to 80 px), cropped (6 px off
every side) and brightness changed (x1.3).  All are extracted with the demo
net (runs/demo/cifar_hash48, `make demo`) through extract.py, then
duplicates.py's search runs at each level's defaults.  A true pair is two
images of one original (10 per original); every other pair is false.
Reported: pair precision and recall of the close pairs, and of the pairs
implied by the groups (every two members of a group).  --grid prints
precision/recall over the rule's ratios and thresholds (how the defaults
were chosen: on --skip 1, then checked on --skip 0 and --skip 3, whose
originals the calibration never saw).

scale: zipf_clustered_codes (dlbhc_testing.synthetic; --centres, --zipf,
--mean-flips) and search.pairs.near_pairs on them: seconds, unique codes,
pairs of codes found, image pairs they hold.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from dlbhc.search.groups import groups as connected_groups
from dlbhc.search.pairs import close_pairs, near_pairs
from dlbhc.serving.duplicates import LEVELS, close_image_pairs, find_duplicates
from dlbhc.store.database import FeatureStore
from dlbhc_testing.synthetic import add_cluster_args, zipf_clustered_codes

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "data" / "cifar10"
DEMO = ROOT / "runs" / "demo" / "cifar_hash48"
DEPLOY = ROOT / "prototxt" / "cifar_hash48_deploy.prototxt"
COPIES = ("jpeg40", "resize80", "crop6", "bright1.3")
SIZE = 128


def make_copies(image):
    """The four edited copies of an upscaled original (PIL images)."""
    w, h = image.size
    out = {}
    out["resize80"] = image.resize((80, 80 * h // w), Image.BICUBIC)
    out["crop6"] = image.crop((6, 6, w - 6, h - 6))
    out["bright1.3"] = ImageEnhance.Brightness(image).enhance(1.3)
    return out


def generate(folder, originals, skip, stride, distractors=0, seed=0):
    """Write the set; a `path label` list whose label is the original's
    number.  Distractors: other test images (seeded draw among the lines
    not taken as originals), upscaled alike, without copies, each a label
    of its own (no true pair)."""
    lines = [ln.split()[0] for ln in (CIFAR / "test.txt").read_text().split("\n") if ln.strip()]
    chosen = lines[skip::stride][:originals]
    others = sorted(set(lines) - set(lines[skip::stride]))
    extra = list(np.random.default_rng(seed).permutation(others)[:distractors])
    rows = []
    for n, rel in enumerate(chosen + extra):
        image = Image.open(CIFAR / rel).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        base = folder / f"{n:05d}"
        image.save(f"{base}_orig.png")
        rows.append(f"{base}_orig.png {n}")
        if n >= len(chosen):
            continue
        image.save(f"{base}_jpeg40.jpg", quality=40)
        for name, copy in make_copies(image).items():
            copy.save(f"{base}_{name}.png")
        rows += [f"{base}_{kind}.{'jpg' if kind == 'jpeg40' else 'png'} {n}"
                 for kind in COPIES]
    listing = folder / "list.txt"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def pair_scores(i, j, labels):
    """(precision, recall, found, true found, true pairs) of pairs (i, j)."""
    same = labels[i] == labels[j]
    per = np.bincount(labels)
    truth = int((per * (per - 1) // 2).sum())
    found, hits = len(i), int(same.sum())
    return (hits / found if found else 1.0, hits / truth if truth else 1.0, found, hits, truth)


def group_pairs(found):
    """Every pair (i, j) of members of each group."""
    i, j = [], []
    for g in found:
        a, b = np.triu_indices(len(g), 1)
        i.append(g[a])
        j.append(g[b])
    return (np.concatenate(i), np.concatenate(j)) if i else (np.empty(0, int), np.empty(0, int))


def quality(args):
    weights = DEMO / "cifar_hash48.caffemodel"
    if not weights.exists():
        sys.exit(f"error: {weights} is missing: run `make demo` first")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        listing = generate(tmp, args.originals, args.skip, args.stride, args.distractors)
        db = tmp / "db.lmdb"
        subprocess.run([sys.executable, str(ROOT / "python" / "extract.py"), str(listing),
                        "--out", str(db), "--deploy", str(DEPLOY), "--weights", str(weights)],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"generated and extracted {args.originals} originals x {1 + len(COPIES)} images "
              f"and {args.distractors} distractors in {time.perf_counter() - t0:.0f} s")
        with FeatureStore.open(db) as store:
            labels = store.labels()
            if args.grid:
                grid(store, labels)
            for level in LEVELS.values():
                found = find_duplicates(store, level.name)
                ids = [np.array(g.ids) for g in found.groups]
                (i, j, _, _), _ = close_image_pairs(store, found.radius, level.threshold,
                                                    level)
                p, r, n, hits, truth = pair_scores(i, j, labels)
                gp, gr, gn, _, _ = pair_scores(*group_pairs(ids), labels)
                print(f"{level.name:>10}: radius {level.radius}, threshold {level.threshold}: "
                      f"close pairs {n} (true {hits} of {truth}): precision {p:.3f} recall "
                      f"{r:.3f}; groups {len(ids)}, their pairs {gn}: precision {gp:.3f} "
                      f"recall {gr:.3f}; {found.seconds:.2f} s")


def grid(store, labels):
    """Pair precision/recall at the duplicates level's radius, near and k,
    over ratios and thresholds (ratio 1: the threshold alone)."""
    level = LEVELS["duplicates"]
    ratios = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    thresholds = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
    pairs = near_pairs(store.codes(), store.bits, min(level.radius, store.bits))
    rows = store.fc7_rows()
    print(f"precision/recall of close pairs (radius {level.radius}, near {level.near}, "
          f"k {level.k}); rows: ratio, columns: threshold")
    print("ratio " + " ".join(f"{t:>11}" for t in thresholds))
    for ratio in ratios:
        cells = []
        for t in thresholds:
            i, j, _, _ = close_pairs(pairs, rows, t, near=min(level.near, t), ratio=ratio,
                                     k=level.k)
            p, rc, *_ = pair_scores(i, j, labels)
            cells.append(f"{p:.3f}/{rc:.3f}")
        print(f"{ratio:>5} " + " ".join(f"{c:>11}" for c in cells))


def scale(args):
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    codes, _ = zipf_clustered_codes(args.n, 0, args.bits, rng, centres=args.centres,
                                    zipf=args.zipf, mean_flips=args.mean_flips)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = near_pairs(codes, args.bits, args.radius)
    seconds = time.perf_counter() - t0
    line = (f"n {args.n} bits {args.bits} radius {args.radius} centres {args.centres}: "
            f"{len(pairs.sizes)} unique codes, {pairs.n_code_pairs} pairs of distinct codes, "
            f"{pairs.count()} image pairs within the radius; near_pairs {seconds:.1f} s "
            f"(codes made in {made:.1f} s)")
    if args.groups:
        # The groups of the images within the radius, expanded pair by pair.
        t0 = time.perf_counter()
        i, j = zip(*((a, b) for a, b, _ in pairs.image_pairs())) if pairs.count() else ((), ())
        found = connected_groups(args.n, np.concatenate(i), np.concatenate(j)) if i else []
        line += f"; expanded and grouped ({len(found)} groups) in {time.perf_counter() - t0:.1f} s"
    print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--originals", type=int, default=400)
    q.add_argument("--skip", type=int, default=0, help="first line of test.txt taken")
    q.add_argument("--stride", type=int, default=7, help="every stride-th line of test.txt")
    q.add_argument("--distractors", type=int, default=0,
                   help="other test images added without copies (no true pair)")
    q.add_argument("--grid", action="store_true", help="precision/recall over radii, thresholds")
    q.add_argument("--tmp", default=os.environ.get("TMPDIR"), help="scratch folder")
    s = sub.add_parser("scale")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--bits", type=int, default=48)
    s.add_argument("--radius", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--groups", action="store_true", help="also expand and group the pairs")
    add_cluster_args(s)
    args = p.parse_args()
    quality(args) if args.what == "quality" else scale(args)


if __name__ == "__main__":
    main()
