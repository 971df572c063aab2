#!/usr/bin/env bash
# Installs what building and testing pyimg needs on Debian 12: the oracles
# (squashfs-tools, e2fsprogs), the peers for bench/ (squashfs-tools-ng), the store's
# test peers (docker-registry: the tests start it themselves on 127.0.0.1; skopeo;
# htpasswd from apache2-utils) and the Python packages.  Idempotent; needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# boot: cpio (the cpio oracle), busybox-static (the initramfs's shell), kmod (modinfo,
# the tests' oracle for module resolution), zstd and xz-utils (decompress and make
# compressed modules and initramfs in tests), qemu-system-x86 (boot tests); apt and
# dpkg (kernel fetch) are part of every Debian; mmdebstrap (the Debian root of the
# boot tests).  QEMU without its ~0.5 GB of recommends (--no-install-recommends).  store: docker-registry (the tests'
# real registry), skopeo (interop oracle), apache2-utils (htpasswd).  acl: setfacl and
# getfacl for the ACL tests.  libc6-dev and manpages: /usr/include and /usr/share/man,
# two of the real trees of tests/test_real_trees.py (which fails in CI without them).
pkgs=(gcc python3-dev libc6-dev manpages squashfs-tools squashfs-tools-ng e2fsprogs attr acl tar
  cpio busybox-static kmod zstd xz-utils qemu-system-x86
  mmdebstrap docker-registry skopeo apache2-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The docker-registry package enables a system service on :5000 where systemd runs;
  # the tests start their own registry on a free port and need none: stop the one we
  # just installed.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$PY -m pip install -q --no-build-isolation cffi setuptools wheel
$PY -m pip install -q --no-build-isolation -e '.[test]'

