"""Shared test set-up: the library package (python/dlbhc) on sys.path, the
`caffe` marker put on every test that uses the Caffe build, and the
fixtures several test files use.

Markers (registered in pytest.ini, --strict-markers): caffe, slow, ray,
milvus, browser, network.  `make test` runs every test; `make test-fast`
leaves out ray, milvus, browser, network and slow (the inner loop).
"""
import os
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# This checkout's package first, for the tests and for the scripts and
# workers they start (data/ and benchmarks/ scripts import the installed
# package: a venv's editable install may point at another checkout).
sys.path.insert(0, str(PROJECT_ROOT / "python"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PROJECT_ROOT / "python")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_collection_modifyitems(items):
    """A test that uses the `caffe` fixture, itself or through another
    fixture (a tiny net, a database made by extract.py), needs the Caffe
    build: it is marked `caffe` here, so no such test can miss the mark.
    (Tests that run Caffe only through a script carry the mark themselves.)"""
    for item in items:
        if "caffe" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.caffe)


@pytest.fixture(scope="session")
def caffe():
    """pycaffe from the project's build, in CPU mode. Without a build the
    tests that use it fail (`make test` builds Caffe first): a missing build
    is a broken set-up, not a reason to skip."""
    from dlbhc.nets.caffe_env import import_caffe
    caffe = import_caffe()
    caffe.set_mode_cpu()
    return caffe


@pytest.fixture(scope="session")
def tiny_net(caffe, tmp_path_factory):
    """(deploy, weights) of helpers.make_tiny_net's default net: 24x24
    input, 32 fc7 values, 12 bits, random weights (seed 0). Read-only: a
    test that needs another net makes its own."""
    from helpers import make_tiny_net
    return make_tiny_net(caffe, tmp_path_factory.mktemp("tiny_net"))


@pytest.fixture(scope="session")
def database(caffe, tmp_path_factory):
    """The tiny feature database that retrieval, serving and API tests
    search: 40 generated images in classes a, b, c (folder/imgs) extracted
    by extract.py with a 12-bit tiny net; {db, deploy, weights, folder}.
    Shared by the whole session: tests only read it (a test that appends
    makes its own database)."""
    from helpers import tiny_database
    return tiny_database(caffe, tmp_path_factory.mktemp("database"))
