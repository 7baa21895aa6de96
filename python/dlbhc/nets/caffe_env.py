"""Find the project's own Caffe build and import pycaffe from it.

`make caffe` builds Caffe into a cache outside the checkout and links it as
`.caffe` in the project root. This module puts `.caffe/python` on sys.path,
so scripts and tests need no PYTHONPATH; libcaffe is found through the rpath
that Caffe's Makefile sets on _caffe.so, so no LD_LIBRARY_PATH either.
CAFFE_ROOT, when set, points at another Caffe tree (for example one built by
hand) and wins over `.caffe`.
"""
import ctypes
import os
import sys
from pathlib import Path

from ..errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def caffe_root():
    """The Caffe tree in use: $CAFFE_ROOT, else the project's .caffe link."""
    env = os.environ.get("CAFFE_ROOT")
    return Path(env) if env else PROJECT_ROOT / ".caffe"


def caffe_tool(name):
    """Path of a Caffe command-line tool (caffe, compute_image_mean, ...)."""
    path = caffe_root() / "build" / "tools" / name
    if not path.exists():
        raise UserError(f"Caffe tool {name} not found at {path}: run `make caffe` first")
    return path


def import_caffe():
    """Import pycaffe from the project's build (or $CAFFE_ROOT)."""
    if "caffe" in sys.modules:
        return sys.modules["caffe"]
    py_dir = caffe_root() / "python"
    if not (py_dir / "caffe" / "_caffe.so").exists():
        raise UserError(
            f"pycaffe is not built (looked in {py_dir}): run `make caffe` in "
            f"{PROJECT_ROOT}, or set CAFFE_ROOT to a built Caffe tree")
    if str(py_dir) not in sys.path:
        sys.path.insert(0, str(py_dir))
    # Caffe logs every layer it sets up through glog; keep the console for
    # our own progress unless the user asks for Caffe's log.
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe  # noqa: E402  (path set just above)
    return caffe


def is_cpu_only_build():
    """True when the Caffe in use was built CPU_ONLY (its Makefile.config says
    so). Asked before set_mode_gpu, which would abort the process there."""
    config = caffe_root() / "Makefile.config"
    if not config.exists():
        return False  # a Caffe built some other way: let Caffe itself decide
    return any(line.split("#")[0].replace(" ", "") == "CPU_ONLY:=1"
               for line in config.read_text().splitlines())


def set_mode(gpu=None):
    """Caffe's convention: `--gpu N` (cli.add_gpu_argument) selects
    set_mode_gpu + set_device(N), otherwise set_mode_cpu. Returns the caffe
    module."""
    caffe = import_caffe()
    if gpu is None or gpu < 0:
        caffe.set_mode_cpu()
    elif is_cpu_only_build():
        raise UserError(f"--gpu {gpu}: this Caffe ({caffe_root()}) is a CPU_ONLY build; "
                        "rebuild with `make caffe GPU=1 CUDNN=1`, or drop --gpu")
    else:
        caffe.set_device(gpu)
        caffe.set_mode_gpu()
    return caffe


def blas_threads_control():
    """(get, set) functions for the thread count of the OpenBLAS that
    libcaffe calls, or None when Caffe was linked with another BLAS. dlopen
    of the already loaded soname returns the same library, so this changes
    the running Caffe's GEMMs (numpy's wheels bundle a separate OpenBLAS)."""
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        return lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (OSError, AttributeError):
        return None


def set_blas_threads(n):
    """Set the OpenBLAS threads of this process's Caffe to `n` (None or 0:
    leave them) when it uses OpenBLAS; the count in force afterwards, read
    back (None: another BLAS). Every process that runs a net of its own (an
    extraction worker or Ray actor, a server's net process, a feature-cache
    worker) sets its threads here."""
    control = blas_threads_control()
    if control is None:
        return None
    if n:
        control[1](int(n))
    return int(control[0]())
