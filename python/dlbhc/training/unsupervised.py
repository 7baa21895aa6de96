"""Codes for a collection without labels: ITQ on the backbone's pooled features.

`make train DATA=FOLDER` on a folder without class subfolders (or
train.py --data ... --unsupervised on any collection) trains nothing with
Caffe. The backbone's frozen net, cut after its pooled features (the blob
fc7, BatchNorm folded), runs once over every image (training.frozen's
workers); ITQ (search.itq: PCA to the code length, then an iteratively
learned rotation, numpy, seeded) is fitted on those features and written
into the deploy net as its latent InnerProduct layer (weights = (PCA x
rotation)^T, bias = -mean (PCA x rotation)), followed by the net's Sigmoid:
the code is latent > 0.5, exactly the sign of the ITQ projection, so
extract.py, retrieve.py, the service and Milvus run the model as any other.

The fitting lives in search.itq (numpy only, beside the other code formats,
so the benchmark compares it with LSH and PCA-sign without a net); this
module is the recipe around it. The run folder has the same layout as a
supervised run's: deploy.prototxt (no classifier), <name>.caffemodel,
preprocessing.json, train.txt (every image used), train_summary.json with
the commands to use the model.
"""
import json
import os
import tempfile
import time
from pathlib import Path


from ..datasets.collection import Collection, load_unlabelled, write_list
from ..errors import UserError
from ..images import write_skipped_list
from ..nets.caffe_env import import_caffe
from ..nets.model import FEATURE_BLOB, LATENT_BLOB, write_preprocessing_record
from ..nets.records import write_rerank_record
from ..nets.protos import read_prototxt
from ..report import get_logger
from ..search.choice import UNMEASURED_STAGE
from ..search.itq import DEFAULT_ITERATIONS, fit_itq
from . import frozen
from .prototxt import latent_layer_name, set_input, write_net
from .recipe import SUMMARY_FILE, run_folder
from .recipes import BackboneRecipe, collection_name
from .solver import run_name

log = get_logger(__name__)

UNLABELLED = "unlabelled"


def deploy_without_classifier(net_param):
    """The deploy NetParameter up to the LATENT_BLOB Sigmoid (nothing to
    classify without labels)."""
    last = max(i for i, layer in enumerate(net_param.layer) if LATENT_BLOB in layer.top)
    del net_param.layer[last + 1:]
    return net_param


