"""The fast recipe's settings (FastSchedule) and what a run chooses from its
collection: the default batch for its size (batch_for) and, after
training, which weights and test-time flip averaging to keep on the
held-out accuracies (choose_kept), and whether to average shifted views
too (choose_shift). Pure Python: fast.py runs the recipe."""
from dataclasses import dataclass, replace

# The batch FastSchedule.peak_lr is stated for; other batch sizes scale it
# linearly (the usual rule for SGD with momentum at these sizes).
REFERENCE_BATCH = 500
# the default batch of a small training set (batch_for)
MIN_STEPS_PER_EPOCH = 50
MIN_BATCH = 32


@dataclass(frozen=True)
class FastSchedule:
    """The recipe's settings (docs/benchmarks.md gives what each was
    measured against). Learning rate, momentum and weight decay are for the
    batch-mean loss (Caffe's normalisation). They are airbench94's (lr 11.5
    and decay 0.0153 per 1024 examples, Nesterov 0.85) in Caffe's terms at
    batch 500: lr = 11.5 * 500 / kilostep, the decay per step
    0.0153 * 500 / kilostep = lr * weight_decay, where kilostep =
    1024 * (1 + 1 / (1 - 0.85)). Against the Myrtle ResNet-9 settings used
    before (peak 0.4, Nesterov 0.9, 5e-4) that is about the same step
    (lr / (1 - momentum): 4.9 against 4.0) and 3.2 times the decay."""
    epochs: float = 10.0
    batch_size: int = 500
    peak_lr: float = 0.732
    warmup_fraction: float = 0.2
    momentum: float = 0.85
    weight_decay: float = 1.33e-3
    label_smoothing: float = 0.2
    average_decay: float = 0.99      # per step, at the end (sgd.WeightAverage); 0 = none
    average_every: int = 5
    translate: int = 2
    flip: bool = True
    flip_average: bool = True        # extraction averages each image with its mirror
    shift_average: bool = True       # ...and with its views shifted one pixel (choose_shift)
    bn_batches: int = 20             # batches that re-measure BatchNorm's statistics
    monitor_images: int = 2000       # test images classified after each epoch (the curve)
    seed: int = 1

    def steps(self, images):
        return max(1, int(round(self.epochs * (images // self.batch_size))))

    def peak_lr_for_batch(self):
        return self.peak_lr * self.batch_size / REFERENCE_BATCH

    def adapted(self, epochs=None, max_iter=None, batch_size=None, base_lr=None, images=None):
        """This schedule with a command line's changes: --max-iter (steps)
        wins over --epochs; a batch larger than the training set shrinks
        to it. Without --batch-size a smaller collection gets a smaller
        batch (batch_for), its learning rate scaled with it."""
        changes = {}
        if batch_size:
            changes["batch_size"] = int(batch_size)
        elif images is not None:
            changes["batch_size"] = batch_for(images, self.batch_size)
        if images is not None and images < changes.get("batch_size", self.batch_size):
            changes["batch_size"] = max(1, int(images))
        if base_lr:
            changes["peak_lr"] = float(base_lr) * REFERENCE_BATCH / changes.get(
                "batch_size", self.batch_size)
        if epochs:
            changes["epochs"] = float(epochs)
        if max_iter and images:
            per_epoch = images // changes.get("batch_size", self.batch_size)
            changes["epochs"] = int(max_iter) / per_epoch
        return replace(self, **changes)


def batch_for(images, largest=FastSchedule.batch_size):
    """The default batch for a training set: at least MIN_STEPS_PER_EPOCH
    steps an epoch (airbench takes ~49 on CIFAR-10), no larger than
    `largest`, no smaller than MIN_BATCH (BatchNorm's batch statistics).
    5,000 images: batch 100, 500 steps in 10 epochs; at 500 a batch they got
    100 steps, and Fashion-MNIST (500 a class) reached 0.727 test accuracy
    against 0.839 (docs/benchmarks.md)."""
    return int(max(MIN_BATCH, min(largest, images // MIN_STEPS_PER_EPOCH)))


FLIP_SUFFIX = "_flip_average"
SHIFT_SUFFIX = "_shift_average"


def accuracy_key(label, flip, shift=False):
    """The key of a held-out accuracy in a run's test_accuracy: "final",
    "averaged_flip_average", "averaged_flip_average_shift_average", ..."""
    return label + (FLIP_SUFFIX if flip else "") + (SHIFT_SUFFIX if shift else "")


def choose_kept(labels, accuracies, flip_allowed):
    """(weights label, flip averaging) to keep: the best held-out accuracy
    among `labels` ("final", "averaged"), each with flip averaging when
    allowed. A short schedule's average can trail its final weights (100
    steps on 5,000 images: 0.683 against 0.727), and mirrors do not help
    every collection. Ties go to the later label (the average, airbench's
    choice) and to no flip (half the extraction cost). No accuracies: the
    last label, flip as allowed."""
    options = [(label, flip) for label in labels for flip in (False, True)
               if (flip_allowed or not flip) and accuracy_key(label, flip) in accuracies]
    if not options:
        return labels[-1], bool(flip_allowed)
    label, flip = max(options, key=lambda o: (accuracies[accuracy_key(*o)], labels.index(o[0]),
                                              not o[1]))
    return label, flip


def choose_shift(accuracies, label, flip):
    """Whether extraction also averages the one-pixel shifted views
    (model.Preprocessing.shift_average) of the kept weights: only when
    they classify the held-out images strictly better, since they triple
    the forwards of every image extracted."""
    shifted = accuracies.get(accuracy_key(label, flip, shift=True))
    return shifted is not None and shifted > accuracies.get(accuracy_key(label, flip), 1.0)
