"""dlbhc.search.native: the project's C kernels built on first use into a cache,
loaded once, with a clear error when no compiler can build them."""
import ctypes

import numpy as np
import pytest

from dlbhc.search import native
from dlbhc.errors import UserError


def test_kernel_is_built_into_the_cache_named_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("DLBHC_NATIVE_CACHE", str(tmp_path))
    path = native.library_path("hamming_ball")
    assert path.parent.parent == tmp_path and not path.exists()
    assert native.build("hamming_ball") == path and path.is_file()
    # no temporary file left beside it; a second build reuses the file
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    assert native.build("hamming_ball") == path and path.stat().st_mtime_ns == mtime
    # the fresh library works: one 64-bit code at distance 3 from the query
    lib = ctypes.CDLL(str(path))
    rows = np.array([[0b111]], dtype=np.uint64)
    kept_pos, kept_dist = np.empty(1, np.int64), np.empty(1, np.uint16)
    pos, dist, radius = np.empty(1, np.int64), np.empty(1, np.int32), np.empty(1, np.int32)
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.dlbhc_ball_search.argtypes = (ptr, i64, ptr, i32, ctypes.c_char_p, i32, i64, i32,
                                      ptr, i64, ptr, i64, i32, ptr, ptr, ptr, ptr, ptr)
    lib.dlbhc_ball_search.restype = i64
    found = lib.dlbhc_ball_search(rows.ctypes.data, 1, None, 1, bytes(8), 8, 1, 64,
                                  None, 0, None, 0, -1,
                                  kept_pos.ctypes.data, kept_dist.ctypes.data, pos.ctypes.data,
                                  dist.ctypes.data, radius.ctypes.data)
    assert (found, pos[0], dist[0], radius[0]) == (1, 0, 3, 3)


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DLBHC_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(UserError, match="no-such-compiler-xyz.*Install a C compiler"):
        native.build("hamming_ball")
    assert not any(tmp_path.rglob("*.so")) and not any(tmp_path.rglob("*.tmp"))


def test_a_failing_compile_shows_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("DLBHC_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"cc -include {tmp_path}/missing.h")
    with pytest.raises(UserError, match="cannot build the C kernel hamming_ball.c") as err:
        native.build("hamming_ball")
    assert "error" in str(err.value)
    assert not any(tmp_path.rglob("*.so")) and not any(tmp_path.rglob("*.tmp"))


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DLBHC_NATIVE_CACHE", str(blocker / "cache"))
    with pytest.raises(UserError, match="set DLBHC_NATIVE_CACHE to a writable folder"):
        native.build("hamming_ball")
