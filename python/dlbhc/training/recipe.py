"""The steps every training recipe has, and the run that chains them.

A recipe turns a request (a net, its bits, the data) into a trained model in
its own run folder. Every recipe answers the same five questions, and
Recipe.run() asks them in order around one `caffe train`:

    prepare_data()      make or check the data the run's nets read
                        (LMDBs, cached features); returns seconds spent
    write_prototxts()   the run's train_val / deploy copies and its
                        solver.prototxt: (solver path, SolverParameter)
    weights_args()      `caffe train` arguments that start it from weights
                        (-weights, -snapshot) or nothing (from scratch)
    final_weights()     after training: the model's weights file (a link to
                        the last snapshot, or weights merged from several)
    preprocessing()     the input preprocessing the model was trained with,
                        recorded beside the weights (preprocessing.json) so
                        extract.py and retrieve.py need no --mean
    held_out()          (deploy prototxt, labelled list of held-out images,
                        labelled list of training images or None): on them
                        the head is refitted to the final features when that
                        ranks better (headfit.py), then the fine stage is
                        chosen (held-out querying training images) and
                        recorded beside the weights (rerank.json,
                        finestage.py) for `--rerank auto` (closing_steps);
                        None: neither (fc7 re-rank)

and may add to the summary (summary_extra). The recipes are in recipes.py:
the checked-in CIFAR-10 nets, the small net on a collection, an ImageNet
backbone fine-tuned on a collection. A new recipe (a faster from-scratch
net, say) is one more subclass; one that trains without Caffe (an
unsupervised ITQ rotation) would implement run() itself and keep the run
folder's layout (summary, weights, preprocessing record).
"""
import json
import os
import time
from pathlib import Path

from ..datasets.datum import first_datum_height
from ..nets.caffe_env import PROJECT_ROOT
from ..nets.model import Preprocessing, default_resize, load_mean_bgr, write_preprocessing_record
from ..nets.protos import read_prototxt
from .caffe_train import run_caffe_train
from .finestage import record_fine_stage
from .headfit import FIT_SAMPLE, refit_head
from .prototxt import data_layers, layer_phase, project_path

SUMMARY_FILE = "train_summary.json"


def run_folder(runs_dir, name):
    """runs_dir/<name> (default runs/ in the project), made, absolute."""
    run_dir = Path(os.path.abspath(Path(runs_dir or PROJECT_ROOT / "runs") / name))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Recipe:
    """A training recipe (see the module docstring): subclasses set name,
    run_dir and gpu and implement the steps."""

    name = run_dir = gpu = None
    prep_note = ""
    # the most training images the closing head refit goes through the net
    head_fit_sample = FIT_SAMPLE

    def prepare_data(self):
        raise NotImplementedError

    def write_prototxts(self):
        raise NotImplementedError

    def weights_args(self):
        return []

    def final_weights(self, snapshot):
        raise NotImplementedError

    def preprocessing(self, solver):
        raise NotImplementedError

    def failed_hint(self):
        """Appended to the message of a failed `caffe train`."""
        return ""

    def summary_extra(self):
        return {}

    def held_out(self):
        return None

    def run(self):
        """Prepare, write, `caffe train`, record: the summary, also written
        to run_dir/train_summary.json."""
        started = time.monotonic()
        data_seconds = self.prepare_data()
        solver_file, solver = self.write_prototxts()
        cmd, summary = run_caffe_train(solver_file, solver.max_iter, self.run_dir,
                                       self.weights_args(), self.gpu,
                                       failed_hint=self.failed_hint)
        snapshot = self.run_dir / "snapshots" / f"{self.name}_iter_{solver.max_iter}.caffemodel"
        weights = self.final_weights(snapshot)
        if weights is not None:
            summary["weights"] = str(weights)
        prep = self.preprocessing(solver)
        if prep is not None:
            write_preprocessing_record(self.run_dir, prep, note=self.prep_note)
        held_out = self.held_out() if weights is not None else None
        if held_out is not None:
            deploy, held_out_list, train_list = held_out
            summary.update(closing_steps(self.run_dir, deploy, weights, held_out_list,
                                         train_list, gpu=self.gpu,
                                         fit_sample=self.head_fit_sample))
        summary.update(net=self.name, max_iter=solver.max_iter, command=cmd)
        if data_seconds is not None:
            summary.update(data_seconds=round(data_seconds, 1),
                           train_seconds=summary["seconds"],
                           total_seconds=round(time.monotonic() - started, 1))
        summary.update(self.summary_extra())
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary


def closing_steps(run_dir, deploy, weights, held_out_list, train_list, gpu=None,
                  fit_sample=FIT_SAMPLE):
    """The last steps of every run with labelled held-out images: the head
    refitted on the trained net's features (headfit.refit_head: kept only
    when it ranks the held-out images better), then the fine stage chosen
    for the weights as they are now (finestage.record_fine_stage). Returns
    what they add to the run's summary. fit_sample: the most training
    images the head is fitted on."""
    added = {}
    refit = refit_head(run_dir, deploy, weights, train_list, held_out_list, gpu=gpu,
                       fit_sample=fit_sample)
    if refit is not None:
        added["head_refit"] = {k: refit[k] for k in (
            "kept", "coarse_before", "coarse_after", "accuracy_after", "seconds")}
    record = record_fine_stage(run_dir, deploy, weights, held_out_list, gpu=gpu,
                               database=train_list)
    if record is not None:
        added["rerank"] = {k: record[k] for k in ("choice", "coarse", "map_at_k")}
    return added


def train_val_preprocessing(train_val, crop):
    """model.Preprocessing of a train_val's TEST-phase Data layer: its mean
    (mean_value, or the per-channel mean of its mean_file) and, for resize,
    the size of the images its LMDB holds (the first record's)."""
    net = read_prototxt(train_val, "NetParameter")
    data = data_layers(net)
    test = [layer for layer in data if layer_phase(layer) == "TEST"] or data
    if not test:
        return None
    transform = test[0].transform_param
    if transform.mean_value:
        values = list(transform.mean_value)
        mean = tuple(values * 3 if len(values) == 1 else values)
    elif transform.mean_file:
        mean = load_mean_bgr(project_path(transform.mean_file))
    else:
        mean = (0.0, 0.0, 0.0)
    resize = (first_datum_height(project_path(test[0].data_param.source))
              or default_resize(crop))
    return Preprocessing(resize=int(resize), crop=int(crop), mean_bgr=tuple(mean))
