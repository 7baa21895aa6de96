#!/usr/bin/env python3
"""Write Caffe's Makefile.config for this machine and compute the build cache key.

The build cache (see build.sh) is keyed by everything the compiled Caffe
depends on: the source archive, the generated config (which already holds
the device switch, Python and numpy paths), the patches, the build script,
and the versions of the compiler, Python, numpy and protoc. Change any of
these and the key changes, so a stale build is never reused.

    configure.py config [--gpu] [--cudnn] [--cuda-dir DIR] [--cuda-arch ARCH]
    configure.py key    [same switches]      # prints the cache key
"""
import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "Makefile.config.in"
PATCH_DIR = HERE / "patches"
SOURCE_FILE = HERE / "SOURCE"

# Volta (7.0) to Hopper (9.0): the range current CUDA toolkits (12.x, 13.x)
# accept. CUDA 13 dropped everything below 7.5, so 7.0 is added only when the
# toolkit still knows it (see cuda_arch_flags). PTX for 9.0 keeps newer GPUs
# working through the driver's JIT.
MODERN_ARCHS = ["70", "75", "80", "86", "89", "90"]


def read_source_pin():
    """Return the pinned source as a dict: name, version, sha256."""
    pin = {}
    for line in SOURCE_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    return pin


def nvcc_major(cuda_dir):
    nvcc = Path(cuda_dir) / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return int(token[1:].split(".")[0])
    return None


def cuda_arch_flags(archs=None, cuda_major=None):
    if archs is None:
        archs = [a for a in MODERN_ARCHS
                 if not (cuda_major is not None and cuda_major >= 13 and a == "70")]
    flags = [f"-gencode arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return " \\\n\t\t".join(flags)


def python_settings():
    import numpy
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    libdir = sysconfig.get_config_var("LIBDIR") or "/usr/lib"
    return {
        "BOOST_PYTHON": f"boost_python{version}",
        "PYTHON_LIBNAME": f"python{sys.version_info.major}.{sys.version_info.minor}",
        "PYTHON_INCLUDE": sysconfig.get_paths()["include"],
        "NUMPY_INCLUDE": numpy.get_include(),
        "PYTHON_LIBDIR": libdir,
    }


def render_config(gpu=False, cudnn=False, cuda_dir="/usr/local/cuda",
                  cuda_arch=None, cudnn_dir=None, python=None):
    """Return the text of Makefile.config for the given switches."""
    if cudnn and not gpu:
        raise ValueError("CUDNN=1 needs GPU=1: cuDNN is a CUDA library")
    if gpu:
        arch = cuda_arch or cuda_arch_flags(cuda_major=nvcc_major(cuda_dir))
        device = [f"CUDA_DIR := {cuda_dir}", f"CUDA_ARCH := {arch}"]
        if cudnn:
            device.insert(0, "USE_CUDNN := 1")
    else:
        device = ["CPU_ONLY := 1"]
    extra_inc = extra_lib = ""
    if gpu and (Path(cuda_dir) / "include" / "cccl").is_dir():
        # CUDA 13 moved thrust/cub under include/cccl: nvcc adds it by itself,
        # g++ compiling Caffe's .cpp files that include thrust does not.
        extra_inc += f" {cuda_dir}/include/cccl"
    if cudnn and cudnn_dir:
        extra_inc += f" {cudnn_dir}/include"
        extra_lib += f" {cudnn_dir}/lib"
    values = dict(python or python_settings())
    values.update(
        DEVICE_LINES="\n".join(device),
        BLAS_INCLUDE="/usr/include/x86_64-linux-gnu/openblas-pthread",
        BLAS_LIB="/usr/lib/x86_64-linux-gnu/openblas-pthread",
        EXTRA_INCLUDE=extra_inc,
        EXTRA_LIB=extra_lib,
    )
    return Template(TEMPLATE.read_text()).substitute(values)


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "missing"


def cache_key(config_text, toolchain=None):
    """Hash of everything the build output depends on (16 hex digits).

    numpy's include folder lies inside the virtual environment, whose path
    differs in every clone; what the build depends on is numpy's version
    (part of the toolchain below), so the path is left out of the key and a
    clean clone finds the cached build.
    """
    h = hashlib.sha256()
    h.update(read_source_pin()["sha256"].encode())
    try:
        import numpy
        config_text = config_text.replace(numpy.get_include(), "<numpy include>")
    except ImportError:
        pass
    h.update(config_text.encode())
    for path in sorted(PATCH_DIR.glob("*.patch")) + [HERE / "build.sh"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    if toolchain is None:
        import numpy
        toolchain = [
            tool_version([os.environ.get("CXX", "g++"), "--version"]),
            tool_version(["protoc", "--version"]),
            sys.version,
            numpy.__version__,
        ]
    for item in toolchain:
        h.update(str(item).encode())
    return h.hexdigest()[:16]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["config", "key"])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cudnn", action="store_true")
    parser.add_argument("--cuda-dir", default=os.environ.get("CUDA_DIR", "/usr/local/cuda"))
    parser.add_argument("--cudnn-dir", default=os.environ.get("CUDNN_DIR") or None)
    parser.add_argument("--cuda-arch", default=None,
                        help="override CUDA_ARCH (nvcc -gencode flags)")
    args = parser.parse_args(argv)
    try:
        text = render_config(args.gpu, args.cudnn, args.cuda_dir, args.cuda_arch,
                             args.cudnn_dir)
    except ValueError as err:
        parser.error(str(err))
    if args.action == "config":
        sys.stdout.write(text)
    else:
        print(cache_key(text))


if __name__ == "__main__":
    main()
