"""Stepping a pycaffe net by hand: Nesterov momentum, the fast recipe's
learning-rate schedule and weight averaging.

Caffe's solvers have Nesterov momentum but no warm-up and no weight
averaging, and pycaffe cannot change a solver's rate between steps; the
fast recipe (fast.py) therefore runs forward/backward through pycaffe and
applies the update here, in numpy, on the parameter blobs in place. Each
blob keeps the lr_mult and decay_mult its prototxt gives (a frozen layer has
lr_mult 0 and is skipped), so the prototxt stays the one statement of what
learns. The update is Caffe's own Nesterov step (sgd_solvers / nesterov_solver.cpp):

    g      = diff + weight_decay * decay_mult * w
    v_new  = momentum * v + lr * lr_mult * g
    w     -= (1 + momentum) * v_new - momentum * v
"""
import numpy as np

from ..nets.protos import read_prototxt


def triangle_lr(step, total_steps, peak, warmup_fraction, start_fraction=0.2,
                end_fraction=0.0):
    """The fast recipe's schedule: linear from start_fraction * peak up to
    peak over the first warmup_fraction of the steps, then linear down to
    end_fraction * peak at the last step (airbench's and the one-cycle
    recipes' shape)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    if step < warmup:
        return peak * (start_fraction + (1.0 - start_fraction) * step / warmup)
    tail = max(1, total_steps - warmup)
    done = min(1.0, (step - warmup) / tail)
    return peak * (1.0 - (1.0 - end_fraction) * done)


def param_multipliers(prototxt):
    """{layer name: [(lr_mult, decay_mult) per param blob]} as the prototxt
    states them (Caffe's defaults, 1 and 1, where a ParamSpec is missing)."""
    multipliers = {}
    for layer in read_prototxt(prototxt, "NetParameter").layer:
        multipliers[layer.name] = [(spec.lr_mult, spec.decay_mult) for spec in layer.param]
    return multipliers


class NesterovSGD:
    """Nesterov SGD over a pycaffe net's learnable blobs (see the module
    docstring). state() / load_state() carry the momentum for resuming."""

    def __init__(self, net, prototxt, momentum=0.9, weight_decay=5e-4):
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        multipliers = param_multipliers(prototxt)
        self.blobs = []      # (key, blob, lr_mult, decay_mult)
        for name, blobs in net.params.items():
            specs = multipliers.get(name, [])
            for i, blob in enumerate(blobs):
                lr_mult, decay_mult = specs[i] if i < len(specs) else (1.0, 1.0)
                if lr_mult:
                    self.blobs.append((f"{name}/{i}", blob, float(lr_mult), float(decay_mult)))
        self.velocity = {key: np.zeros_like(blob.data) for key, blob, _, _ in self.blobs}

    def clear_diffs(self):
        for _, blob, _, _ in self.blobs:
            blob.diff[...] = 0

    def step(self, lr):
        m = self.momentum
        for key, blob, lr_mult, decay_mult in self.blobs:
            w, v = blob.data, self.velocity[key]
            grad = blob.diff
            if decay_mult and self.weight_decay:
                grad = grad + (self.weight_decay * decay_mult) * w
            previous = v.copy()
            v *= m
            v += (lr * lr_mult) * grad
            w -= (1.0 + m) * v - m * previous

    def state(self):
        return {f"velocity:{key}": v for key, v in self.velocity.items()}

    def load_state(self, arrays):
        for key in self.velocity:
            self.velocity[key][...] = arrays[f"velocity:{key}"]


def net_arrays(net, prefix="param"):
    """{'prefix:layer/i': copy} of every parameter blob of a pycaffe net,
    BatchNorm's statistics included."""
    return {f"{prefix}:{name}/{i}": blob.data.copy()
            for name, blobs in net.params.items() for i, blob in enumerate(blobs)}


def load_net_arrays(net, arrays, prefix="param"):
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            blob.data[...] = arrays[f"{prefix}:{name}/{i}"]


class WeightAverage:
    """An exponential moving average of a net's learnable weights (airbench's
    lookahead/EMA): every `every` steps the average moves towards the
    current weights, keeping decay**every * (step / total)**3 of itself.
    The cubic ramp lets the average follow the weights while they still
    change fast and hold a long memory only near the end, where the
    steps' noise is what it averages away (a constant decay drags the
    early weights into a short run's average: measured 0.20 against 0.25
    test accuracy after 100 steps). BatchNorm's statistics are not
    averaged; fast.py measures them afresh for the averaged weights."""

    def __init__(self, sgd, decay, total_steps, every=5):
        self.decay, self.every, self.total = float(decay), int(every), int(total_steps)
        self.keys = [(key, blob) for key, blob, _, _ in sgd.blobs]
        self.average = {key: blob.data.copy() for key, blob in self.keys}

    def kept(self, step):
        """The fraction of the old average kept at `step`."""
        return self.decay ** self.every * (min(step, self.total) / self.total) ** 3

    def update(self, step):
        if step % self.every and step != self.total:
            return
        kept = self.kept(step)
        for key, blob in self.keys:
            self.average[key] *= kept
            self.average[key] += (1.0 - kept) * blob.data

    def state(self):
        return {f"average:{key}": a for key, a in self.average.items()}

    def load_state(self, arrays):
        for key in self.average:
            self.average[key][...] = arrays[f"average:{key}"]

    def copy_into(self, net):
        """Write the averaged weights into `net` (the same layer names)."""
        for key, _ in self.keys:
            name, i = key.rsplit("/", 1)
            net.params[name][int(i)].data[...] = self.average[key]
