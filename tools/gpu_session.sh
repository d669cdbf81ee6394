#!/usr/bin/env bash
# One lent-GPU call: build against the machine's own torch, run the test suite (CUDA tests included)
# and the CUDA benchmarks, and leave logs under $OUT (or ./gpu-out). The machine starts bare each
# time, so every call rebuilds. Stages are bounded so that the logs come back inside one call.
#
#   bash tools/gpu_session.sh [build] [cudatests] [tests] [bench] [PYTEST_ARGS...]
#
# cudatests: the CUDA cases of FIRST_TESTS (the kernels that have never run on a GPU), in parallel;
# tests: the whole suite; bench: each of BENCH_FILES in turn (in the order given, so the ones that
# matter most come back even if the call's time runs out), each case selected by BENCH_K. Every
# stage is bounded (FIRST_S, TESTS_S, BUDGET_S seconds). At most 8 files come back from a call,
# so the benchmark JSONs come back as one tarball.
#
# Peers missing from the machine's image (diffusers) travel as wheels in .whl/ (see the device
# README): carry ".whl".
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
STAGES=" ${*:-build cudatests tests bench} "
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

if [[ "$STAGES" == *" cudatests "* ]]; then
  # the kernels that have never run on a GPU first, so their result comes back even if the whole
  # suite does not finish (test_compile: CUDA graphs of whole runs via dk.capture, compiled loops
  # and tensor seeds on the GPU; test_no_host_sync's CUDA tests say "gpu" in their names). The
  # 2026-12-05 H100 run took 91 s for 661 of these with 8 workers.
  stage "CUDA tests of ${FIRST_TESTS:=tests/test_compile.py tests/test_no_host_sync.py tests/test_training.py tests/test_poisson_field.py tests/test_cnf_training.py tests/test_autograd.py tests/test_likelihood_solvers.py tests/test_likelihood.py tests/test_k_diffusion.py tests/test_pfgm.py}"
  OMP_NUM_THREADS=2 timeout "${FIRST_S:-240}" python3 -m pytest -v -p no:cacheprovider -p no:warnings -rfE \
      -n "${XDIST:-8}" -k "cuda or gpu or capture" $FIRST_TESTS > "$OUT/first-tests.log" 2>&1
  grep -oE "(FAILED|ERROR) tests/\S+" "$OUT/first-tests.log" | sort | uniq | head -60
  grep -c PASSED "$OUT/first-tests.log"; tail -1 "$OUT/first-tests.log"
fi

if [[ "$STAGES" == *" tests "* ]]; then
  stage "tests"
  EXTRA=$(printf '%s\n' "$@" | grep -v -E '^(build|diag|cudatests|tests|bench)$' | tr '\n' ' ')
  timeout "${TESTS_S:-330}" python3 -m pytest -v -p no:cacheprovider -p no:warnings -rfE --timeout 120 -n "${XDIST:-8}" \
      --junitxml="$OUT/tests.xml" ${PYTEST_K:+-k "$PYTEST_K"} $EXTRA tests > "$OUT/tests.log" 2>&1
  grep -oE "(FAILED|ERROR) tests/\S+" "$OUT/tests.log" | sort | uniq | head -100
  grep -c PASSED "$OUT/tests.log"; tail -1 "$OUT/tests.log"
fi

if [[ "$STAGES" == *" bench "* ]]; then
  stage "benchmarks (CUDA)"
  # (round 3: the whole-loop graphs issue's benchmarks are test_bench_compiled_loops.py and
  # test_bench_unet_loop.py; the UNet's whole-run capture compiles for minutes)
  mkdir -p /tmp/bench-json
  for file in ${BENCH_FILES:-benchmarks}; do
    LEFT=$(( ${BUDGET_S:-580} - ($(date +%s) - START) ))
    [ "$LEFT" -gt 20 ] || { echo "no time left for $file"; continue; }
    echo "--- $file (${LEFT}s left)"
    timeout "$LEFT" python3 -m pytest "$file" --benchmark-only -q -p no:cacheprovider -p no:warnings \
        -k "${BENCH_K:-cuda}" --benchmark-min-rounds="${BENCH_ROUNDS:-20}" --benchmark-max-time=0.2 \
        --benchmark-json="/tmp/bench-json/$(basename "$file" .py).json" 2>&1 \
        | tee -a "$OUT/bench.log" | sed -n '/diffkern summary/,$p'
  done
  tar -czf "$OUT/bench-json.tar.gz" -C /tmp bench-json
fi
[ -f "$OUT/diag.log" ] && { echo "--- diag.log"; head -c 6000 "$OUT/diag.log"; }
stage "done"
