"""Issue 13: extraction as a Ray job (extract.py --ray [ADDRESS]).

A real Ray cluster of two nodes on this machine (`ray start --head` plus a
second `ray start --address`, one CPU each, so one actor each), on the
loopback address, with its own auth token and temp folder; stopped by
killing the process groups this module started."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import EXTRACT, MEAN, free_port, make_images, make_tiny_net, run_extract

RAY = Path(sys.executable).with_name("ray")
PROGRESS = re.compile(r"extract \(ray\) (\d+)/(\d+)")


def _start(args, env, log):
    return subprocess.Popen([str(RAY), "start", *args, "--block", "--node-ip-address",
                             "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                             "--object-store-memory", str(100 << 20)],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _wait_for(log_path, text, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in Path(log_path).read_text(errors="replace"):
            return
        assert proc.poll() is None, Path(log_path).read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"ray start did not come up:\n{Path(log_path).read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, env) of a two-node Ray cluster on this machine."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))   # short: socket paths
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=uuid.uuid4().hex)
    port = free_port()
    procs = []
    try:
        with open(temp / "head.log", "w") as log:
            procs.append(_start(["--head", "--port", str(port), "--include-dashboard", "false",
                                 "--temp-dir", str(temp)], env, log))
        _wait_for(temp / "head.log", "block forever", procs[0])
        with open(temp / "node.log", "w") as log:
            procs.append(_start(["--address", f"127.0.0.1:{port}"], env, log))
        _wait_for(temp / "node.log", "block forever", procs[1])
        yield f"127.0.0.1:{port}", env
    finally:
        for proc in procs:          # the groups these ray start commands lead
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        subprocess.run(["rm", "-rf", str(temp)])


@pytest.fixture(scope="module")
def slow_net(caffe, tmp_path_factory):
    """A net slow enough (~15-35 ms an image on one thread here) that a job
    of a few hundred images lasts long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("slow")
    return make_tiny_net(caffe, folder, size=64, fc7=64, convs=5)


