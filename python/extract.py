#!/usr/bin/env python3
"""Extract fc7 features and binary hash codes of a whole image collection.

    python python/extract.py IMAGES --deploy prototxt/cifar_hash48_deploy.prototxt \
        --weights runs/cifar_hash48/cifar_hash48.caffemodel --out db/cifar10_train_48.lmdb

The preprocessing (mean, resize) is the one train.py recorded beside the
weights (preprocessing.json); --mean is needed only for weights without one.

IMAGES is a folder (recursive; class subfolders give labels) or a list file
of `path [label]` lines. With --ray [ADDRESS] the same job runs on a Ray
cluster (a local one without ADDRESS): shards on actors that each hold one
net, merged into OUT in input order. Rerunning the same command adds only what is new;
after an interrupted run it finishes the job. Unreadable images are listed in
OUT.skipped.tsv and the exit status is 3 (0 when every image was stored).

A collection that changes (ids are stable: never reused, kept by compaction):
    python python/extract.py FOLDER --out DB --sync ...  add new files, re-extract
        changed ones (size or mtime differ) in place of their record, remove vanished
        ones; resumable, and a rerun on an unchanged folder changes nothing
    python python/extract.py --remove ID_OR_PATH... --out DB   remove images
    python python/extract.py --compact --out DB   rewrite DB without removed rows
"""
import sys

from dlbhc import cli
from dlbhc.extraction import DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_WORKERS
from dlbhc.store import BACKENDS, DEFAULT_BACKEND, DEFAULT_FC7_DTYPE

