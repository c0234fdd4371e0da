#!/usr/bin/env bash
# One command for the GPU machine: build liborch_cuda.so with CMake, run the
# carried Go GPU test binaries against it, run compute-sanitizer memcheck on a
# short subset, optionally the timing table, and print a short summary.
# Logs go to $OUT (or ./gpu-out). Test binaries are built on the dev machine:
#   go test -c -tags gpu -o bin/cuda-gpu.test ./sdk/ml/cuda
# Usage: cuda/scripts/gpu-check.sh [--perf]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
perf=0
[ "${1:-}" = "--perf" ] && perf=1

declare -a rows
row() { rows+=("| $1 | $2 | $3 |"); }

echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
t0=$(date +%s)
if cmake -S cuda -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=${ORCH_CUDA_ARCH:-90a} >"$OUT/build.log" 2>&1 &&
   cmake --build build/cuda >>"$OUT/build.log" 2>&1; then
  row build ok "$(( $(date +%s) - t0 )) s, $(nvcc --version | tail -1)"
else
  row build FAIL "see build.log"; tail -30 "$OUT/build.log"
  printf '%s\n' "| step | result | detail |" "|---|---|---|" "${rows[@]}"; exit 1
fi
export ORCH_CUDA_LIB=$PWD/build/cuda/liborch_cuda.so
grep -E 'spill|warning' "$OUT/build.log" | head -20

status=0
for bin in bin/*-gpu.test; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin" .test)
  t0=$(date +%s)
  if "$bin" -test.v -test.timeout 300s >"$OUT/$name.log" 2>&1; then
    row "$name" PASS "$(grep -c '^    --- PASS\|^--- PASS' "$OUT/$name.log") passed, $(( $(date +%s) - t0 )) s"
  else
    status=1
    row "$name" FAIL "$(grep -E -- '--- FAIL' "$OUT/$name.log" | head -5 | tr '\n' ' ')"
    grep -E -B2 -A8 -- '--- FAIL|panic' "$OUT/$name.log" | head -60
  fi
done

# The kept v1 kernels must stay correct too (they are selectable at run time).
if [ -x bin/cuda-gpu.test ]; then
  for v in v1 v2; do
    log=/tmp/cuda-gpu-$v.log
    if ORCH_CUDA_GEMV=$v bin/cuda-gpu.test -test.timeout 300s >"$log" 2>&1; then
      row "cuda-gpu (GEMV $v)" PASS "$(tail -1 "$log")"
    else status=1; cp "$log" "$OUT/"; row "cuda-gpu (GEMV $v)" FAIL "$(grep -E -- '--- FAIL' "$log" | head -3 | tr '\n' ' ')"; fi
  done
fi

if [ -x bin/cuda-gpu.test ] && command -v compute-sanitizer >/dev/null; then
  t0=$(date +%s)
  compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 bin/cuda-gpu.test -test.timeout 300s \
    -test.run 'TestMatMul/(Q4_K|MXFP4|Q6_K|Q8_0|F32)/n=(1|3|33)/|TestAttention|TestMoE/MXFP4/n=3|TestEmbed/Q4_0|TestNorms|TestSample|TestGraphReplay|TestArgmax' \
    >"$OUT/memcheck.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then row memcheck PASS "$(tail -1 "$OUT/memcheck.log"), $(( $(date +%s) - t0 )) s"
  else status=1; row memcheck "FAIL rc=$rc" "$(grep -m3 -E 'ERROR SUMMARY|Invalid' "$OUT/memcheck.log" | tr '\n' ' ')"; fi
fi

if [ $perf = 1 ] && [ -x bin/cuda-gpu.test ]; then
  # Kept kernel versions first (ORCH_CUDA_GEMV=v1), then the current ones, same machine.
  ORCH_CUDA_GEMV=v1 ORCH_GPU_PERF=1 ORCH_PERF_OUT="$OUT/perf-v1.md" bin/cuda-gpu.test \
    -test.run 'TestPerf' -test.v -test.timeout 400s >/tmp/perf-v1.log 2>&1 \
    && row perf-v1 ok "perf-v1.md" || { row perf-v1 FAIL "see perf-v1.log"; cp /tmp/perf-v1.log "$OUT/"; tail -30 /tmp/perf-v1.log; }
  ORCH_GPU_PERF=1 ORCH_PERF_OUT="$OUT/perf.md" bin/cuda-gpu.test -test.run 'TestPerf' -test.v -test.timeout 400s \
    >/tmp/perf.log 2>&1 && row perf ok "perf.md" || { row perf FAIL "see perf.log"; cp /tmp/perf.log "$OUT/"; tail -30 /tmp/perf.log; }
  grep -E "decode depth" /tmp/perf-v1.log /tmp/perf.log
  [ -f "$OUT/perf-v1.md" ] && grep -E 'decode step|copy' "$OUT/perf-v1.md"
  [ -f "$OUT/perf.md" ] && cat "$OUT/perf.md"
fi

printf '%s\n' "| step | result | detail |" "|---|---|---|" "${rows[@]}"
exit $status
