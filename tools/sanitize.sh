#!/usr/bin/env bash
# Build the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer in a scratch copy of
# the tree and run the fast tests under them. Any sanitizer report fails the run.
#
#   bash tools/sanitize.sh [pytest arguments]      (default: the whole suite but the torchrun tests)
#
# Uses the active Python environment (torch, pytest, diffusers as for the tests). Takes about
# 10 minutes on 2 cores. ASan must be the first library loaded and torch's C++ exceptions must
# unwind through a libstdc++ that ASan's interceptors see, so both go into LD_PRELOAD (with only
# libasan, the first C++ exception aborts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK")
cd "$WORK"
echo "sanitizer build in $WORK"
DIFFKERN_CUDA=0 DIFFKERN_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" python setup.py build_ext --inplace > build.log 2>&1 \
  || { tail -50 build.log; exit 1; }
CXX_BIN="${CXX:-g++}"
PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libstdc++.so)"
export LD_PRELOAD="$PRELOAD"
# leaks: CPython and torch keep allocations alive at exit by design
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" DIFFKERN_SANITIZED=1
if [ "$#" -eq 0 ]; then
  set -- tests -q -p no:cacheprovider --ignore=tests/test_distributed.py
fi
python -m pytest "$@"
echo "sanitizers: no report"