class UnsupervisedRecipe(BackboneRecipe):
    """ITQ codes on the backbone's pooled features (module docstring)."""

    def __init__(self, net, bits, items, run_dir, name, seed=0, size=None, resize=None,
                 workers=frozen.FEATURE_WORKERS, iterations=DEFAULT_ITERATIONS):
        coll = Collection(items, [], [UNLABELLED], [])
        super().__init__(net, bits, coll, run_dir, name, None, seed, size=size, resize=resize,
                         split=FEATURE_BLOB, flips=False, workers=workers)
        self.iterations = iterations
        deploy = deploy_without_classifier(
            set_input(read_prototxt(self.template_deploy), self.prep.crop, 10))
        self.latent_layer = latent_layer_name(deploy)
        write_net(deploy, self.deploy, f"{name}: {self.template_deploy.name} without the "
                  f"classifier, {self.prep.crop}x{self.prep.crop} input, its latent layer "
                  "ITQ on the pooled features (python/train.py --unsupervised)")

    def pooled_features(self, folder):
        """(features (n, D), indices into the items, skipped) of every image."""
        net = frozen.frozen_net(self.deploy, FEATURE_BLOB)
        set_input(net, self.prep.crop, 25)
        folded, params = frozen.fold_batchnorm(net, frozen.net_params(self.deploy,
                                                                       self.backbone))
        prototxt, weights = frozen.net_with_params(folded, params, folder, "pooled")
        return frozen.compute_features(self.coll.train, prototxt, weights, self.prep,
                                       workers=self.workers, label="pooled features")

    def write_weights(self, hash_):
        """The deploy net's caffemodel: the backbone's layers, the ITQ latent."""
        caffe = import_caffe()
        net = caffe.Net(str(self.deploy), caffe.TEST)
        net.copy_from(str(self.backbone))
        weights, bias = hash_.latent_layer()
        layer = net.params[self.latent_layer]
        layer[0].data[...] = weights.reshape(layer[0].data.shape)
        layer[1].data[...] = bias.reshape(layer[1].data.shape)
        out = self.run_dir / f"{self.name}.caffemodel"
        tmp = out.with_name(out.name + ".partial")
        net.save(str(tmp))
        os.replace(tmp, out)
        return out

    def run(self):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.run_dir) as folder:
            features, kept, skipped = self.pooled_features(Path(folder))
        write_skipped_list(self.run_dir / "train", skipped, "the unsupervised training")
        if len(kept) < 2:
            raise UserError(f"only {len(kept)} of {len(self.coll.train)} images could be "
                            "read: codes without labels take at least 2 (see the messages "
                            "above)")
        if self.bits > features.shape[1]:
            raise UserError(f"--bits {self.bits}: ITQ codes have at most as many bits as the "
                            f"pooled features have values ({features.shape[1]})")
        feature_seconds = time.monotonic() - started
        hash_ = fit_itq(features, self.bits, iterations=self.iterations, seed=self.seed)
        log.info("ITQ, %d bits on %d pooled features of %d values: quantisation loss %.1f -> "
                 "%.1f in %d iterations", self.bits, len(features), features.shape[1],
                 hash_.losses[0], hash_.losses[-1], len(hash_.losses))
        self.final = self.write_weights(hash_)
        write_preprocessing_record(self.run_dir, self.prep, note=self.prep_note)
        # No labels, so nothing to measure the fine stages on: the record
        # keeps search.choice's UNMEASURED_STAGE, the query's latent against
        # the codes. For ITQ codes benchmarks/bench_unsupervised.py measured
        # it above the Hamming order at every length on CIFAR-10 and the
        # photo set, and the best stage at 48 and 128 bits but for 0.0016;
        # the latent re-rank fell below the Hamming order on the photo set
        # (48 and 128 bits), and at 12 bits on CIFAR-10 the pooled features'
        # L2 (50,000 images) or the latent (10,000) rank best.
        write_rerank_record(self.run_dir, {
            "choice": UNMEASURED_STAGE, "measured": False,
            "reason": "codes without labels: the query's latent against the codes, which "
                      "benchmarks/bench_unsupervised.py measured above the Hamming order at "
                      "every length"})
        used = [self.coll.train[i] for i in kept]
        train_list = write_list(self.run_dir / "train.txt", used)
        summary = {"net": self.name, "method": "itq", "bits": self.bits,
                   "backbone": self.net, "images": len(used), "skipped": len(skipped),
                   "feature_dim": int(features.shape[1]), "iterations": len(hash_.losses),
                   "quantisation_loss": [round(hash_.losses[0], 3), round(hash_.losses[-1], 3)],
                   "seed": self.seed, "preprocessing": self.prep.as_dict(),
                   "weights": str(self.final), "deploy": str(self.deploy),
                   "data_seconds": round(feature_seconds, 1),
                   "total_seconds": round(time.monotonic() - started, 1),
                   "commands": unsupervised_commands(self.run_dir, self.final, train_list)}
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary


def unsupervised_commands(run_dir, weights, train_list):
    """The extract / retrieve / serve commands for an unsupervised run."""
    rel = lambda p: os.path.relpath(p, os.getcwd()) if str(p).startswith(os.getcwd()) else str(p)
    db = rel(run_dir / "db.lmdb")
    return [
        f"python python/extract.py {rel(train_list)} --deploy {rel(run_dir / 'deploy.prototxt')} "
        f"--weights {rel(weights)} --out {db}",
        f"python python/retrieve.py QUERY.jpg --db {db} --montage results.png",
        f"python python/serve.py --db {db}",
    ]


def train_unsupervised(data, net, bits=48, root=None, runs_dir=None, name=None, size=None,
                       resize=None, workers=frozen.FEATURE_WORKERS, seed=1,
                       iterations=DEFAULT_ITERATIONS):
    """ITQ codes for the images of `data` (a folder or list; labels, if any,
    unused) in runs_dir/<name>/; returns the summary (train_summary.json)."""
    items = load_unlabelled(data, root=root)
    name = name or f"{run_name(net, bits)}_{collection_name(data)}_itq"
    run_dir = run_folder(runs_dir, name)
    log.info("%d images without labels: codes by ITQ on %s's pooled features -> %s",
             len(items), net, run_dir)
    summary = UnsupervisedRecipe(net, bits, items, run_dir, name, seed=seed, size=size,
                                 resize=resize, workers=workers, iterations=iterations).run()
    log.info("\nCodes learned. Build the database and search it with:\n  %s",
             "\n  ".join(summary["commands"]))
    return summary
