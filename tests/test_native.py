"""dlbhc.native: the project's C kernels built on first use into a cache,
loaded once, with a clear error when no compiler can build them."""
import ctypes

import numpy as np
import pytest

from dlbhc import native
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
    q = np.zeros(1, dtype=np.uint64)
    rows_h, images_h = np.empty(65, np.int64), np.empty(65, np.int64)
    kept_pos, kept_dist, bound = np.empty(1, np.int64), np.empty(1, np.uint16), np.empty(1, np.int32)
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.dlbhc_ball_scan.argtypes = (ptr, i64, i32, ptr, ptr, i64, i32, ptr, ptr, ptr, ptr, ptr)
    lib.dlbhc_ball_scan.restype = i64
    kept = lib.dlbhc_ball_scan(rows.ctypes.data, 1, 1, q.ctypes.data, None, 1, 64,
                               rows_h.ctypes.data, images_h.ctypes.data, kept_pos.ctypes.data,
                               kept_dist.ctypes.data, bound.ctypes.data)
    assert (kept, kept_pos[0], kept_dist[0], bound[0]) == (1, 0, 3, 3)
    assert rows_h[3] == 1 and rows_h.sum() == 1


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
