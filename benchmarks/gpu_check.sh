#!/usr/bin/env bash
# One short GPU check, for a machine with an NVIDIA GPU and jax[cuda] installed (never used by CI).
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (TESTS=... SUITES="a b" narrow it)
# Runs the GPU-marked tests of the kernels, then the GPU benchmark suites, and writes one summary
# of everything to $OUT/gpu_check.md, every step's output to $OUT/gpu_check.log, and each suite's
# JSON/markdown (+ attention plot) to $OUT/. Each step has a time limit. A device call may run
# 10 minutes at most, so on a lent H200 split it in two calls, e.g.
#   OUT=$OUT EFFJAX_BENCH_BUDGET_S=200 TESTS_LIMIT_S=180 SUITES=attention_gpu bash benchmarks/gpu_check.sh
#   OUT=$OUT/2 SKIP_TESTS=1 EFFJAX_BENCH_BUDGET_S=200 SUITES="long_conv kvcache_decode" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
SUITE_DIR=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
GPU_SUITES=(attention_gpu long_conv kvcache_decode)
[ -n "${SUITES:-}" ] && read -ra GPU_SUITES <<< "$SUITES"  # e.g. SUITES="attention_gpu"
TESTS=${TESTS:-tests/ops}  # every op's kernel tests, the quantized-cache decode kernels' included

summary="$OUT/gpu_check.md"
log="$OUT/gpu_check.log"
: > "$log"
{
  echo "# effjax GPU check"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
  echo "jax: $($PYTHON -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices()[0].device_kind)' 2>&1 | tail -1)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$summary"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local status=$?
  echo "| $name | $([ $status -eq 0 ] && echo ok || echo "FAILED ($status)") | $((SECONDS - start)) |" >> "$summary"
  tail -3 "$log"
}

# Only the kernel tests: the experiment tests need packages (draccus, gguf) a bare GPU image lacks.
# Compiling the kernels is CPU-bound: spread the tests over 8 processes sharing the GPU. -v puts
# each test's result in the log as it finishes, so a step cut by its time limit still names its
# failures.
if [ -z "${SKIP_TESTS:-}" ]; then
# The Hopper (Mosaic GPU) kernels first, alone and briefly: if they fail or hang (never run on
# a GPU before 2026-11-28), the benchmarks leave them out instead of hanging on them.
XLA_PYTHON_CLIENT_PREALLOCATE=false step mosaic_gpu_tests ${MOSAIC_GPU_LIMIT_S:-150} \
  $PYTHON -m pytest -v --tb=short -rfE -m "gpu and not slow" -x -p no:cacheprovider -o addopts="" \
  tests/ops/test_attention_mosaic_gpu.py
grep -q "| mosaic_gpu_tests | ok" "$summary" || export EFFJAX_BENCH_SKIP="effjax mosaic_gpu"
XLA_PYTHON_CLIENT_PREALLOCATE=false step gpu_tests ${TESTS_LIMIT_S:-240} \
  $PYTHON -m pytest -v --tb=line -rfE -m "gpu and not slow" -n 8 -p no:cacheprovider -o addopts="" \
  --ignore=tests/ops/test_attention_mosaic_gpu.py $TESTS
fi
for suite in "${GPU_SUITES[@]}"; do
  step "bench_$suite" ${SUITE_LIMIT_S:-300} $PYTHON -m experiments.bench "$suite" --out "$SUITE_DIR"
done
for suite in "${GPU_SUITES[@]}"; do
  for file in "$SUITE_DIR/$suite".{json,md,png}; do [ -f "$file" ] && cp "$file" "$OUT/"; done
  [ -f "$SUITE_DIR/$suite.md" ] && { echo; cat "$SUITE_DIR/$suite.md"; } >> "$summary"
done
cat "$summary"
