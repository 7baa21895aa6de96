#!/usr/bin/env python3
"""Train (or fine-tune) a hashing net with `caffe train`; shows it/s and ETA.

Your own collection (a folder of class subfolders, or `path label` lines;
a folder without class subfolders, or --unsupervised, gets codes without
labels: ITQ on the backbone's pooled features, see docs/training.md):

    python python/train.py --data photos/                        # EfficientNet-Lite0, 48 bits, CPU
    python python/train.py --data photos/ --bits 128 --net cifar # the small net from scratch
    python python/train.py --data train.txt --test test.txt --size 160 --epochs 5

This writes runs/<net>_hash<bits>_<collection>/ with the class names, the
train/test lists (10% of each class held out unless --test is given), the
run's prototxts (the classifier sized to the classes), the trained weights,
their preprocessing.json, and prints the extract/retrieve/evaluate commands.
On the CPU the backbone's layers below --split are frozen: their output is
computed once (with mirror images) and cached under data/features/, and
`caffe train` fine-tunes the layers above it. With --gpu the whole net is
fine-tuned on image LMDBs.

The checked-in CIFAR-10 nets (without --data):

    python python/train.py --net cifar --bits 48                 # small net, CPU, from scratch
    python python/train.py --net alexnet --bits 48 --gpu 0 \
        --weights models/bvlc_alexnet/bvlc_alexnet.caffemodel    # the paper's fine-tuning
    python python/train.py --net cifar --bits 48 --resume auto   # continue after a stop
    python python/train.py --net fast --bits 48 --epochs 10      # the fast recipe (pycaffe)

Outputs go to runs/<net>_hash<bits>/ (--runs-dir moves runs/): train.log,
snapshots/, the final <net>_hash<bits>.caffemodel, train_summary.json and the
solver.prototxt it trained with.

The nets read their LMDBs (and AlexNet's mean file) from data/cifar10/, as
`make data` / `make data-alexnet` write them. --data-dir DIR reads the same
file names from DIR instead (e.g. cifar10_train_32pad4_lmdb and
cifar10_test_32_lmdb for the small net): the run folder then also gets its
own train_val.prototxt with those paths, which its solver.prototxt uses.
"""
from pathlib import Path

from dlbhc import cli
from dlbhc.datasets.collection import DEFAULT_TEST_FRACTION
from dlbhc.nets.backbones import DEFAULT_BACKBONE
from dlbhc.training.frozen import FEATURE_WORKERS
from dlbhc.training.fast import FAST_NET
from dlbhc.training.recipes import DEFAULT_SPLIT, SMALL_NET

# In the project's models/ folder, wherever train.py is started from.
DEFAULT_WEIGHTS = {"alexnet": str(Path(__file__).resolve().parents[1] / "models" / "bvlc_alexnet"
                                  / "bvlc_alexnet.caffemodel")}
# Options of one mode only: given in the other, they are refused by name
# (rather than silently dropped).
CHECKED_IN_ONLY = ("--weights", "--resume", "--data-dir")


