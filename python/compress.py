#!/usr/bin/env python3
"""Give a feature database a compressed (PCA) re-rank store.

    python python/compress.py DB --pca 256                 # learn PCA-256, project every image
    python python/compress.py DB --pca 128 --whiten        # whitened PCA-128 (replaces PCA-256)
    python python/compress.py DB --projection OTHER_DB/pca-<sha1>.npz   # reuse a projection
    python python/compress.py DB --info | --remove

PCA (Babenko et al., "Neural Codes for Image Retrieval") is learned once, on
a fixed-seed random sample of the database's fc7 rows (--sample), and every
image's fc7 is projected into a flat file of float32 (--float16: half)
rows beside fc7.bin, recorded in the database's metadata.  From then on
extract.py projects the images it appends with the same, fixed projection,
and retrieve.py / evaluate.py re-rank by these rows (the best --exact-top
again by exact fc7) unless told --rerank fc7.  A 4096-d fc7 reduced to 256
values re-ranks from 16x fewer bytes: at millions of images they stay in
memory where fc7 cannot.

One PCA store per database: asking for other settings replaces it (after
the new one is complete); the same settings again are left alone unless
--replace.  A projection learned on another database must match this one
(fc7 size, and the same model's weights) or it is refused.
"""
import json
import sys
import time

from dlbhc import cli
from dlbhc.search.pca import DEFAULT_SAMPLE


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("db", help="feature database made by extract.py")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pca", type=cli.positive_int, metavar="DIM",
                      help="learn a PCA projection keeping DIM components (e.g. 256)")
    what.add_argument("--projection", metavar="NPZ",
                      help="apply a projection learned before (a pca-*.npz of another "
                           "database of the same model)")
    what.add_argument("--info", action="store_true", help="describe the PCA store and exit")
    what.add_argument("--remove", action="store_true",
                      help="delete the PCA store (search re-ranks by fc7 again)")
    p.add_argument("--whiten", action="store_true",
                   help="whitened PCA (each component scaled to unit variance)")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                   help="fc7 rows PCA is learned on (default %(default)s, or all when fewer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--float16", action="store_true", help="store the PCA rows as float16")
    p.add_argument("--replace", action="store_true",
                   help="rebuild even when the database has a PCA store of these settings")
    args = p.parse_args(argv)
    if args.sample < 2:
        p.error("--sample must be at least 2")
    return args


def describe(store):
    record = store.pca_record
    if record is None:
        return f"{store.path}: no PCA store (search re-ranks by fc7)"
    return (f"{store.path}: PCA store {record['rows']} ({record['dim']} values per image, "
            f"{'whitened, ' if record['whiten'] else ''}{record['dtype']}), projection "
            f"{record['projection']} learned on {record['sample']} rows, keeping "
            f"{100 * record['explained']:.1f}% of their variance")


def main(argv=None):
    args = parse_args(argv)
    from dlbhc.search.pca import Projection
    from dlbhc.store.database import FeatureStore
    readonly = args.info
    with FeatureStore.open(args.db, readonly=readonly) as store:
        if args.info:
            print(describe(store))
            if store.pca_record:
                store.projection()   # checks the files against the metadata
                print(json.dumps(store.pca_record, indent=1))
            return 0
        if args.remove:
            gone = store.remove_pca()
            print(f"{store.path}: PCA store removed ({', '.join(gone) or 'no files'})")
            return 0
        dtype = "float16" if args.float16 else "float32"
        record = store.pca_record
        if args.pca is not None and record and not args.replace \
                and (record["dim"], record["whiten"], record["dtype"]) == (args.pca, args.whiten, dtype):
            print(describe(store) + "\n(already there: --replace learns it again)")
            return 0
        start = time.monotonic()
        if args.projection:
            projection = Projection.load(args.projection)
        else:
            print(f"learning PCA-{args.pca}{' (whitened)' if args.whiten else ''} on "
                  f"{min(args.sample, store.count)} of {store.count} fc7 rows", file=sys.stderr)
            projection = store.learn_projection(args.pca, whiten=args.whiten,
                                                sample=args.sample, seed=args.seed)
        learned = time.monotonic() - start
        if record:
            print(f"replacing the PCA store {record['rows']}", file=sys.stderr)
        store.add_pca(projection, dtype=dtype)
        print(describe(store))
        print(f"learned in {learned:.1f} s, projected {store.count} images in "
              f"{time.monotonic() - start - learned:.1f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
