#!/usr/bin/env python3
"""Find groups of near-identical images in a feature database.

    python python/duplicates.py DB
    python python/duplicates.py DB --level similar --out dups/
    python python/duplicates.py DB --radius 6 --threshold 0.2 --no-sheets

All pairs of images whose codes are within a Hamming radius, kept when
their fc7 rows (scaled to unit length) are within a distance threshold,
joined into groups (connected components).  Two levels: "duplicates" (the
same picture: re-encoded, resized, cropped by a few pixels, brightness
changed) and "similar" (a looser threshold); --radius and --threshold
override the level's.  Exact copies (the same file bytes) are marked by
file digest.  Prints one line per group; --out DIR writes duplicates.json,
duplicates.tsv and a contact sheet per group (group-0001.png, ...).
"""
import sys

from dlbhc import cli


def parse_args(argv):
    from dlbhc.serving.duplicates import DEFAULT_LEVEL, LEVELS
    p = cli.ArgumentParser(__doc__)
    p.add_argument("db", help="feature database made by extract.py")
    p.add_argument("--level", choices=tuple(LEVELS), default=DEFAULT_LEVEL,
                   help="how alike: " + "; ".join(
                       f"{name}: radius {lv.radius}, threshold {lv.threshold}"
                       for name, lv in LEVELS.items()))
    p.add_argument("--radius", type=cli.non_negative_int,
                   help="Hamming radius on the codes (default: the level's)")
    p.add_argument("--threshold", type=float,
                   help="largest distance between unit-length fc7 rows, 0..2 "
                        "(default: the level's)")
    p.add_argument("--out", metavar="DIR", help="write duplicates.json, duplicates.tsv and "
                   "group-NNNN.png contact sheets here")
    p.add_argument("--no-sheets", action="store_true", help="with --out: no contact sheets")
    p.add_argument("--show", type=cli.non_negative_int, default=20, help="groups printed")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dlbhc.serving.duplicates import find_duplicates, level_settings, write_listing
    from dlbhc.store.database import FeatureStore
    level_settings(args.level, args.radius, args.threshold)   # bad values before opening
    with FeatureStore.open(args.db) as store:
        found = find_duplicates(store, args.level, args.radius, args.threshold)
    print(f"{len(found.groups)} groups ({found.level}: radius {found.radius}, threshold "
          f"{found.threshold}) among {found.images} images; {found.near_pairs} pairs within "
          f"the radius, {found.close_pairs} within the threshold")
    for n, group in enumerate(found.groups[:args.show], 1):
        copies = sum(len(same) - 1 for same in group.exact)
        print(f"group {n}: {len(group.ids)} images" + (f", {copies} exact copies" if copies
                                                        else "") + ": " + " ".join(group.paths[:6])
              + (" ..." if len(group.ids) > 6 else ""))
    if len(found.groups) > args.show:
        print(f"... {len(found.groups) - args.show} more groups (--show N, or --out DIR)")
    if args.out:
        written = write_listing(found, args.out, sheets=not args.no_sheets)
        print(f"wrote {written[0]}, {written[1]}"
              + (f" and {len(written) - 2} contact sheets" if len(written) > 2 else ""),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
