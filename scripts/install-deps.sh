#!/usr/bin/env bash
# Installs what building and testing pyimg needs on Debian 12: the oracles
# (squashfs-tools, e2fsprogs), the peers for bench/ (squashfs-tools-ng) and the
# Python packages.  Idempotent; needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# boot: cpio (the cpio oracle), busybox-static (the initramfs's shell), kmod (modinfo,
# the tests' oracle for module resolution), zstd and xz-utils (decompress and make
# compressed modules and initramfs in tests), qemu-system-x86 (boot tests); apt and
# dpkg (kernel fetch) are part of every Debian.
pkgs=(gcc python3-dev squashfs-tools squashfs-tools-ng e2fsprogs attr
  cpio busybox-static kmod zstd xz-utils qemu-system-x86)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$PY -m pip install -q --no-build-isolation cffi setuptools wheel
$PY -m pip install -q --no-build-isolation -e '.[test]'

# Booting (pyimg boot, tests/boot): QEMU without its ~0.5 GB of recommends, busybox-static
# and cpio for the initramfs, mmdebstrap for the Debian root of the boot tests.
boot_pkgs=(qemu-system-x86 busybox-static cpio mmdebstrap)
missing=()
for p in "${boot_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
