"""Training batches for the fast recipe, made in memory from uint8 images:
alternating flips and random translation (airbench's augmentation),
without rewriting any LMDB per epoch.

Alternating flips: in the first epoch each image is mirrored with
probability 1/2; from then on it is mirrored in every other epoch, so each
image is seen both ways in every two epochs (airbench: better than random
flips for short schedules). Translation: the image, padded by `translate`
pixels with its reflection, is cropped at a random offset in
[-translate, translate] on each axis.

Every epoch's order, flips and offsets come from a generator seeded by
(seed, epoch): a run resumed at an epoch boundary sees the same batches as
one that was not interrupted.
"""
import numpy as np


class AugmentedBatches:
    """images: (n, H, W, 3) uint8; labels: (n,) int. epoch(e) yields
    (crops (b, H, W, 3) uint8, labels (b,)) for every full batch."""

    def __init__(self, images, labels, batch_size, seed=0, translate=2, flip=True):
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.translate, self.flip = int(translate), bool(flip)
        if len(self.images) < self.batch_size:
            raise ValueError(f"{len(self.images)} training images are fewer than one batch "
                             f"of {self.batch_size}")
        t = self.translate
        self.padded = (np.pad(self.images, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")
                       if t else self.images)
        self.first_flips = np.random.default_rng([self.seed, 1 << 20]).random(len(images)) < 0.5

    def batches_per_epoch(self):
        return len(self.images) // self.batch_size

    def flips(self, epoch):
        """Which images are mirrored in `epoch` (alternating)."""
        if not self.flip:
            return np.zeros(len(self.images), dtype=bool)
        return self.first_flips ^ bool(epoch % 2)

    def epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.images))
        flips = self.flips(epoch)
        t = self.translate
        offsets = rng.integers(0, 2 * t + 1, size=(len(self.images), 2)) if t else None
        _, height, width, _ = self.images.shape
        b = self.batch_size
        for start in range(0, self.batches_per_epoch() * b, b):
            chosen = order[start:start + b]
            crops = np.empty((b, height, width, 3), dtype=np.uint8)
            for row, i in enumerate(chosen):
                image = self.padded[i]
                if t:
                    dy, dx = offsets[i]
                    image = image[dy:dy + height, dx:dx + width]
                crops[row] = image[:, ::-1] if flips[i] else image
            yield crops, self.labels[chosen]
