"""Training: hashing nets trained with Caffe's own `caffe train`.

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
    finestage    the run's last step: the fine stage chosen on the held-out
                 images (search.choice) and recorded (rerank.json)
    unsupervised codes without labels: ITQ (search.itq) on the backbone's
                 pooled features, written into the net's latent layer

Caffe is imported only inside the functions that need it.
"""
from .caffe_log import CaffeLog, parse_log
from .frozen import FEATURE_WORKERS, cache_features
from .prototxt import DataLayer, Phases, data_layer_pair, move_data_files, set_data_layers
from .recipe import Recipe
from .recipes import (DEFAULT_SPLIT, BackboneRecipe, CheckedInRecipe, SmallNetRecipe, train,
                      train_collection)
from .solver import DEFAULT_EPOCHS, write_solver
from .unsupervised import UnsupervisedRecipe, train_unsupervised

__all__ = [
    "DEFAULT_EPOCHS", "DEFAULT_SPLIT", "FEATURE_WORKERS",
    "BackboneRecipe", "CaffeLog", "CheckedInRecipe", "DataLayer", "Phases", "Recipe",
    "SmallNetRecipe", "UnsupervisedRecipe",
    "cache_features", "data_layer_pair", "move_data_files", "parse_log", "set_data_layers",
    "train", "train_collection", "train_unsupervised", "write_solver",
]
