"""A user's own collection for training: classes, labels, a held-out split.

`make train DATA=FOLDER_OR_LIST` starts here. A folder's class subfolders
are the classes (names sorted -> labels 0..C-1); a list file has `path
label` lines whose labels are integers or class names (names are sorted ->
labels, as for a folder). The images of a class are split into training and
held-out test images (seeded, `test_fraction` of each class, at least one),
unless a test list is given. The lists and class names are written into the
run folder (train.txt, test.txt, classes.txt), so later steps and the user
see what the model was trained on.

A collection without labels (a folder with no class subfolders, a list of
paths without labels, or any collection with train.py --unsupervised) gives
its images to the unsupervised recipe instead (load_unlabelled); has_labels
says which mode a source is in, and a folder mixing class subfolders and
loose images is trained with labels, the loose images left out with a note
that says so and how to use them all (--unsupervised).

Everything here is linear in the number of images (100k images: lists and
dicts, no pairwise steps) and never decodes an image: unreadable files are
reported and skipped where the pixels are read (feature caching, LMDB
conversion). Never imports Caffe.
"""
import random
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..images import UNKNOWN_LABEL, list_images

DEFAULT_TEST_FRACTION = 0.1
MIN_IMAGES_PER_CLASS = 2


class Collection(NamedTuple):
    train: list          # ImageItems
    test: list           # ImageItems (held out, or the given test list)
    classes: list        # class names, label i = classes[i]
    notes: list          # what was skipped or decided, for the user

    @property
    def num_classes(self):
        return len(self.classes)


def load_collection(source, test_source=None, root=None, test_fraction=DEFAULT_TEST_FRACTION,
                    seed=1):
    """The training and test images of `source` (folder or list file), with
    checks a training run needs; see the module docstring."""
    notes = []
    items, classes = _labelled(source, root, notes)
    if test_source is not None:
        test_items, test_classes = _labelled(test_source, root, notes)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise UserError(f"the test set {test_source} has classes the training set "
                            f"{source} lacks: {', '.join(unknown[:5])}")
        # labels by class name: a test folder may lack some of the classes
        index = {name: i for i, name in enumerate(classes)}
        test_items = [it._replace(label=index[test_classes[it.label]]) for it in test_items]
        _check_classes(items, classes, source, minimum=1)
        return Collection(items, test_items, classes, notes)
    _check_classes(items, classes, source, minimum=MIN_IMAGES_PER_CLASS)
    if not 0 < test_fraction < 1:
        raise UserError(f"the held-out fraction must be between 0 and 1, got {test_fraction}")
    train, test = split_held_out(items, test_fraction, seed)
    notes.append(f"held out {len(test)} of {len(items)} images for testing "
                 f"({test_fraction:.0%} of each class, seed {seed})")
    return Collection(train, test, classes, notes)


def _labelled(source, root, notes):
    """(items with labels 0..C-1, class names) of a folder or list file."""
    found = list_images(source, root=root)
    if Path(source).is_dir():
        unlabelled = [it for it in found.items if it.label == UNKNOWN_LABEL]
        if unlabelled:
            notes.append(f"skipped {len(unlabelled)} image(s) directly in {source} (not in a "
                         f"class subfolder), e.g. {unlabelled[0].relpath}: training with labels "
                         f"from the class subfolders; move them into a class subfolder, or "
                         f"pass --unsupervised to build codes from all {len(found.items)} "
                         "images without labels")
        items = [it for it in found.items if it.label != UNKNOWN_LABEL]
        used = sorted({it.label for it in items})
        if not items:
            raise UserError(f"{source} has no images in class subfolders: put each class's "
                            "images in a subfolder named after the class, or build codes "
                            "without labels (train.py --unsupervised)")
        # subfolders without images are not classes
        names = [found.classes[i] for i in used]
        remap = {old: new for new, old in enumerate(used)}
        if len(used) != len(found.classes):
            empty = sorted(set(found.classes) - set(names))
            notes.append(f"subfolders without images are not classes: {', '.join(empty[:5])}")
        return [it._replace(label=remap[it.label]) for it in items], names
    return _labels_of_list(found, source)


def has_labels(source, root=None):
    """Whether `source` is a labelled collection: a folder with images in
    class subfolders, or a list with a label on some line."""
    found = list_images(source, root=root)
    return any(it.label != UNKNOWN_LABEL for it in found.items)


def load_unlabelled(source, root=None):
    """Every image of a folder (loose or in subfolders) or list file, for
    codes learned without labels; their labels are kept (they are not used
    to learn). A UserError for fewer than 2 images."""
    found = list_images(source, root=root)
    if len(found.items) < 2:
        raise UserError(f"{source} holds {len(found.items)} image ({found.items[0].relpath}): "
                        "codes without labels are learned from how images differ, which "
                        "takes at least 2 images (hundreds give useful codes); add images")
    return found.items


def _labels_of_list(found, source):
    """Labels of a list file (images.list_images reads them): all integers
    (kept; names are the numbers) or all class names (sorted names ->
    labels, in found.classes).  Training needs a label on every line."""
    unlabelled = [it for it in found.items if it.label == UNKNOWN_LABEL]
    if unlabelled:
        raise UserError(f"{source}: {len(unlabelled)} line(s) have no label, e.g. "
                        f"{unlabelled[0].relpath!r}; training needs `path label` on every line "
                        "(label: a class number or a class name)")
    if found.classes is not None:
        return found.items, found.classes
    top = max(it.label for it in found.items)
    return found.items, [str(i) for i in range(top + 1)]


def _check_classes(items, classes, source, minimum):
    counts = Counter(it.label for it in items)
    present = [c for c in range(len(classes)) if counts[c] > 0]
    if len(present) < 2:
        only = classes[present[0]] if present else "none"
        raise UserError(f"{source} has one class only ({only!r}, {len(items)} images): "
                        "a classifier needs at least two classes (one subfolder per class)")
    small = [(classes[c], counts[c]) for c in present if counts[c] < minimum]
    if small:
        listed = ", ".join(f"{name!r} ({n})" for name, n in small[:5])
        raise UserError(f"{len(small)} class(es) have fewer than {minimum} images: {listed}. "
                        f"Each class needs at least {minimum} (one to train on, one held out "
                        "for testing): add images, remove the class, or give a test list")


def split_held_out(items, fraction, seed):
    """Per class, a seeded `fraction` (at least one image, never all) goes to
    the test side; both sides keep the input order."""
    by_class = {}
    for position, it in enumerate(items):
        by_class.setdefault(it.label, []).append(position)
    rng = random.Random(seed)
    held = set()
    for label in sorted(by_class):
        positions = by_class[label]
        n = min(len(positions) - 1, max(1, round(fraction * len(positions))))
        held.update(rng.sample(positions, n))
    train = [it for i, it in enumerate(items) if i not in held]
    test = [it for i, it in enumerate(items) if i in held]
    return train, test


def write_list(path, items):
    """A `path label` list (absolute paths) as Caffe's tools and extract.py read."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(f"{Path(it.path).resolve()} {int(it.label)}\n")
    return Path(path)


def write_run_lists(run_dir, collection):
    """train.txt, test.txt and classes.txt in the run folder; their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "classes.txt").write_text("".join(f"{name}\n" for name in collection.classes),
                                         encoding="utf-8")
    return (write_list(run_dir / "train.txt", collection.train),
            write_list(run_dir / "test.txt", collection.test),
            run_dir / "classes.txt")
