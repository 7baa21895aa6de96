#!/usr/bin/env python3
"""Get a small collection of real photos in class folders, to try training on
a collection the project has never seen:

    python data/get_photos.py [--dest data/photos] [--deb gcompris-qt-data_3.1-2_all.deb]
    make train DATA=data/photos/gcompris-categorization

GCompris's categorization photos (4 classes, 123 images) from Debian's
gcompris-qt-data 3.1-2, fetched with `apt-get download` (no root needed, nothing
installed) and its sha256 checked. See data/README.md.
"""
import argparse
import sys
import time
from pathlib import Path

from dlbhc.errors import run_main
from dlbhc.datasets.photos import GCOMPRIS, get_photos

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write DEST/gcompris-categorization/<class>/*.png (real photos, 4 "
                    "classes) from Debian's gcompris-qt-data package.")
    parser.add_argument("--dest", type=Path, default=PROJECT_ROOT / "data" / "photos",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--deb", type=Path, default=None,
                        help=f"the package file instead of `apt-get download "
                             f"{GCOMPRIS.package}={GCOMPRIS.version}`")
    args = parser.parse_args(argv)
    start = time.monotonic()
    result = get_photos(args.dest, deb=args.deb)
    state = "already present" if result.reused else f"done in {time.monotonic() - start:.1f} s"
    print(f"{result.dest}: " + ", ".join(f"{c} {n}" for c, n in result.counts.items())
          + f" ({sum(result.counts.values())} photos), {state}")
    print(f"train on it: make train DATA={result.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
