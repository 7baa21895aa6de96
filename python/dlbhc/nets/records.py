"""A trained model's record beyond its preprocessing: the fine stage chosen
for it and its class names, in its run folder beside preprocessing.json.

    rerank.json   the fine stage measured on the run's held-out images
                  (search.choice.measure_fine_stages: the choice, every
                  candidate's mAP@k and the coarse one, the split sizes),
                  written by train.py; `--rerank auto` uses it
    classes.txt   one class name a line, label i on line i+1 (written by
                  datasets.collection for a user's collection, copied from
                  data/cifar10/ for the CIFAR-10 nets)

Both are found as preprocessing.json is (model.preprocessing_record_path):
beside the weights, or one folder up for a snapshot.  A database knows its
model by the weights path its metadata records, so `record_folder(meta)`
leads from a database to them.  A model without a record keeps the
behaviour from before records (re-rank by fc7, labels as numbers).
"""
import json
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write
from ..report import get_logger
from .model import PREPROCESSING_FILE

log = get_logger(__name__)

RERANK_FILE = "rerank.json"
CLASSES_FILE = "classes.txt"


def model_folder(weights):
    """The run folder of `weights`: its own folder, or the one above a
    snapshots/ folder when that holds the records (as for preprocessing.json)."""
    weights = Path(weights)
    folder = weights.parent
    if folder.name == "snapshots" and not (folder / PREPROCESSING_FILE).exists():
        return folder.parent
    return folder


def record_folder(meta):
    """The run folder of the model a database's metadata records, or None."""
    weights = meta.get("model", {}).get("weights")
    return model_folder(weights) if weights else None


def write_rerank_record(folder, record):
    """rerank.json in `folder`, written whole (atomically)."""
    path = Path(folder) / RERANK_FILE
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def record_file(folder, name):
    """folder/name when both exist, else None."""
    path = None if folder is None else Path(folder) / name
    return path if path is not None and path.is_file() else None


def read_rerank_record(folder):
    """The rerank record in `folder` (dict), None when there is none."""
    path = record_file(folder, RERANK_FILE)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text())
        record["choice"], record["coarse"], record["map_at_k"]   # noqa: B018 (checked)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise UserError(f"{path} is not a readable fine-stage record ({err}): delete it "
                        "(searches then re-rank by fc7) or retrain") from None
    return record


def read_class_names(folder):
    """Class names (label i -> names[i]) from classes.txt in `folder`; None
    when there is none."""
    path = record_file(folder, CLASSES_FILE)
    if path is None:
        return None
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        log.warning("class names unreadable (%s): labels are shown as numbers", err)
        return None
    while names and not names[-1]:
        names.pop()
    return names or None


def class_name(names, label):
    """The name of `label` in `names`, or None (unknown label, no names)."""
    if names is None or label is None or not 0 <= int(label) < len(names):
        return None
    return names[int(label)]
