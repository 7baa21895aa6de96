"""Training: hashing nets trained with Caffe's own `caffe train`, or
stepped through pycaffe where Caffe's solver lacks what a recipe needs.

A training run is a recipe (recipe.Recipe: prepare the data, write the run's
prototxts and solver, the starting weights, `caffe train`, the final weights
and their preprocessing record) carried out in its own run folder
(runs/<name>/), whose train.log, learning curve, summary and prototxts let
the run be read and repeated with Caffe alone.

Modules:
    recipe       the Recipe protocol and its run(); the preprocessing a
                 train_val's TEST Data layer implies
    recipes      the recipes: the checked-in CIFAR-10 nets (train), the small
                 net and an ImageNet backbone on a user's collection
                 (train_collection)
    solver       the one solver writer: a checked-in solver adapted to a run
                 (schedule scaled, device, snapshots, test set)
    prototxt     the one place Data layers are built or rewritten (DataLayer,
                 set_data_layers, move_data_files), and a net sized for a run
                 (classes, input)
    caffe_train  running `caffe train`: command, train.log, progress, final
                 weights link, resuming
    caffe_log    Caffe's log parsed into the per-iteration train/test curve
                 (as tools/extra/parse_log.py), written as CSV
    frozen       a backbone's frozen lower layers: cut, BatchNorm folded,
                 features cached, joined with the trained top
    headfit      the latent layer and classifier fitted again on the trained
                 net's features, kept when held-out images rank better
                 (head_refit.json)
    finestage    the run's last step: the fine stage chosen on the held-out
                 images (search.choice) and recorded (rerank.json)
    unsupervised codes without labels: ITQ (search.itq) on the backbone's
                 pooled features, written into the net's latent layer
    fast_schedule  the fast recipe's settings and the choices made from the
                 collection (its batch, the kept weights and flip averaging)
    fast         the fast from-scratch recipe for small images (--net fast):
                 pycaffe forward/backward, checkpoints per epoch, BatchNorm
                 re-measured, flip-averaged test accuracy
    sgd          the update applied in numpy to a pycaffe net: Caffe's
                 Nesterov step, the warm-up-then-decay schedule, weight
                 averaging
    augment      augmented batches in memory (alternating flips, translation)
    whitening    the frozen patch-whitening filters of the fast net's first layer

Caffe is imported only inside the functions that need it.
"""
from .caffe_log import CaffeLog, parse_log
from .augment import AugmentedBatches
from .fast import FAST_NET, FastRecipe, train_fast
from .fast_schedule import FastSchedule
from .frozen import FEATURE_WORKERS, cache_features
from .headfit import Head, fit_head, refit_head
from .prototxt import DataLayer, Phases, data_layer_pair, move_data_files, set_data_layers
from .recipe import Recipe
from .recipes import (DEFAULT_SPLIT, BackboneRecipe, CheckedInRecipe, SmallNetRecipe, train,
                      train_collection)
from .sgd import NesterovSGD, WeightAverage, triangle_lr
from .solver import DEFAULT_EPOCHS, write_solver
from .unsupervised import UnsupervisedRecipe, train_unsupervised
from .whitening import whitening_filters

__all__ = [
    "DEFAULT_EPOCHS", "DEFAULT_SPLIT", "FAST_NET", "FEATURE_WORKERS",
    "AugmentedBatches", "BackboneRecipe", "CaffeLog", "CheckedInRecipe", "DataLayer",
    "FastRecipe", "FastSchedule", "Head", "NesterovSGD", "Phases", "Recipe", "SmallNetRecipe",
    "UnsupervisedRecipe", "WeightAverage",
    "cache_features", "data_layer_pair", "fit_head", "move_data_files", "parse_log",
    "refit_head", "set_data_layers", "train", "train_collection", "train_fast",
    "train_unsupervised", "triangle_lr", "whitening_filters", "write_solver",
]
