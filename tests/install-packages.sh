#!/usr/bin/env bash
# Install the Debian packages listed in FILE (one a line, # comments) that
# are missing; as root with apt-get, else say which to install and fail.
# (caffe-build/build.sh does the same for Caffe's packages itself: that
# script is part of Caffe's build-cache key, so it is left as it is.)
set -euo pipefail
list=${1:?usage: install-packages.sh FILE}
missing=()
while read -r pkg _; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < "$list"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test-packages] installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "[test-packages] missing Debian packages: ${missing[*]}" >&2
  echo "[test-packages] install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
