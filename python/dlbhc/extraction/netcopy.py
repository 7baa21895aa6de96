"""A copy of the driver's net, built in another process: the pipeline's
forward workers and the Ray job's actors (scale.ray_extract) both run their
net this way.

The driver loads the net once with every check (nets.model.HashNet: the
prototxt parsed, the weights' shapes matched, their sha1 taken for the
store's metadata) and compares it with the database.  A copy elsewhere needs
only what NetCopy holds: the files (absolute paths, on a filesystem the
other process sees), the training preprocessing it was resolved to, and the
device; it skips the checks the driver made.

On the CPU a copy runs with one BLAS thread: copies run side by side, one
per worker or actor, and for the nets of this project one single-threaded
net per core beats one net whose threads share the cores (Caffe's layers
between the GEMMs run on one thread; see benchmarks/bench_extract.py).
"""
import os
from dataclasses import dataclass

from ..nets.caffe_env import set_blas_threads
from ..nets.model import HashNet


@dataclass(frozen=True)
class NetCopy:
    """What builds a copy of a checked HashNet in another process (not to be
    confused with caffe.NetSpec, which writes prototxts)."""
    deploy: str
    weights: str
    mean: tuple        # B, G, R: the driver's resolved preprocessing
    resize: int
    gpu: int = None    # the device in the building process; None: the CPU
    fold: bool = True  # BatchNorm folded at load, as the driver's net

    @classmethod
    def of(cls, net, gpu=None):
        """The spec of the driver's `net`; `gpu`: the device the copy uses
        where it is built (Ray shows each GPU actor its device as 0)."""
        return cls(os.path.abspath(net.deploy), os.path.abspath(net.weights),
                   tuple(float(v) for v in net.prep.mean_bgr), int(net.prep.resize), gpu,
                   net.fold)

    def build(self):
        """The net, loaded without the driver's checks; on the CPU this
        process's BLAS then runs one thread."""
        net = HashNet(self.deploy, self.weights, list(self.mean), gpu=self.gpu,
                      resize=self.resize, check=False, fold=self.fold)
        if self.gpu is None:
            set_blas_threads(1)
        return net
