#!/usr/bin/env python3
"""Fit a trained model's head again to its final features, then choose its
fine stage again: the closing steps train.py runs, for a model trained
before they existed (or to repeat them).

    python python/refit_head.py runs/demo/cifar_hash48/cifar_hash48.caffemodel \\
        --deploy prototxt/cifar_hash48_deploy.prototxt
    python python/refit_head.py runs/fast_hash48/fast_hash48.caffemodel   # deploy.prototxt beside it
    python python/refit_head.py W.caffemodel --deploy D.prototxt \\
        --train data/cifar10/train.txt --held-out data/cifar10/test.txt

A seeded sample of at most 50,000 training images (--fit-sample; train.py
takes 10,000 with an ImageNet backbone, whose forwards cost ~10x more) goes
through the net once each; the latent layer and the classifier are fitted to their fc7
(training/headfit.py); up to 5,000 held-out images judge the new head
against the old by coarse mAP, and the new one is written into the weights
only when it ranks strictly better. Then a copy of the weights as they
were stays beside them (<name>.before_refit.caffemodel, made before the
step and removed again when the weights did not change; a link to a
snapshot is replaced, the snapshot kept). Then the fine stage is chosen for
the weights as they are now (rerank.json). Both records go beside the
weights. Databases extracted with the old weights no longer match the
model (extract.py and retrieve.py say so): extract them again.

The lists default to those the model's rerank.json names (the run's
held-out and training lists); the preprocessing is the run's record
(preprocessing.json beside the weights).
"""
import shutil
from pathlib import Path

from dlbhc import cli
from dlbhc.errors import UserError
from dlbhc.nets.records import RERANK_FILE, read_rerank_record
from dlbhc.training.headfit import FIT_SAMPLE
from dlbhc.training.recipe import closing_steps


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("weights", help="the model's .caffemodel (in its run folder)")
    p.add_argument("--deploy", help="its deploy prototxt (default: deploy.prototxt beside "
                   "the weights)")
    p.add_argument("--train", help="`path label` list of the training images (default: the "
                   "one rerank.json names)")
    p.add_argument("--held-out", help="`path label` list of held-out images (default: the "
                   "one rerank.json names)")
    p.add_argument("--fit-sample", type=cli.positive_int, default=FIT_SAMPLE,
                   help="the most training images the head is fitted on (default %(default)s)")
    cli.add_gpu_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    weights = Path(args.weights)
    if not weights.is_file():
        raise UserError(f"weights {weights} do not exist")
    folder = weights.parent
    deploy = Path(args.deploy) if args.deploy else folder / "deploy.prototxt"
    if not deploy.is_file():
        raise UserError(f"deploy prototxt {deploy} does not exist: pass --deploy")
    named = read_rerank_record(folder) or {}
    train_list = args.train or named.get("database_list")
    held_out = args.held_out or named.get("held_out")
    if not train_list or not held_out:
        raise UserError(f"no {RERANK_FILE} beside {weights} names the run's lists: pass "
                        "--train and --held-out (`path label` lists)")
    for what, path in (("training list", train_list), ("held-out list", held_out)):
        if not Path(path).is_file():
            raise UserError(f"{what} {path} does not exist")
    backup = weights.with_name(f"{weights.stem}.before_refit{weights.suffix}")
    made_backup = not backup.exists()
    if made_backup:
        shutil.copyfile(weights, backup)        # follows a link: the bytes as they are now
    added = closing_steps(folder, deploy, weights, held_out, train_list, gpu=args.gpu,
                          fit_sample=args.fit_sample)
    refit = added.get("head_refit")
    if made_backup and not (refit and refit["kept"]):
        backup.unlink()                         # the weights did not change: no copy to keep
    if refit is None:
        print(f"{weights}: head not refitted (see above); weights unchanged")
    else:
        print(f"{weights}: held-out coarse mAP {refit['coarse_before']:.4f} -> "
              f"{refit['coarse_after']:.4f}: "
              + ("new head written; the weights before are in " + str(backup)
                 if refit["kept"] else "old head kept; weights unchanged"))
    if "rerank" in added:
        print(f"fine stage: {added['rerank']['choice']} ({folder / RERANK_FILE})")
    return 0


if __name__ == "__main__":
    cli.run(main)
