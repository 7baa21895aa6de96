"""dlbhc.files: digests, atomic writes, checked downloads, backend detection."""
import hashlib
import io
import os
import urllib.error

import pytest

from dlbhc.errors import UserError
from dlbhc.files import atomic_write, database_backend, download, file_digest


def test_file_digest_matches_hashlib(tmp_path):
    data = os.urandom(3 << 20)   # several read chunks
    (tmp_path / "f").write_bytes(data)
    for algo in ("sha1", "md5", "sha256"):
        assert file_digest(tmp_path / "f", algo) == hashlib.new(algo, data).hexdigest()


def test_atomic_write_leaves_old_file_on_failure_and_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "mean.npy"
    atomic_write(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["mean.npy"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __exit__(self, *exc):
        return False


def test_download_checks_the_digest_and_keeps_only_good_files(tmp_path):
    data = b"weights" * 1000
    good = hashlib.sha1(data).hexdigest()
    target = tmp_path / "w.caffemodel"
    download("http://x/w", target, "sha1", good, opener=lambda url, timeout: FakeResponse(data))
    assert target.read_bytes() == data
    other = tmp_path / "v.caffemodel"
    with pytest.raises(UserError, match="has sha1 .* expected 0000"):
        download("http://x/w", other, "sha1", "0000",
                 opener=lambda url, timeout: FakeResponse(data))
    assert not other.exists() and not (tmp_path / "v.caffemodel.partial").exists()


def test_download_offline_names_the_hint(tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")
    with pytest.raises(UserError, match="cannot download http://x/w .*no route.*\nput it at"):
        download("http://x/w", tmp_path / "w", "sha1", "0", opener=offline,
                 offline_hint="put it at w")
    assert os.listdir(tmp_path) == []


def test_database_backend_by_the_files_inside(tmp_path):
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "data.mdb").write_bytes(b"")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "CURRENT").write_text("MANIFEST-000001\n")
    (tmp_path / "e").mkdir()
    assert [database_backend(tmp_path / d) for d in "lve"] == ["lmdb", "leveldb", None]
    assert database_backend(tmp_path / "missing") is None
