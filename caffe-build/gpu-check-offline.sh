#!/usr/bin/env bash
# Build Caffe GPU=1 CUDNN=1 on a CUDA machine that has no package access, and
# run it: `caffe device_query` and `caffe time -gpu 0` on the project's nets.
#
# The machine needs nvcc (CUDA_DIR) and cuDNN (CUDNN_DIR, or the pip wheel
# nvidia-cudnn-cu1x in python3). Caffe's other dependencies come as Debian 12
# packages in $DEBS (made on a Debian machine with `apt-get download ...`, see
# README "Checking the GPU build"), unpacked into a private prefix; with them
# the pinned sdist. Only libcaffe and the caffe tool are built (no pycaffe;
# OpenCV, LevelDB and LMDB off), for one architecture ($ARCH) to save time.
# The build itself is the project's: same patches, same config generator.
#
# The packages (Debian 12, `apt-get download` into .debs/, plus the sdist
# brocolli-caffe-9.0.2.tar.gz from ~/.cache/dlbhc/caffe/downloads):
#   libboost1.74-dev libboost-{system,thread,filesystem,atomic,regex}1.74-dev
#   libboost-{system,thread,filesystem,atomic,regex}1.74.0 libicu72
#   libgoogle-glog-dev libgoogle-glog0v6 libgflags-dev libgflags2.2 libunwind8
#   libunwind-dev libprotobuf-dev libprotobuf32 libprotoc32 protobuf-compiler
#   libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas0
#   libgfortran5 libquadmath0 libhdf5-dev libhdf5-103-1 libhdf5-hl-100 libaec0
#   libsz2 libcurl4 libnghttp2-14 librtmp1 libssh2-1 libpsl5 libbrotli1
#   libldap-2.5-0 libsasl2-2 libssl3 libzstd1 libidn2-0 libunistring2
#   libgnutls30 libhogweed6 libnettle8 libtasn1-6 libp11-kit0 libffi8 libgmp10
#   libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1
#   libcom-err2
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DEBS=${DEBS:-$ROOT/.debs}
PREFIX=${PREFIX:-/tmp/caffe-deps}
WORK=${WORK:-/tmp/caffe-gpu}
CUDA_DIR=${CUDA_DIR:-/usr/local/cuda}
ARCH=${ARCH:-90}
JOBS=${JOBS:-$(nproc)}
LOG=${LOG:-/tmp}
say() { printf '[gpu-check] %s\n' "$*"; }

echo "host compiler: $(command -v g++ || echo none) $(g++ --version 2>/dev/null | head -1)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$CUDA_DIR/bin/nvcc" --version | tail -2

mkdir -p "$PREFIX"
for deb in "$DEBS"/*.deb; do dpkg -x "$deb" "$PREFIX"; done
LIBDIR="$PREFIX/usr/lib/x86_64-linux-gnu"
export PATH="$PREFIX/usr/bin:$PATH"
export LD_LIBRARY_PATH="$LIBDIR:$LIBDIR/hdf5/serial:$LIBDIR/openblas-pthread:${LD_LIBRARY_PATH:-}"

if [ -z "${CUDNN_DIR:-}" ]; then
  wheel=$(python3 -c 'import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0])')
  CUDNN_DIR=/tmp/cudnn
  mkdir -p $CUDNN_DIR/lib
  ln -sfn "$wheel/include" $CUDNN_DIR/include
  for so in "$wheel"/lib/libcudnn*.so.*; do ln -sf "$so" $CUDNN_DIR/lib/; done
  ln -sf "$(ls "$wheel"/lib/libcudnn.so.* | head -1)" $CUDNN_DIR/lib/libcudnn.so
fi
grep -m1 -h "define CUDNN_MAJOR" "$CUDNN_DIR"/include/cudnn_version*.h || true
export LD_LIBRARY_PATH="$CUDNN_DIR/lib:$CUDA_DIR/lib64:$LD_LIBRARY_PATH"

rm -rf "$WORK" && mkdir -p "$WORK"
tar -xzf "$DEBS"/brocolli-caffe-9.0.2.tar.gz -C "$WORK" --strip-components=1
rm -f "$WORK/python/caffe/proto/caffe_pb2.py" "$WORK/include/caffe/proto/caffe.pb.h" \
      "$WORK/src/caffe/proto/caffe.pb.cc" "$WORK/Makefile.config"
for p in "$HERE"/patches/*.patch; do patch -d "$WORK" -p1 --quiet --forward < "$p"; done
python3 "$HERE/configure.py" config --gpu --cudnn --cuda-dir "$CUDA_DIR" \
    --cudnn-dir "$CUDNN_DIR" \
    --cuda-arch "-gencode arch=compute_$ARCH,code=sm_$ARCH" > "$WORK/Makefile.config"
cat >> "$WORK/Makefile.config" <<CFG
# offline check: I/O libraries not carried, private prefix for the rest
USE_OPENCV := 0
USE_LEVELDB := 0
USE_LMDB := 0
BLAS_INCLUDE := $PREFIX/usr/include/x86_64-linux-gnu/openblas-pthread
BLAS_LIB := $LIBDIR/openblas-pthread
INCLUDE_DIRS += $PREFIX/usr/include $PREFIX/usr/include/x86_64-linux-gnu $PREFIX/usr/include/hdf5/serial
LIBRARY_DIRS += $LIBDIR $LIBDIR/hdf5/serial
CFG
say "building libcaffe + tools with $JOBS jobs for sm_$ARCH"
start=$(date +%s)
if ! make -C "$WORK" -j"$JOBS" lib tools > "$LOG/gpu-build.log" 2>&1; then
  grep -m20 -B2 -A6 "error" "$LOG/gpu-build.log" || tail -40 "$LOG/gpu-build.log"
  exit 1
fi
say "built in $(( $(date +%s) - start )) s"
CAFFE="$WORK/build/tools/caffe"
export GLOG_logtostderr=1
"$CAFFE" device_query -gpu 0 2>&1 | grep -E "Device id|Major|Minor|Name|Total global" || true
for net in cifar_hash48 alexnet_hash48; do
  model="$ROOT/prototxt/${net}_deploy.prototxt"
  say "caffe time -gpu 0 $net (cuDNN)"
  "$CAFFE" time -model "$model" -gpu 0 -iterations 50 2>&1 | grep -E "Average (Forward|Backward|Forward-Backward)|Total Time" | tee -a "$LOG/gpu-time.txt"
  say "caffe time (CPU, same machine) $net"
  "$CAFFE" time -model "$model" -iterations 5 2>&1 | grep -E "Average (Forward|Backward|Forward-Backward)" | tee -a "$LOG/gpu-time.txt"
done
