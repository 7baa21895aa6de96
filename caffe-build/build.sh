#!/usr/bin/env bash
# Build Caffe (libcaffe, tools, pycaffe) from the pinned PyPI sdist into a
# cache outside the checkout, then link it as .caffe in the project root.
#
#   caffe-build/build.sh            # CPU_ONLY + OpenBLAS (default)
#   GPU=1 CUDNN=1 caffe-build/build.sh
#
# Environment: PYTHON (interpreter pycaffe is built for; default python3),
# CAFFE_CACHE_DIR (default ~/.cache/dlbhc/caffe), GPU, CUDNN, CUDA_DIR,
# CUDNN_DIR, CUDA_ARCH, JOBS (default: number of cores).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
CACHE=${CAFFE_CACHE_DIR:-$HOME/.cache/dlbhc/caffe}
JOBS=${JOBS:-$(nproc)}
say() { printf '[caffe-build] %s\n' "$*" >&2; }

switches=()
[ "${GPU:-0}" = 1 ] && switches+=(--gpu)
[ "${CUDNN:-0}" = 1 ] && switches+=(--cudnn)
[ -n "${CUDA_ARCH:-}" ] && switches+=(--cuda-arch "$CUDA_ARCH")

# 1. Debian packages: install only what is missing.
missing=()
while read -r pkg; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < "$HERE/apt-packages.txt"
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "missing Debian packages: ${missing[*]}"
    say "install them with: sudo apt-get install --no-install-recommends ${missing[*]}"
    exit 1
  fi
fi

# 2. The cache key covers the config, patches, this script and the toolchain.
config_text=$("$PYTHON" "$HERE/configure.py" config "${switches[@]}")
key=$("$PYTHON" "$HERE/configure.py" key "${switches[@]}")
dest="$CACHE/$key"
mkdir -p "$CACHE"

link_result() {
  ln -sfn "$dest" "$ROOT/.caffe"
  say "Caffe ready: $dest (linked as .caffe)"
}

exec 9>"$CACHE/.lock"
flock 9   # one build per cache at a time; a second caller waits, then reuses
if [ -f "$dest/.complete" ]; then
  say "cache hit ($key)"
  link_result
  exit 0
fi

# 3. Source: the pinned sdist, sha256-checked.
name=$(sed -n 's/^name *= *//p' "$HERE/SOURCE")
version=$(sed -n 's/^version *= *//p' "$HERE/SOURCE")
sha=$(sed -n 's/^sha256 *= *//p' "$HERE/SOURCE")
archive="$CACHE/downloads/$name-$version.tar.gz"
if [ ! -f "$archive" ] || ! echo "$sha  $archive" | sha256sum -c --status; then
  say "downloading $name==$version from PyPI"
  mkdir -p "$CACHE/downloads"
  rm -f "$archive"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
      "$name==$version" -d "$CACHE/downloads"
fi
if ! echo "$sha  $archive" | sha256sum -c --status; then
  say "sha256 mismatch for $archive (expected $sha): refusing to build"
  exit 1
fi

# 4. Unpack, patch, configure, build (in a scratch dir; renamed when done so
#    an interrupted build never looks complete).
work="$dest.partial"
rm -rf "$work"
mkdir -p "$work"
tar -xzf "$archive" -C "$work" --strip-components=1
# The sdist ships a caffe_pb2.py made by an old protoc that protobuf >= 4
# rejects; the build regenerates it with the system protoc.
rm -f "$work/python/caffe/proto/caffe_pb2.py" "$work/Makefile.config"
for p in "$HERE"/patches/*.patch; do
  say "patch $(basename "$p")"
  patch -d "$work" -p1 --quiet --forward < "$p"
done
printf '%s\n' "$config_text" > "$work/Makefile.config"
say "building with $JOBS jobs (about 9 minutes on 2 cores for CPU_ONLY)"
start=$(date +%s)
make -C "$work" -j"$JOBS" lib tools pycaffe > "$work/build.log" 2>&1 || {
  tail -40 "$work/build.log" >&2
  say "build failed; full log: $work/build.log"
  exit 1
}
say "built in $(( $(date +%s) - start )) s"
touch "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
link_result
