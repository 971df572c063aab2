#!/usr/bin/env bash
# Rebuilds the C core with AddressSanitizer + UndefinedBehaviorSanitizer, runs the
# tests that cross into C, then restores the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
restore() { PYIMG_SANITIZE=0 $PY setup.py -q build_ext --inplace --force >/dev/null 2>&1; }
trap restore EXIT
PYIMG_SANITIZE=1 $PY setup.py -q build_ext --inplace --force >/dev/null 2>&1
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
# Python itself is not instrumented: preload the runtimes, and leave leak checking
# to the C tests (the interpreter keeps memory alive until exit on purpose).
# The fuzz targets get a third of their budget here: the first pass ran them in full.
PYIMG_FUZZ_SECONDS=${PYIMG_FUZZ_SECONDS_SANITIZED:-20} \
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  $PY -m pytest -q -p no:cacheprovider -m "not slow" tests "$@"
