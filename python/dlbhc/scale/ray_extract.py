"""Extraction as a Ray job: shards of the collection on Ray actors, each
holding one net, merged into one database in input order.

    extract.py IMAGES --out DB --ray [ADDRESS] ...

A thin adapter over pipeline.extract_items and store.merge: the database's
format, resume and crash rules are theirs.  Ray is imported only here, and
only when a job runs.

How a job goes
    1. The driver (this process) lists the collection once and checks the
       model against DB (created empty when missing), as a plain run does.
    2. The images not yet in DB nor in a shard left by an earlier run are
       cut into shards: consecutive runs of the input order, each extracted
       into its own feature store  DB.ray-shards/shard-NNNNNN.lmdb.
    3. Ray actors (one per CPU of the cluster, or per GPU with --gpu) each
       load the net once and take shards from the driver as they finish
       the last one; on the CPU an actor decodes and runs a single-threaded
       net, as extract.py's forward workers do.
    4. When every shard is done, their records are appended to DB in input
       order (store.merge, append mode), the skipped images listed in
       DB.skipped.tsv, and DB.ray-shards removed.

Every image exactly once
    A shard store is only ever written under an exclusive lock on
    shard-NNNNNN.lock, and a shard resumes from what it holds (the store's
    crash-safe appends: a killed actor loses at most its uncommitted
    batches).  A killed actor is restarted by Ray and its shard retried
    (max_restarts, max_task_retries); if Ray gives up, the driver retries
    the shard on another actor.  After a crash of the driver, rerunning the
    same command seals the shards it finds (takes each lock, so no late
    writer of the old job can still add to them, and marks them sealed),
    counts their images as done, cuts the rest into new shards, and merges
    everything.  A merge cut short is finished by the next run (records
    whose path DB holds are never appended twice).

On a cluster, the images and DB's folder must be on a filesystem every
node mounts at the same path (the actors read images and write shards
there), and every node needs the project's environment (Caffe and this
package, e.g. the docker/ images).

Messages go to the module's logger (report).  An actor's own messages
(extract_items' notes and skipped images) are caught on the actor and come
back with its shard's summary; the driver logs them at debug level (it
reports the skipped images itself, once, in input order).
"""
import fcntl
import io
import logging
import os
import shutil
import socket
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..extraction.netcopy import NetCopy
from ..extraction.pipeline import (DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, ExtractionReport,
                                   extract_items, input_triples, open_or_create_store,
                                   select_inputs)
from ..images import list_images, write_skipped_list
from ..progress import Progress
from ..report import ROOT_LOGGER, get_logger
from ..store import DEFAULT_BACKEND, DEFAULT_FC7_DTYPE, FeatureStore, merge

log = get_logger(__name__)

SHARDS_SUFFIX = ".ray-shards"
# Ray restarts a killed actor and retries its task this often before the
# driver sees the failure; the driver then retries the shard on another
# actor up to SHARD_ATTEMPTS times in all before giving up on it.
ACTOR_RESTARTS = 3
SHARD_ATTEMPTS = 3
# Shards per actor when --ray-shard-size is not given: enough that the
# last shards finish close together (an idle actor at the end costs at
# most one shard's time), few enough that each store's set-up is noise.
SHARDS_PER_ACTOR = 16
MAX_SHARD_SIZE = 20000
# How often actors report their counts and the driver prints progress.
PROGRESS_SECONDS = 1.0


def shards_dir(out):
    """Where a Ray job keeps its shard stores: beside DB, DB.ray-shards/."""
    out = Path(out)
    return out.with_name(out.name + SHARDS_SUFFIX)


def shard_store_path(folder, number, backend=DEFAULT_BACKEND):
    return Path(folder) / f"shard-{number:06d}.{backend}"


def _lock_path(store_path):
    return Path(store_path).with_suffix(".lock")


def _sealed_path(store_path):
    return Path(store_path).with_suffix(".sealed")


class ShardLock:
    """An exclusive lock (flock) on a shard: one writer at a time, released
    by the kernel when its holder dies."""

    def __init__(self, store_path):
        self.path = _lock_path(store_path)

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def seal_shard(store_path):
    """Take the shard's lock (waiting for a writer of an earlier job to end)
    and mark it sealed: no actor writes to it again."""
    with ShardLock(store_path):
        _sealed_path(store_path).touch()


