#!/usr/bin/env python3
"""Train (or fine-tune) a hashing net with `caffe train`; shows it/s and ETA.

    python python/train.py --net cifar --bits 48                 # small net, CPU, from scratch
    python python/train.py --net alexnet --bits 48 --gpu 0 \
        --weights models/bvlc_alexnet/bvlc_alexnet.caffemodel    # the paper's fine-tuning
    python python/train.py --net cifar --bits 48 --resume auto   # continue after a stop

Outputs go to runs/<net>_hash<bits>/ (--runs-dir moves runs/): train.log,
snapshots/, the final <net>_hash<bits>.caffemodel, train_summary.json and the
solver.prototxt it trained with.

The nets read their LMDBs (and AlexNet's mean file) from data/cifar10/, as
`make data` / `make data-alexnet` write them. --data-dir DIR reads the same
file names from DIR instead (e.g. cifar10_train_32pad4_lmdb and
cifar10_test_32_lmdb for the small net): the run folder then also gets its
own train_val.prototxt with those paths, which its solver.prototxt uses.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlbhc.caffe_env import add_gpu_argument  # noqa: E402
from dlbhc.errors import run_main  # noqa: E402

# In the project's models/ folder, wherever train.py is started from.
DEFAULT_WEIGHTS = {"alexnet": str(Path(__file__).resolve().parents[1] / "models" / "bvlc_alexnet"
                                  / "bvlc_alexnet.caffemodel")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cifar", "alexnet"], default="cifar")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--weights", help="initial weights (-weights); AlexNet default: "
                   + DEFAULT_WEIGHTS["alexnet"])
    p.add_argument("--max-iter", type=int, help="shorter/longer schedule; steps scale alike")
    p.add_argument("--resume", help="a .solverstate, or 'auto' for the latest snapshot")
    p.add_argument("--runs-dir", help="where run folders go (default runs/)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="read the training/test LMDBs and mean file from DIR, under the "
                        "names the checked-in train_val uses (default: data/cifar10/)")
    add_gpu_argument(p)
    args = p.parse_args(argv)
    from dlbhc.training import train
    weights = args.weights or (None if args.resume else DEFAULT_WEIGHTS.get(args.net))
    summary = train(args.net, args.bits, weights=weights, max_iter=args.max_iter,
                    gpu=args.gpu, resume=args.resume, runs_dir=args.runs_dir,
                    data_dir=args.data_dir)
    print(f"trained {summary['net']}: {summary['iterations']} iterations in "
          f"{summary['seconds']:.0f} s ({summary['seconds_per_iter']} s/iter), "
          f"final loss {summary['final_loss']}, test {summary['test']}")
    if "weights" in summary:
        print(f"weights: {summary['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