@pytest.fixture(scope="module")
def collection(slow_net, tmp_path_factory):
    """300 images, one unreadable, and their single-process extraction."""
    folder = tmp_path_factory.mktemp("collection")
    make_images(folder / "imgs", 300)
    (folder / "imgs" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    single = folder / "single.lmdb"
    out = run_extract([folder / "imgs", "--out", single, *model_args(slow_net)], check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    return folder / "imgs", single


def model_args(net):
    deploy, weights = net
    return ["--deploy", deploy, "--weights", weights, "--mean", MEAN, "--batch-size", 4]


def start_extract(args, env, err_path):
    return subprocess.Popen([sys.executable, str(EXTRACT), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=open(err_path, "w"), text=True,
                            env=env)


def wait_for_progress(err_path, proc, at_least, seconds=180):
    """Block until the driver's progress line shows >= at_least images."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = [int(m.group(1)) for m in PROGRESS.finditer(Path(err_path).read_text())]
        if done and max(done) >= at_least:
            return max(done)
        assert proc.poll() is None, Path(err_path).read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no progress: " + Path(err_path).read_text()[-3000:])


def shard_actor_pids():
    """Processes of this machine's Ray actors of class ShardExtractor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::ShardExtractor"):
                pids.append(int(entry.name))
    return pids


def assert_same_database(got, expected, n):
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(got) as g, FeatureStore.open(expected) as e:
        assert g.count == e.count == n
        paths = [i["path"] for i in g.infos()]
        assert len(set(paths)) == n                    # nothing twice
        assert g.infos() == e.infos()                  # same images, same order, seq, labels
        np.testing.assert_array_equal(g.codes(), e.codes())
        # Up to float summation order: a shard's last batch is smaller than
        # the single run's batch at that place, and BLAS blocks by batch size.
        np.testing.assert_allclose(g.fc7(range(n)), e.fc7(range(n)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.latent(range(n)), e.latent(range(n)), rtol=1e-5,
                                   atol=1e-6)
        drop = ("created", "count")
        assert {k: v for k, v in g.meta.items() if k not in drop} == \
            {k: v for k, v in e.meta.items() if k not in drop}


@pytest.mark.ray
def test_killed_actor_is_retried_and_every_image_is_stored_once(ray_cluster, slow_net,
                                                                 collection, tmp_path):
    address, env = ray_cluster
    images, single = collection
    out, err = tmp_path / "ray.lmdb", tmp_path / "err.txt"
    proc = start_extract([images, "--out", out, *model_args(slow_net), "--commit-every", 0,
                          "--ray", address, "--ray-shard-size", 15], env, err)
    wait_for_progress(err, proc, 20)
    victims = shard_actor_pids()
    assert victims and proc.poll() is None, "the job ended before an actor could be killed"
    os.kill(victims[0], signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=300)
    log = err.read_text()
    assert proc.returncode == 3, log[-3000:]          # the broken file, as a plain run
    assert max(int(m.group(1)) for m in PROGRESS.finditer(log)) == 301   # cluster-wide
    assert "2 actors on 2 node(s)" in stdout and "1 actor restart(s)" in stdout, stdout
    assert "skipped" in log and "broken.jpg" in log
    assert_same_database(out, single, 300)
    assert not (tmp_path / "ray.lmdb.ray-shards").exists()
    assert (tmp_path / "ray.lmdb.skipped.tsv").read_text().count("broken.jpg") == 1


@pytest.mark.ray
def test_rerun_after_the_driver_is_killed_finishes_the_job(ray_cluster, slow_net,
                                                           collection, tmp_path):
    address, env = ray_cluster
    images, single = collection
    out = tmp_path / "ray.lmdb"
    args = [images, "--out", out, *model_args(slow_net), "--ray", address,
            "--ray-shard-size", 15]
    proc = start_extract(args, env, tmp_path / "first.txt")
    wait_for_progress(tmp_path / "first.txt", proc, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from dlbhc.store.database import FeatureStore
    shards = sorted((tmp_path / "ray.lmdb.ray-shards").glob("shard-*.lmdb"))
    assert shards, "the killed run left no shards"
    with FeatureStore.open(out) as db:
        assert db.count == 0                          # nothing merged yet
    rerun = start_extract(args, env, tmp_path / "second.txt")
    stdout, _ = rerun.communicate(timeout=300)
    log = (tmp_path / "second.txt").read_text()
    assert rerun.returncode == 3, log[-3000:]
    assert re.search(r"0 of 301 images already stored, [1-9]\d* in shards of an earlier run",
                     log), log[-2000:]
    assert_same_database(out, single, 300)
    # a third run finds everything stored (it tries the unreadable file again,
    # as a plain rerun does)
    third = run_extract(args, check=False, env=env)
    assert third.returncode == 3, third.stderr[-2000:]
    assert re.search(r"stored 0 new images .*, 300 were already there", third.stdout)


@pytest.mark.ray
def test_without_an_address_a_local_ray_runs_the_same_job(caffe, tmp_path):
    deploy, weights = make_tiny_net(caffe, tmp_path)
    make_images(tmp_path / "imgs", 40)
    common = [tmp_path / "imgs", *model_args((deploy, weights))]
    run_extract([*common, "--out", tmp_path / "single.lmdb"])
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    out = run_extract([*common, "--out", tmp_path / "ray.lmdb", "--ray"], env=env)
    assert "Ray: " in out.stdout and "on 1 node(s)" in out.stdout, out.stdout
    assert_same_database(tmp_path / "ray.lmdb", tmp_path / "single.lmdb", 40)


@pytest.mark.ray
def test_an_unreachable_cluster_is_a_clear_error(caffe, tmp_path):
    deploy, weights = make_tiny_net(caffe, tmp_path)
    make_images(tmp_path / "imgs", 3)
    port = free_port()                               # nobody listens there
    out = run_extract([tmp_path / "imgs", "--out", tmp_path / "db.lmdb",
                       *model_args((deploy, weights)), "--ray", f"127.0.0.1:{port}"],
                      check=False, timeout=240)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "db.lmdb").exists()


def test_ray_options_are_checked(tmp_path):
    out = run_extract([tmp_path, "--out", tmp_path / "db", "--deploy", "d", "--weights", "w",
                       "--mean", MEAN, "--ray", "--shard", "0/2"], check=False)
    assert out.returncode == 2 and "--shard" in out.stderr
    out = run_extract([tmp_path, "--out", tmp_path / "db", "--deploy", "d", "--weights", "w",
                       "--mean", MEAN, "--ray", "--ray-actors", "0"], check=False)
    assert out.returncode == 2 and "--ray-actors" in out.stderr


def test_shards_are_consecutive_runs_of_the_input_order():
    from dlbhc.scale.ray_extract import default_shard_size, plan_shards
    triples = [(i, f"/p{i}", 0) for i in range(10)]
    shards = plan_shards(triples, 4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [t for s in shards for t in s] == triples
    assert default_shard_size(10_000, 2, 50) == 313          # 16 shards per actor
    assert default_shard_size(100, 2, 50) == 50              # never below a batch
    assert default_shard_size(10**9, 2, 50) == 20000         # nor above the cap


def test_an_actors_messages_are_caught_and_returned(capsys):
    """An actor logs through the package's logger; caught_messages keeps
    those lines (for the shard's summary) instead of printing them on the
    actor's stderr, which Ray would forward to the driver's."""
    import logging
    from dlbhc.report import get_logger
    from dlbhc.scale.ray_extract import caught_messages
    root = logging.getLogger("dlbhc")
    before = root.level, root.propagate, list(root.handlers)
    with caught_messages() as lines:
        get_logger("dlbhc.extraction.pipeline").warning("skipped %s: %s", "a.jpg", "broken")
        get_logger("dlbhc.extraction.pipeline").info("3 of 4 images already stored")
    assert lines == ["WARNING skipped a.jpg: broken", "INFO 3 of 4 images already stored"]
    assert capsys.readouterr().err == ""
    assert (root.level, root.propagate, list(root.handlers)) == before
