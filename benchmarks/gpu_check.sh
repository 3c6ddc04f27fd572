#!/usr/bin/env bash
# One short GPU check, for a machine with an NVIDIA GPU and jax[cuda] installed (never used by CI).
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Runs the GPU-marked tests, then the GPU benchmark suites, and writes one table of everything to
# $OUT/gpu_check.md (plus each suite's JSON/markdown under $OUT/). Later issues append suites to
# GPU_SUITES. Budget: a few minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
GPU_SUITES=(attention_memory)

summary="$OUT/gpu_check.md"
{
  echo "# effjax GPU check"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
  echo "jax: $($PYTHON -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices()[0].device_kind)' 2>&1 | tail -1)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$summary"

step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "| $name | $([ $status -eq 0 ] && echo ok || echo "FAILED ($status)") | $((SECONDS - start)) |" >> "$summary"
  tail -3 "$OUT/$name.log"
}

step gpu_tests $PYTHON -m pytest -q -m gpu -o addopts="-p no:cacheprovider" tests
for suite in "${GPU_SUITES[@]}"; do
  step "bench_$suite" $PYTHON -m experiments.bench "$suite" --out "$OUT"
done
for suite in "${GPU_SUITES[@]}"; do
  [ -f "$OUT/$suite.md" ] && { echo; cat "$OUT/$suite.md"; } >> "$summary"
done
cat "$summary"
