#!/usr/bin/env bash
# The main job: build the example image from examples/example.toml, then prove it
# with the oracle (unsquashfs lists it) and print its digest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
PY=${PYTHON:-python3}
mkdir -p build
$PY -m pyimg.cli build --spec examples/example.toml
unsquashfs -lln build/example.sqfs
echo "digest: $($PY -m pyimg.cli digest build/example.sqfs)"