def main(argv=None):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--net", default=None,
                   help=f"{SMALL_NET} (small net, default without --data), {FAST_NET} (the fast "
                        f"from-scratch recipe for small images), alexnet, or a "
                        f"backbone ({DEFAULT_BACKBONE}, default with --data)")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--max-iter", type=int, help="shorter/longer schedule; steps scale alike")
    p.add_argument("--runs-dir", help="where run folders go (default runs/)")
    cli.add_gpu_argument(p)
    checked_in = p.add_argument_group("the checked-in CIFAR-10 nets (without --data)")
    checked_in.add_argument("--weights", help="initial weights (-weights); AlexNet default: "
                            + DEFAULT_WEIGHTS["alexnet"])
    checked_in.add_argument("--resume", help="a .solverstate, or 'auto' for the latest snapshot")
    checked_in.add_argument("--data-dir", metavar="DIR",
                            help="read the training/test LMDBs and mean file from DIR, under "
                                 "the names the checked-in train_val uses (default: "
                                 "data/cifar10/)")
    own_group = p.add_argument_group("your own collection (--data)")
    collection_only = []

    def own(*flags, **options):
        collection_only.append(flags[0])
        return own_group.add_argument(*flags, **options)
    own("--data", metavar="FOLDER_OR_LIST",
                     help="train on these images: class subfolders, or `path label` lines "
                          "(labels: numbers or class names)")
    own("--test", metavar="FOLDER_OR_LIST",
                     help="test images (default: hold out --test-fraction of each class)")
    own("--test-fraction", type=float,
                     help=f"share of each class held out (default {DEFAULT_TEST_FRACTION})")
    own("--root", help="folder the lists' relative paths start from")
    own("--name", help="run folder name (default <net>_hash<bits>_<collection>)")
    own("--size", type=int, help="backbone input side, a multiple of 32 "
                     "(default 224)")
    own("--resize", type=int, help="squash-resize before the centre crop "
                     "(default 8/7 of --size)")
    own("--split", default=None, help=f"CPU: blob below which the backbone "
                     f"is frozen and cached (default {DEFAULT_SPLIT}; e.g. b10, head; none: "
                     "the whole net is trained, the default with --gpu)")
    own("--epochs", type=float, help="passes over the training data "
                     "(default 10; --max-iter wins)")
    own("--batch-size", type=int)
    own("--base-lr", type=float)
    own("--no-flips", action="store_true",
                     help="do not cache mirror images' features (half the caching time)")
    own("--workers", type=int,
                     help=f"processes computing features (default {FEATURE_WORKERS})")
    own("--cache-dir", help="where cached features go (default data/features)")
    own("--unsupervised", action="store_true",
        help="codes without labels (ITQ on the backbone's pooled features; the default for "
             "a folder without class subfolders): labels, if any, are not used")
    args = p.parse_args(argv)
    given = lambda options: [o for o in options
                             if getattr(args, o.lstrip("-").replace("-", "_")) not in (None, False)]
    if args.data:
        wrong = given(CHECKED_IN_ONLY)
        if wrong:
            one = len(wrong) == 1
            p.error(f"{', '.join(wrong)} {'does' if one else 'do'} not apply with --data "
                    f"(training on your own collection): {'it is' if one else 'they are'} "
                    "for the checked-in CIFAR-10 nets")
        from dlbhc.training.recipes import train_collection
        summary = train_collection(
            args.data, net=args.net or DEFAULT_BACKBONE, bits=args.bits, test=args.test,
            root=args.root, runs_dir=args.runs_dir, name=args.name, size=args.size,
            resize=args.resize, split=args.split or DEFAULT_SPLIT, epochs=args.epochs,
            max_iter=args.max_iter, batch_size=args.batch_size, base_lr=args.base_lr,
            flips=not args.no_flips, gpu=args.gpu,
            workers=FEATURE_WORKERS if args.workers is None else args.workers,
            cache_dir=args.cache_dir,
            test_fraction=(DEFAULT_TEST_FRACTION if args.test_fraction is None
                           else args.test_fraction), unsupervised=args.unsupervised)
        if summary.get("method") == "itq":
            print(f"codes without labels ({summary['net']}): ITQ, {summary['bits']} bits, "
                  f"{summary['images']} images ({summary['skipped']} skipped) in "
                  f"{summary['total_seconds']:.0f} s")
            print(f"weights: {summary['weights']}")
            return 0
        print(f"trained {summary['net']}: {summary['iterations']} iterations, data "
              f"{summary['data_seconds']:.0f} s + training {summary['train_seconds']:.0f} s, "
              f"test {summary['test']}")
        print(f"weights: {summary['weights']}")
        return 0
    # the fast recipe takes --epochs without --data too
    wrong = [o for o in given(collection_only) if not (args.net == FAST_NET and o == "--epochs")]
    if wrong:
        p.error(f"{', '.join(wrong)} {'needs' if len(wrong) == 1 else 'need'} --data "
                "(your own collection); the checked-in CIFAR-10 nets take --net, --bits, "
                "--max-iter, --runs-dir, --gpu, " + ", ".join(CHECKED_IN_ONLY))
    from dlbhc.training.recipes import train
    args.net = args.net or SMALL_NET
    weights = args.weights or (None if args.resume else DEFAULT_WEIGHTS.get(args.net))
    summary = train(args.net, args.bits, weights=weights, max_iter=args.max_iter,
                    gpu=args.gpu, resume=args.resume, runs_dir=args.runs_dir,
                    data_dir=args.data_dir, epochs=args.epochs)
    if args.net == FAST_NET:
        print(f"trained {summary['net']}: {summary['iterations']} steps, data "
              f"{summary['data_seconds']:.0f} s + training {summary['train_seconds']:.0f} s, "
              f"test accuracy {summary['test_accuracy']}")
        print(f"weights: {summary['weights']}")
        return 0
    print(f"trained {summary['net']}: {summary['iterations']} iterations in "
          f"{summary['seconds']:.0f} s ({summary['seconds_per_iter']} s/iter), "
          f"final loss {summary['final_loss']}, test {summary['test']}")
    if "weights" in summary:
        print(f"weights: {summary['weights']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
