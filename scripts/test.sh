#!/usr/bin/env bash
# The whole test suite: installs what it needs, type-checks, lints, runs pytest,
# then runs pytest again against an ASan/UBSan build of the C core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
PY=${PYTHON:-python3}

echo "== ruff"
$PY -m ruff check pyimg tests bench
echo "== mypy --strict"
$PY -m mypy --strict pyimg

echo "== pytest"
$PY -m pytest -q -p no:cacheprovider "$@"

echo "== pytest against the ASan/UBSan build of the C core"
bash scripts/sanitize.sh
