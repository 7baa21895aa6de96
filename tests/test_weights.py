"""make weights: model-zoo download with the sha1 check (mocked network)."""
import hashlib
import io
import urllib.error

import pytest

from dlbhc.errors import UserError
from dlbhc.nets.weights import MODELS_DIR, fetch, read_frontmatter


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def zoo(tmp_path, payload):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "readme.md").write_text(
        "---\nname: toy\ncaffemodel: toy.caffemodel\ncaffemodel_url: http://example.invalid/toy\n"
        f"sha1: {hashlib.sha1(payload).hexdigest()}\n---\n")
    return folder


def test_the_shipped_readmes_name_the_official_files():
    alexnet = read_frontmatter(MODELS_DIR / "bvlc_alexnet" / "readme.md")
    assert alexnet["sha1"] == "9116a64c0fbe4459d18f4bb6b56d647b63920377"
    assert alexnet["caffemodel_url"].endswith("/bvlc_alexnet.caffemodel")
    assert read_frontmatter(MODELS_DIR / "bvlc_reference_caffenet" / "readme.md")["sha1"]


def test_download_is_checked_and_kept(tmp_path):
    payload = b"weights" * 1000
    folder = zoo(tmp_path, payload)
    path = fetch("toy", tmp_path, opener=lambda url, timeout: FakeResponse(payload))
    assert path == folder / "toy.caffemodel" and path.read_bytes() == payload
    # present and right: no second download
    assert fetch("toy", tmp_path, opener=None) == path


def test_wrong_sha1_is_not_kept(tmp_path):
    folder = zoo(tmp_path, b"the real thing")
    with pytest.raises(UserError, match="sha1"):
        fetch("toy", tmp_path, opener=lambda url, timeout: FakeResponse(b"something else"))
    assert not list(folder.glob("toy.caffemodel*"))


def test_offline_names_the_url_and_where_to_put_the_file(tmp_path):
    zoo(tmp_path, b"x")

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    with pytest.raises(UserError) as err:
        fetch("toy", tmp_path, opener=offline)
    assert "http://example.invalid/toy" in str(err.value) and "toy.caffemodel" in str(err.value)


def test_unknown_model_lists_the_known_ones(tmp_path):
    zoo(tmp_path, b"x")
    with pytest.raises(UserError, match="toy"):
        fetch("nope", tmp_path)
