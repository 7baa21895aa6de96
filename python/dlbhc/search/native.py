"""The project's own C kernels (csrc/*.c), built on first use and loaded
with ctypes.

Like pycaffe, the fast path is compiled code; unlike Caffe it is one small
file with no dependencies, so it is compiled by the C compiler Caffe's
build already needs (``$CC``, default ``cc``), once per machine and source
version, into a cache outside the checkout:
``$DLBHC_NATIVE_CACHE`` or ``~/.cache/dlbhc/native/<key>/`` where the key
hashes the source, the flags and the machine type.  The library is written
to a temporary name and renamed into place, so processes starting together
(the service's workers) never load a half-written file.  `make native`
builds it ahead (the Docker image does).

ctypes releases the GIL during a call, so threads scan concurrently.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import UserError

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
# -O3: the scan loops vectorise the histogram-free parts; gnu11 for the
# statement expression of the generic width.  No -march=native: the
# library must run on any machine of the same type (popcnt is picked at
# load time by the source's target_clones).
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared")

_LOCK = threading.Lock()
_LOADED = {}


def cache_dir():
    """Where built libraries are kept (created on demand)."""
    env = os.environ.get("DLBHC_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlbhc" / "native"


def compiler():
    """The C compiler command (a list): $CC, else cc."""
    return shlex.split(os.environ.get("CC") or "cc")


def library_path(name):
    """The cached library of csrc/<name>.c for this source, flags and machine."""
    source = (SOURCE_DIR / f"{name}.c").read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(CFLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return cache_dir() / key / f"lib{name}.so"


def build(name):
    """Compile csrc/<name>.c into the cache unless already there; its path."""
    path = library_path(name)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write the C kernel {name}.c's build into {path.parent} "
                        f"({err.strerror}); set DLBHC_NATIVE_CACHE to a writable "
                        f"folder") from None
    os.close(fd)
    cmd = [*compiler(), *CFLAGS, "-o", tmp, str(SOURCE_DIR / f"{name}.c")]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise UserError(
                f"cannot build the C kernel {name}.c: the compiler {cmd[0]!r} could not "
                f"be run ({err.strerror}). Install a C compiler (Debian: apt-get install "
                f"gcc; Caffe's build needs one too) or name one with CC=...") from None
        if done.returncode != 0:
            raise UserError(f"cannot build the C kernel {name}.c with {shlex.join(cmd)}:\n"
                            f"{done.stderr.strip()}\nCheck the compiler (CC=...) and "
                            f"that the checkout's python/dlbhc/csrc is intact.")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load(name):
    """The ctypes library of csrc/<name>.c (built first if needed), once per
    process."""
    with _LOCK:
        lib = _LOADED.get(name)
        if lib is None:
            lib = ctypes.CDLL(str(build(name)))
            _LOADED[name] = lib
        return lib