EXIT_SKIPPED = 3
LOCAL_RAY = "local"


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("images", nargs="?",
                   help="image folder or list file of `path [label]` lines")
    p.add_argument("--root", help="folder that relative paths of a list file start from")
    p.add_argument("--deploy", help="deploy prototxt (blobs fc7 and latent)")
    p.add_argument("--weights", help="trained .caffemodel")
    p.add_argument("--mean", default=None,
                   help="training mean: .npy, .binaryproto, or B,G,R values (default: the "
                        "preprocessing.json train.py wrote beside the weights; a mean "
                        "contradicting it is refused)")
    p.add_argument("--resize", type=int, default=None,
                   help="squash-resize size before the centre crop (default: the recorded "
                        "one, else 256 for a 227 input, else the input size) - must match "
                        "the training data")
    p.add_argument("--out", required=True, help="feature database to create or extend")
    p.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND)
    p.add_argument("--float16", action="store_true", help="store fc7 as float16 (half the size)")
    p.add_argument("--batch-size", type=cli.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images per net forward (default %(default)s)")
    p.add_argument("--workers", type=cli.non_negative_int, default=DEFAULT_WORKERS,
                   help="worker processes (default %(default)s; 0: all in the main process); "
                        "on the CPU 2 or "
                        "more also run one single-threaded net each (unless --blas-threads), "
                        "else they only decode")
    p.add_argument("--blas-threads", type=cli.positive_int, default=None, metavar="N",
                   help="run the CPU forward once, in the main process, with N BLAS threads "
                        "(default with one worker: the first batches try all threads and "
                        "one while the worker decodes, and keep the faster)")
    p.add_argument("--commit-every", type=float, default=DEFAULT_COMMIT_SECONDS,
                   metavar="SECONDS",
                   help="commit finished batches to the database at most this often "
                        "(default %(default)s; 0 = every batch); a crash loses at most that "
                        "much work")
    p.add_argument("--shard", help="I/N: process only every N-th image starting at I")
    p.add_argument("--merge", nargs="+", metavar="SHARD_DB",
                   help="instead of extracting, merge these shard databases into --out")
    p.add_argument("--limit", type=int, help="only the first N images (for trials)")
    p.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                   help="extract on a Ray cluster (ADDRESS: its head, e.g. 10.0.0.5:6379, "
                        "or auto); without ADDRESS a local Ray starts on this machine. "
                        "Shards on actors holding one net each (--gpu: one GPU per actor), "
                        "merged into --out in input order; rerun to finish after a crash "
                        "(--workers and --blas-threads do not apply)")
    p.add_argument("--ray-actors", type=cli.positive_int, metavar="N",
                   help="actors (default: one per CPU of the cluster, or per GPU with --gpu)")
    p.add_argument("--ray-shard-size", type=cli.positive_int, metavar="N",
                   help="images per shard (default: about 16 shards per actor)")
    p.add_argument("--sync", action="store_true",
                   help="keep --out in step with IMAGES: add new files, re-extract changed "
                        "ones, remove vanished ones")
    p.add_argument("--remove", nargs="+", metavar="ID_OR_PATH",
                   help="instead of extracting, remove these images (ids or file paths)")
    p.add_argument("--compact", action="store_true",
                   help="instead of extracting, rewrite --out without its removed images")
    cli.add_gpu_argument(p)
    args = p.parse_args(argv)
    if args.remove or args.compact:
        if args.images or args.sync or args.merge or args.ray:
            p.error("--remove and --compact take only --out")
        return args
    if not (args.images and args.deploy and args.weights):
        p.error("IMAGES, --deploy and --weights are needed to extract")
    if args.sync and (args.ray or args.shard or args.merge or args.limit):
        p.error("--sync runs on one machine over the whole collection: leave out "
                "--ray/--shard/--merge/--limit")
    if args.ray and (args.shard or args.merge):
        p.error("--ray shards and merges by itself: leave out --shard/--merge")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.remove:
        from dlbhc.extraction import remove_images
        ids = remove_images(args.out, args.remove)
        print(f"{args.out}: removed {len(ids)} images (ids {_ids_shown(ids)})")
        return 0
    if args.compact:
        from dlbhc.store import compact
        before, after = compact(args.out)
        print(f"{args.out}: {before} rows -> {after} (ids unchanged)")
        return 0
    if args.merge:
        from dlbhc.store import merge
        merge(args.merge, args.out, backend=args.backend)
        print(f"merged {len(args.merge)} shards into {args.out}")
        return 0
    from dlbhc.nets.model import HashNet
    from dlbhc.images import skipped_list_path
    from dlbhc.extraction.pipeline import extract, parse_shard
    shard = parse_shard(args.shard)
    fc7_dtype = "float16" if args.float16 else DEFAULT_FC7_DTYPE
    net = HashNet(args.deploy, args.weights, args.mean, gpu=args.gpu, resize=args.resize)
    if args.sync:
        from dlbhc.extraction import sync
        report = sync(args.images, net, args.out, root=args.root, batch_size=args.batch_size,
                      workers=args.workers, backend=args.backend, fc7_dtype=fc7_dtype,
                      commit_seconds=args.commit_every, blas_threads=args.blas_threads)
        print(f"{args.out}: {report.summary()}")
        if report.skipped:
            print(f"skipped images are listed in {skipped_list_path(args.out)}",
                  file=sys.stderr)
            return EXIT_SKIPPED
        return 0
    if args.ray:
        from dlbhc.scale.ray_extract import extract_on_ray
        report = extract_on_ray(args.images, net, args.out,
                                address=None if args.ray == LOCAL_RAY else args.ray,
                                root=args.root, batch_size=args.batch_size,
                                backend=args.backend,
                                fc7_dtype=fc7_dtype, limit=args.limit,
                                commit_seconds=args.commit_every,
                                actors=args.ray_actors, shard_size=args.ray_shard_size)
    else:
        report = extract(args.images, net, args.out, root=args.root, batch_size=args.batch_size,
                         workers=args.workers, backend=args.backend,
                         fc7_dtype=fc7_dtype,
                         shard=shard, limit=args.limit, commit_seconds=args.commit_every,
                         blas_threads=args.blas_threads)
    print(f"{args.out}: stored {report.stored} new images ({report.rate:.1f} img/s), "
          f"{report.already} were already there, {len(report.skipped)} skipped "
          f"({net.bits} bits, fc7 {net.fc7_dim})")
    if report.forward_mode:
        print(report.forward_mode)
    if report.skipped:
        print(f"skipped images are listed in {skipped_list_path(args.out)}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def _ids_shown(ids, most=10):
    shown = " ".join(str(int(i)) for i in ids[:most])
    return shown + (f" ... {len(ids) - most} more" if len(ids) > most else "")


if __name__ == "__main__":
    cli.run(main)
