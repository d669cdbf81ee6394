#!/usr/bin/env bash
# One lent-GPU call: build against the machine's own torch, run the test suite (CUDA tests included)
# and the CUDA benchmarks, and leave logs under $OUT (or ./gpu-out). The machine starts bare each
# time, so every call rebuilds. Stages are bounded so that the logs come back inside one call.
#
#   bash tools/gpu_session.sh [build] [tests] [bench] [PYTEST_ARGS...]
#
# Peers missing from the machine's image (diffusers) travel as wheels in .whl/ (see the device
# README): carry ".whl".
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
STAGES=" ${*:-build tests bench} "
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

if [[ "$STAGES" == *" build "* ]]; then
  stage "build"
  export DIFFKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  if ! python3 -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "build failed"; exit 1
  fi
  grep -E "diffkern setup:" "$OUT/build.log"
  grep -oE "^ *\S*g\+\+ .* -shared" "$OUT/build.log" | head -1 | cut -c1-60
  ldd diffkern/_C*.so | grep -E "libstdc\+\+" || echo "libstdc++ is NOT a shared dependency of diffkern/_C (linked statically?)"
  python3 -m diffkern info
fi

if [[ "$STAGES" == *" diag "* ]]; then
  stage "diagnostics: a C++ check failing inside an op, under cuda-gdb (log: diag.log)"
  {
  lscpu | grep -E "Model name|Flags" | cut -c1-200
  gcc --version | head -1; which -a g++
  for c in $(which -a g++); do echo "$c: $($c -print-file-name=libstdc++.so)"; done
  python3 -c 'import torch; print(torch.__config__.parallel_info()); print(torch._C._GLIBCXX_USE_CXX11_ABI)'
  ldd diffkern/_C*.so | grep -E "gomp|stdc|gcc_s|c10"
  timeout 120 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary" --args python3 -c \
    "import torch, diffkern; torch.ops.diffkern.randn([3], 0, 2**32, 0, 0, None, torch.float32, torch.device('cpu'))" \
    2>&1 | grep -v -E "^\[(New|Thread)|^warning" | head -120
  for v in 0 1; do
    echo "TORCH_SHOW_CPP_STACKTRACES=$v:"
    TORCH_SHOW_CPP_STACKTRACES=$v timeout 60 python3 -c "import torch, diffkern
try:
    torch.ops.diffkern.randn([3], 0, 2**32, 0, 0, None, torch.float32, torch.device('cpu'))
except RuntimeError as e:
    print('caught:', str(e)[:200])" 2>&1 | tail -3
  done
  } > "$OUT/diag.log" 2>&1
fi

if [[ "$STAGES" == *" tests "* ]]; then
  # the kernels that have never run on a GPU first (FIRST_TESTS), so their result comes back even if
  # the whole suite does not finish
  stage "CUDA tests of ${FIRST_TESTS:=tests/test_compile.py tests/test_no_host_sync.py tests/test_training.py tests/test_poisson_field.py tests/test_cnf_training.py}"
  # (test_compile: CUDA graphs of whole runs via dk.capture, compiled loops and tensor seeds on the GPU)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:warnings -rfE -k "cuda or capture" $FIRST_TESTS \
      > "$OUT/first-tests.log" 2>&1
  grep -oE "(FAILED|ERROR) tests/\S+" "$OUT/first-tests.log" | sort | uniq | head -40; tail -1 "$OUT/first-tests.log"
  stage "tests"
  EXTRA=$(printf '%s\n' "$@" | grep -v -E '^(build|diag|tests|bench)$' | tr '\n' ' ')
  timeout "${TESTS_S:-330}" python3 -m pytest -v -p no:cacheprovider -p no:warnings -rfE --timeout 120 -n "${XDIST:-8}" \
      --junitxml="$OUT/tests.xml" ${PYTEST_K:+-k "$PYTEST_K"} $EXTRA tests > "$OUT/tests.log" 2>&1
  grep -oE "(FAILED|ERROR) tests/\S+" "$OUT/tests.log" | sort | uniq | head -100
  grep -c PASSED "$OUT/tests.log"; tail -1 "$OUT/tests.log"
fi

if [[ "$STAGES" == *" bench "* ]]; then
  stage "benchmarks (CUDA)"
  LEFT=$(( ${BUDGET_S:-580} - ($(date +%s) - START) )); echo "benchmark budget ${LEFT}s"
  # (round 3: BENCH_FILES="benchmarks/test_bench_compiled_loops.py benchmarks/test_bench_unet_loop.py" for the
  # whole-loop graphs issue; the UNet's whole-run capture compiles for minutes)
  timeout "$LEFT" python3 -m pytest ${BENCH_FILES:-benchmarks} --benchmark-only -q -p no:cacheprovider -p no:warnings -k "${BENCH_K:-cuda}" \
      --benchmark-min-rounds=20 --benchmark-max-time=0.2 --benchmark-json="$OUT/bench.json" 2>&1 \
      | tee "$OUT/bench.log" | sed -n '/diffkern summary/,$p'
fi
[ -f "$OUT/diag.log" ] && { echo "--- diag.log"; head -c 6000 "$OUT/diag.log"; }
stage "done"
