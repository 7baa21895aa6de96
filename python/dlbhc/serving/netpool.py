"""The net pool: forward passes for a server's concurrent requests, batched.

pycaffe's Net is not thread-safe, its forward holds Python's GIL for its
whole length (pycaffe never releases it), and Caffe's CPU/GPU mode is per
thread.  So no request thread ever touches a net: requests hand their
decoded crops to NetPool, whose dispatcher threads gather whatever is
waiting into one batch (up to max_batch images) and run it either
  * on one net owned by a dispatcher thread in this process
    (processes=0; the forward then stalls every other request for its
    duration, by-id searches included), or
  * on N nets in worker processes, one each (processes=N), fed through
    pipes: the server's threads keep running during forwards.
benchmarks/bench_serve.py measures both; README says which is the default.

Apart from service.py because it is a mechanism of its own (threads,
processes, pipes, the BLAS thread count) that knows nothing of requests,
searches or the database beyond the arguments that load the net.  Caffe is
imported only where a net is built: in the dispatcher thread or the worker
process (retrieval.load_matching_model).
"""
import multiprocessing as mp
import queue
import threading

import numpy as np

from ..errors import UserError
from ..nets.caffe_env import set_blas_threads
from .retrieval import load_matching_model


class Unavailable(UserError):
    """The server cannot do this now or at all (HTTP 503): no net, or its
    worker failed."""


# ---- the nets -------------------------------------------------------------------

class _Job:
    __slots__ = ("crops", "done", "fc7", "latent", "error")

    def __init__(self, crops):
        self.crops = crops
        self.done = threading.Event()
        self.fc7 = self.latent = self.error = None


class _ThreadNet:
    """The net in this process, built and run by its dispatcher thread only
    (Caffe's mode is per thread, and the net is not thread-safe)."""
    where = "thread"

    def __init__(self, model_args, blas_threads):
        self.model_args, self.blas_threads = model_args, blas_threads
        self.net = None
        self.blas_in_force = None

    def start(self):
        self.blas_in_force = set_blas_threads(self.blas_threads)
        self.net = load_matching_model(*self.model_args)

    def forward(self, crops):
        return self.net.forward_crops(crops)

    def close(self):
        self.net = None


def _net_process_main(conn, model_args, blas_threads):
    """A net worker process: load the net, then answer crops with (fc7, latent)."""
    net = _ThreadNet(model_args, blas_threads)    # in this process's only thread
    try:
        net.start()
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        conn.send(("error", f"{type(err).__name__}: {err}" if not isinstance(err, UserError)
                   else str(err)))
        return
    conn.send(("ready", net.blas_in_force))
    while True:
        try:
            crops = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if crops is None:
            return
        try:
            conn.send(("ok", net.forward(crops)))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", f"{type(err).__name__}: {err}"))


class _ProcessNet:
    """One net in a worker process of its own, fed through a pipe."""
    where = "process"

    def __init__(self, model_args, blas_threads):
        self.model_args, self.blas_threads = model_args, blas_threads
        self.proc = self.conn = None
        self.blas_in_force = None

    def start(self):
        # spawn, not fork: the server has threads (and maybe a GPU context).
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_net_process_main, daemon=True,
                                args=(child, self.model_args, self.blas_threads))
        self.proc.start()
        child.close()
        status, message = self._recv()
        if status != "ready":
            self.close()
            raise UserError(message)
        self.blas_in_force = message

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return "error", f"the net's worker process (pid {self.proc.pid}) died " \
                            f"(exit code {self.proc.exitcode})"

    def forward(self, crops):
        try:
            self.conn.send(crops)
        except (BrokenPipeError, OSError):
            pass   # reported by _recv
        status, value = self._recv()
        if status != "ok":
            if not self.proc.is_alive():
                self.close()
                self.start()   # a fresh worker for the next batch
            raise RuntimeError(value)
        return value

    def close(self):
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.conn.close()
        if self.proc is not None:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.proc = self.conn = None


class NetPool:
    """Forward passes for concurrent requests, batched: features(crops)
    blocks until the crops' fc7 and latent are computed.  One dispatcher
    thread per net takes the waiting jobs (up to max_batch images in all)
    and runs them as one forward."""

    def __init__(self, model_args, processes=0, max_batch=32, blas_threads=None):
        self.processes = int(processes)
        self.max_batch = max(1, int(max_batch))
        # One BLAS thread per net unless asked: query batches are small, and
        # on the shared 2-core machine a second OpenBLAS thread never helped
        # the small net's forward and, with other work on the cores, made it
        # up to 2.8x slower (its threads spin-wait for each other): batch 32
        # 93 vs 263 ms (bench_serve.py --blas-table; docs/serving.md).
        self.blas_threads = 1 if blas_threads is None else int(blas_threads)
        self.model_args = model_args
        self._jobs = queue.Queue()
        kind = _ProcessNet if self.processes > 0 else _ThreadNet
        self._nets = [kind(model_args, self.blas_threads) for _ in range(max(1, self.processes))]
        self._threads = []
        for net in self._nets:
            ready, failure = threading.Event(), []
            thread = threading.Thread(target=self._dispatch, args=(net, ready, failure),
                                      name="dlbhc-net", daemon=True)
            thread.start()
            ready.wait()
            if failure:
                self.close()
                raise failure[0]
            self._threads.append(thread)

    @property
    def nets(self):
        return list(self._nets)

    @property
    def mode(self):
        return f"{self.processes} worker processes" if self.processes else "one net in a thread"

    def features(self, crops):
        """crops (n, crop, crop, 3) uint8 -> fc7 (n, D), latent (n, bits)."""
        job = _Job(np.ascontiguousarray(crops))
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise Unavailable(f"the net failed on this request: {job.error}")
        return job.fc7, job.latent

    def _dispatch(self, net, ready, failure):
        try:
            net.start()
            # One forward before the first request: Caffe allocates its
            # blobs' memory on the first (measured: the first upload's
            # forward took 450 ms, the next ones a few).
            crop = int(self.model_args[0]["preprocessing"]["crop"])
            net.forward(np.zeros((1, crop, crop, 3), dtype=np.uint8))
        except BaseException as err:  # noqa: BLE001  (raised by the constructor)
            failure.append(err)
            ready.set()
            return
        ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch, n = [job], len(job.crops)
            while n < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)   # for the next dispatcher, after this batch
                    break
                batch.append(more)
                n += len(more.crops)
            try:
                crops = batch[0].crops if len(batch) == 1 else \
                    np.concatenate([j.crops for j in batch])
                fc7, latent = net.forward(crops)
                start = 0
                for j in batch:
                    end = start + len(j.crops)
                    j.fc7, j.latent = fc7[start:end], latent[start:end]
                    start = end
            except Exception as err:  # noqa: BLE001  (handed to the waiting requests)
                for j in batch:
                    j.error = str(err)
            for j in batch:
                j.done.set()
        net.close()

    def close(self):
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
