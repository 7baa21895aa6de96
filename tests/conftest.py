"""Shared test set-up: the library package (python/dlbhc) on sys.path and
the fixtures several test files use."""
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "python"))


@pytest.fixture(scope="session")
def caffe():
    """pycaffe from the project's build, in CPU mode. Without a build the
    tests that use it fail (`make test` builds Caffe first): a missing build
    is a broken set-up, not a reason to skip."""
    from dlbhc.nets.caffe_env import import_caffe
    caffe = import_caffe()
    caffe.set_mode_cpu()
    return caffe
