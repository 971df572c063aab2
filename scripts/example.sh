#!/usr/bin/env bash
# The main job, on a fresh Debian 12 (as root or with sudo): install what is needed,
# build the example application image (examples/app: a busybox root that serves an
# HTTP health endpoint) as squashfs, fetch Debian's cloud kernel into the cache, boot
# the image under QEMU and pass its health check through a port forwarded from
# 127.0.0.1.  Idempotent: run it again and it rebuilds and reboots, nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$EPOCHREALTIME
bash scripts/install-deps.sh
PY=${PYTHON:-python3}
mkdir -p build
$PY -m pyimg.cli build --spec examples/app/app.toml --quiet
unsquashfs -lln build/app.sqfs
echo "digest: $($PY -m pyimg.cli digest build/app.sqfs)"
# The kernel: pyimg boot takes the cached one, or fetches it first (~27 MB, once).
boot_started=$EPOCHREALTIME
$PY -m pyimg.cli boot build/app.sqfs \
  --expect 'example: ready' --health /health --port 80 \
  --config GREETING="hello from pyimg" --timeout 120 --log build/app.console.log
ended=$EPOCHREALTIME
awk -v a="$started" -v b="$boot_started" -v c="$ended" \
  'BEGIN { printf "pyimg boot to health check passed: %.1f s; the whole script: %.1f s\n", c - b, c - a }'