def plan_shards(triples, size):
    """Consecutive runs of `size` triples (input order)."""
    return [triples[i:i + size] for i in range(0, len(triples), size)]


def default_shard_size(n_images, n_actors, batch_size):
    per_shard = -(-n_images // max(1, n_actors * SHARDS_PER_ACTOR))
    return max(batch_size, min(MAX_SHARD_SIZE, per_shard))


# ---- the actors (plain classes; ray.remote wraps them when a job runs) -------

class ProgressBoard:
    """Counts of every shard, reported by the actors; the driver reads the
    sum.  A retried shard reports from what its store already holds, so the
    highest count seen per shard never counts an image twice."""

    def __init__(self):
        self.done = {}
        self.actor_starts = 0

    def report(self, shard, count):
        self.done[shard] = max(self.done.get(shard, 0), count)

    def actor_started(self):
        self.actor_starts += 1

    def totals(self):
        return sum(self.done.values()), self.actor_starts


class _BoardMeter:
    """pipeline's progress hook inside an actor: counts images and sends
    the shard's running count to the board at most every PROGRESS_SECONDS."""

    def __init__(self, board, shard, already):
        self.board, self.shard, self.count = board, shard, already
        self._last = 0.0

    def update(self, n=1):
        self.count += n
        now = time.monotonic()
        if now - self._last >= PROGRESS_SECONDS:
            self._last = now
            self.board.report.remote(self.shard, self.count)

    def close(self):
        self.board.report.remote(self.shard, self.count)


@contextmanager
def caught_messages():
    """The package's messages (report's logger tree) logged inside the block,
    caught in a list of lines instead of going where the process would
    print them: on an actor, stderr, which Ray forwards to the driver."""
    logger = logging.getLogger(ROOT_LOGGER)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lines = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        lines += buffer.getvalue().splitlines()


class ShardExtractor:
    """A Ray actor: one net, loaded once; extracts whole shards."""

    def __init__(self, net_copy, options, board_name):
        import ray
        # The copy of the driver's net (one BLAS thread on the CPU; Ray gives
        # each GPU actor its own device, visible as device 0: net_copy.gpu).
        self.net = net_copy.build()
        # The board is looked up by name: an actor handle among the
        # constructor's arguments would live in the object store, which a
        # restarted actor cannot count on.
        self.options, self.board = options, ray.get_actor(board_name)
        # Waited for: calls from different callers reach the board in no
        # set order, and the driver reads the count as soon as the last
        # shard is done (a restart was once reported as 0 restarts).
        ray.get(self.board.actor_started.remote())

    def run_shard(self, number, triples, store_path):
        """Extract `triples` into the shard store (resuming it); a summary
        dict, or {"sealed": True} when a later job sealed the shard."""
        with ShardLock(store_path):
            if _sealed_path(store_path).exists():
                return {"shard": number, "sealed": True}
            if Path(store_path).exists() and _shard_count(store_path) is None:
                # An actor killed while creating the store (before its
                # metadata record): nothing was committed, start afresh.
                shutil.rmtree(store_path)
            opts = self.options
            with caught_messages() as messages:
                report = extract_items(
                    triples, self.net, store_path, batch_size=opts["batch_size"], workers=0,
                    backend=opts["backend"], fc7_dtype=opts["fc7_dtype"],
                    commit_seconds=opts["commit_seconds"],
                    progress=lambda todo: _BoardMeter(self.board, number, len(triples) - todo))
        return {"shard": number, "stored": report.stored, "already": report.already,
                "skipped": report.skipped, "messages": messages,
                "node": os.uname().nodename, "pid": os.getpid()}


# ---- the driver ------------------------------------------------------------------

def connect(address):
    """ray.init for ADDRESS (which extract_on_ray has found reachable), or a
    new local Ray on this machine when None."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs the `ray` package: pip install -r requirements.txt "
                        "(or `make venv`)") from None
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                  configure_logging=True)
    try:
        if address is None:
            # A private Ray for this job: usage statistics off (Ray would
            # send them to its makers), everything on the loopback address.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as err:   # Ray raises plain exceptions for a bad address too
        if address is None:
            raise
        raise UserError(f"cannot connect to the Ray cluster at {address}: "
                        f"{type(err).__name__}: {err}") from None
    return ray


# How long check_reachable waits for a cluster's head to accept a connection:
# ray.init itself retries an unreachable address for a very long time.
CONNECT_SECONDS = 10.0


def check_reachable(address, seconds=CONNECT_SECONDS):
    """Raise UserError unless HOST:PORT (or ray://HOST:PORT) accepts a TCP
    connection; "auto" (the cluster this machine belongs to) is left to Ray."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray {address}: expected HOST:PORT of the cluster's head "
                        "(e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err}): start it with "
                        "`ray start --head --port PORT` (and `ray start --address HEAD:PORT` "
                        "on the other nodes), check the address, or leave ADDRESS out to run "
                        "a local Ray on this machine") from None


def _existing_shards(folder, backend):
    return sorted(Path(folder).glob(f"shard-*.{backend}"))


def _shard_number(path):
    return int(path.name.split("-")[1].split(".")[0])


def extract_on_ray(source, net, out, address=None, root=None, batch_size=DEFAULT_BATCH_SIZE,
                   backend=DEFAULT_BACKEND, fc7_dtype=DEFAULT_FC7_DTYPE, limit=None,
                   commit_seconds=DEFAULT_COMMIT_SECONDS, actors=None, shard_size=None):
    """Extract `source` into DB `out` on a Ray cluster (see the module
    docstring); returns an ExtractionReport like pipeline.extract's.
    `net` is the driver's HashNet: it checks the model against DB, and its
    files are what the actors load."""
    start = time.monotonic()
    if address is not None:
        check_reachable(address)     # before anything is created
    items = list_images(source, root=root)[0]
    if limit:
        items = items[:limit]
    triples = input_triples(select_inputs(items))
    store = open_or_create_store(out, net, backend, fc7_dtype)   # refuses another model
    try:
        done = store.stored_paths() if store.count else set()
    finally:
        store.close()
    folder = shards_dir(Path(out).resolve())
    folder.mkdir(exist_ok=True)
    old = _existing_shards(folder, backend)
    in_db = sum(1 for t in triples if t[1] in done)
    for path in old:
        seal_shard(path)
        try:
            with FeatureStore.open(path) as shard:
                done |= shard.stored_paths() if shard.count else set()
        except UserError:   # created by a killed actor before its first record
            pass
    todo = [t for t in triples if t[1] not in done]
    report = ExtractionReport(total=len(triples), already=in_db)
    if len(todo) < len(triples):
        log.info("%s: %d of %d images already stored, %d in shards of an earlier run; "
                 "%d to go", out, in_db, len(triples), len(triples) - len(todo) - in_db,
                 len(todo))
    results = []
    if todo:
        ray = connect(address)
        try:
            results = _run_shards(ray, todo, net, folder, backend, fc7_dtype, batch_size,
                                  commit_seconds, actors, shard_size, old, report)
        finally:
            ray.shutdown()
    for result in sorted(results, key=lambda r: r["shard"]):
        report.skipped += [tuple(s) for s in result.get("skipped", [])]
        for line in result.get("messages", []):
            log.debug("shard %d: %s", result["shard"], line)
    for path, reason in report.skipped:
        log.warning("skipped %s: %s", path, reason)
    shards = [p for p in _existing_shards(folder, backend) if _shard_count(p)]
    if shards:
        report.stored = merge(shards, out, backend=backend, append=True)
    shutil.rmtree(folder)
    report.seconds = time.monotonic() - start
    write_skipped_list(out, report.skipped, "extract.py")
    return report


def _shard_count(path):
    """Images the shard store at `path` holds; None when it does not open
    (created by a killed actor before its metadata record)."""
    try:
        with FeatureStore.open(path) as shard:
            return shard.count
    except UserError:
        return None


def _run_shards(ray, todo, net, folder, backend, fc7_dtype, batch_size, commit_seconds,
                n_actors, shard_size, old, report):
    """Run every shard of `todo` on actors; the summaries of the shards."""
    on_gpu = net.gpu is not None and net.gpu >= 0
    resources = ray.cluster_resources()
    kind = "GPU" if on_gpu else "CPU"
    available = int(resources.get(kind, 0))
    if available < 1:
        raise UserError(f"the Ray cluster has no {kind}s" +
                        (": --gpu needs nodes started with GPUs" if on_gpu else ""))
    n_actors = n_actors or available
    size = shard_size or default_shard_size(len(todo), n_actors, batch_size)
    first = max((_shard_number(p) for p in old), default=-1) + 1
    queue = deque((first + i, chunk) for i, chunk in enumerate(plan_shards(todo, size)))
    n_actors = min(n_actors, len(queue))
    net_copy = NetCopy.of(net, gpu=0 if on_gpu else None)
    options = dict(batch_size=batch_size, backend=backend, fc7_dtype=fc7_dtype,
                   commit_seconds=commit_seconds)
    board_name = f"dlbhc-progress-{os.getpid()}-{time.time_ns()}"
    board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board_name).remote()
    actor_class = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0,
                             max_restarts=ACTOR_RESTARTS,
                             max_task_retries=ACTOR_RESTARTS)(ShardExtractor)
    idle = [actor_class.remote(net_copy, options, board_name) for _ in range(n_actors)]
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    log.info("Ray: %d shards of up to %d images on %d actors (%d node%s); shards in %s",
             len(queue), size, n_actors, nodes, "s" if nodes != 1 else "", folder)
    progress = Progress(len(todo), label="extract (ray)", unit="img", interval=PROGRESS_SECONDS)
    attempts, pending, results, failed = {}, {}, [], []
    replacements = 0
    totals_ref = None
    finished_images = 0       # images of the shards whose results came back
    while queue or pending:
        while queue and idle:
            number, chunk = queue.popleft()
            attempts[number] = attempts.get(number, 0) + 1
            actor = idle.pop()
            ref = actor.run_shard.remote(number, chunk,
                                         str(shard_store_path(folder, number, backend)))
            pending[ref] = (number, chunk, actor)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_SECONDS)
        for ref in ready:
            number, chunk, actor = pending.pop(ref)
            try:
                results.append(ray.get(ref))
                finished_images += len(chunk)
                idle.append(actor)
            except ray.exceptions.RayActorError as err:
                # Ray restarted the actor ACTOR_RESTARTS times and gave up
                # (or its node is gone): a new actor takes the shard over.
                log.warning("shard %d: actor lost (%s); attempt %d of %d", number,
                            type(err).__name__, attempts[number], SHARD_ATTEMPTS)
                if replacements < n_actors * ACTOR_RESTARTS:
                    replacements += 1
                    idle.append(actor_class.remote(net_copy, options, board_name))
                if attempts[number] < SHARD_ATTEMPTS:
                    queue.appendleft((number, chunk))
                else:
                    failed.append(number)
            if not idle and not pending and queue:
                failed += [number for number, _ in queue]
                queue.clear()
        if totals_ref is None:
            totals_ref = board.totals.remote()
        if ray.wait([totals_ref], timeout=0)[0]:
            count, _ = ray.get(totals_ref)
            totals_ref = None
            if count > progress.done:
                progress.update(count - progress.done)
    count, starts = ray.get(board.totals.remote())
    # An actor's last report is sent without waiting and may reach the board
    # after this read (Ray orders calls per caller only): the shards that
    # returned are complete whatever the board has heard.
    count = max(count, finished_images)
    progress.update(max(0, count - progress.done))
    progress.close()
    if failed:
        raise UserError(f"{len(failed)} shard(s) failed {SHARD_ATTEMPTS} times (actors kept "
                        f"dying: out of memory, or an image that crashes the decoder?): "
                        f"{sorted(failed)}. What was extracted is kept in {folder}; "
                        "rerun the same command to finish the job.")
    report.forward_mode = (f"Ray: {n_actors} actors on {nodes} node(s), one "
                           f"{'GPU' if on_gpu else 'single-threaded CPU'} net each; "
                           f"{len(results)} shards; {starts - n_actors} actor restart(s) "
                           "or replacement(s)")
    return results
