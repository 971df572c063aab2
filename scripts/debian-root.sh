#!/usr/bin/env bash
# Prints the path of a minimal Debian 12 root tarball (mmdebstrap, systemd as init),
# making it first if the cache does not hold it.  The cache key is the hash of
# tests/boot/debian-packages.txt; CI caches the directory between runs
# ($PYIMG_DEBIAN_CACHE, default ~/.cache/pyimg/mmdebstrap).  mmdebstrap runs as root
# (through sudo when not root): CI runners often refuse unprivileged user namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
list=tests/boot/debian-packages.txt
key=$(sha256sum "$list" | cut -c1-16)
cache=${PYIMG_DEBIAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyimg/mmdebstrap}
out=$cache/bookworm-minbase-$key.tar
if [ ! -s "$out" ]; then
  mkdir -p "$cache"
  include=$(grep -v '^#' "$list" | xargs | tr ' ' ',')
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # --format: mmdebstrap picks the format from the name, and "*.tmp" is not a tarball.
  $SUDO mmdebstrap --quiet --variant=minbase --format=tar --include="$include" bookworm "$out.tmp" >&2
  [ -z "$SUDO" ] || $SUDO chown "$(id -u):$(id -g)" "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "$out"
