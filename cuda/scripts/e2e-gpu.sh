#!/usr/bin/env bash
# End-to-end run on a GPU machine (one call of the device tool):
#   1. build liborch_cuda.so (CMake), unpack the carried Go binaries
#   2. model-level GPU tests (CUDA backend vs CPU backend, whole models)
#   3. synthesize full-size gpt-oss-20b (and llama3-8b) with orch-host synth
#   4. orch-host bench on the GPU (pp, tg, streams)
#   5. orch-host serve on the GPU: a streamed harmony chat completion
#   6. with two GPUs: replica scaling (host/replica/testdata/two-gpu.sh)
#   7. with two GPUs (step tp): NCCL all-reduce test, gpt-oss-20b split over 2 GPUs vs whole
#      (nntest.RunSplitRanks), serve unsplit vs --tensor-parallel 2 (host/replica/testdata/tp-gpu.sh)
#   7b. step tables: kernel-version timing tables (E2E_TABLES: test names) into tables.md
#   8. step profile: device time per op (ORCH_CUDA_OPTIME) of one-stream decode and 2048-token prefill
#      (gpt-oss-20b; llama3-8b with step llama) into profile.md
#   9. step llamatp: serve llama3-8b unsplit vs split E2E_LLAMA_TP ways (default "2", e.g. "2 4")
# E2E_REPLICAS="1 2 4" sets the replica counts of step replicas (default "1 2").
# Binaries come from the dev machine, packed by `make gpu-pack` into .gpu/bins.tar.xz
# (carry ".gpu"). Logs go to $OUT (at most 8 files come back).
# Usage: cuda/scripts/e2e-gpu.sh [steps...]   (default: all but depth/perf/tp/llamatp; steps: kernels tests perf tables ncu bench depth serve llama profile trace traceab ab replicas tp llamatp)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
steps=${*:-kernels tests bench serve llama replicas}
has() { [[ " $steps " == *" $1 "* ]]; }
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.md"; }
M=/tmp/orch-models
mkdir -p "$M" bin

nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.free --format=csv,noheader | tee -a "$OUT/summary.md"
[ -f .gpu/bins.tar.xz ] && tar -xJf .gpu/bins.tar.xz -C bin
ls -la bin >>"$OUT/summary.md"
t0=$(date +%s)
CUDA_SRC=${CUDA_SRC:-cuda}   # .gpu/cuda: a snapshot packed with the binaries
[ -d .gpu/cuda ] && CUDA_SRC=.gpu/cuda
cuda_build() { rm -rf build/cuda; cmake -S "$CUDA_SRC" -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$1" && cmake --build build/cuda; }
if [ -n "${E2E_REUSE_BUILD:-}" ] && [ -f build/cuda/liborch_cuda.so ]; then
  log "reusing build/cuda (E2E_REUSE_BUILD)"
elif ! cuda_build "${ORCH_CUDA_ARCH:-90a}" >"$OUT/build.log" 2>&1; then
  log "cuda build for ${ORCH_CUDA_ARCH:-90a} FAILED:"; grep -m5 -E 'error|Error' "$OUT/build.log" | tee -a "$OUT/summary.md"
  log "retrying for sm_90"; cuda_build 90 >"$OUT/build.log" 2>&1 || { log "cuda build FAILED"; tail -30 "$OUT/build.log"; exit 1; }
fi
log "cuda build ok in $(( $(date +%s) - t0 )) s"
export ORCH_CUDA_LIB=$PWD/build/cuda/liborch_cuda.so

if has tests; then
  for b in bin/gpt-gpu.test bin/llama-gpu.test; do  # run from the package dir (testdata paths)
    [ -x "$b" ] || continue
    t0=$(date +%s)
    pkg=plugins/$(basename "$b" -gpu.test)
    if (cd "$pkg" && timeout 240 "../../$b" -test.v -test.timeout 230s -test.run 'TestGPUMatchesCPU|TestGPUGoldens|TestGPUPlan|TestWindowKVDevice|TestGPUStepAhead') >"$OUT/$(basename "$b").log" 2>&1; then
      log "$(basename "$b"): PASS ($(grep -c -- '--- PASS' "$OUT/$(basename "$b").log") passed, $(grep -c -- '--- SKIP' "$OUT/$(basename "$b").log") skipped, $(( $(date +%s) - t0 )) s)"
    else
      log "$(basename "$b"): FAIL"; grep -E -A6 -- '--- FAIL|panic' "$OUT/$(basename "$b").log" | head -40 | tee -a "$OUT/summary.md"
      if command -v compute-sanitizer >/dev/null; then
        (cd "$pkg" && timeout 120 compute-sanitizer --tool memcheck --print-limit 3 "../../$b" -test.run 'TestGPUMatchesCPU' -test.timeout 110s) \
          >"$OUT/$(basename "$b")-memcheck.log" 2>&1
        grep -m12 -E 'Invalid|at 0x|by thread|ERROR SUMMARY|Address' "$OUT/$(basename "$b")-memcheck.log" | cut -c1-220 | tee -a "$OUT/summary.md"
      fi
      # find which new kernel breaks it: switch them off one at a time, keep the first combination
      # that passes for the rest of the run (ORCH_CUDA_FALLBACK overrides the list)
      for combo in ${ORCH_CUDA_FALLBACK:-"ORCH_CUDA_GEMM=v1" "ORCH_CUDA_MOE=v3 ORCH_CUDA_GEMV=v5" "ORCH_CUDA_MOE=v2 ORCH_CUDA_GEMV=v4" "ORCH_CUDA_GEMM=v1 ORCH_CUDA_MOE=v2 ORCH_CUDA_GEMV=v4" "ORCH_CUDA_MOE=v1 ORCH_CUDA_GEMV=v3 ORCH_CUDA_GEMM=v1"}; do
        if (cd "$pkg" && env $combo timeout 200 "../../$b" -test.timeout 190s -test.run 'TestGPUMatchesCPU|TestGPUGoldens|TestGPUPlan|TestWindowKVDevice|TestGPUStepAhead') >"$OUT/$(basename "$b")-fallback.log" 2>&1; then
          log "$(basename "$b") with $combo: PASS (used for the rest of the run)"; export $combo; break
        else log "$(basename "$b") with $combo: FAIL"; fi
      done
    fi
  done
fi

if has kernels && [ -x bin/cuda-gpu.test ]; then
  t0=$(date +%s)
  if timeout 420 bin/cuda-gpu.test -test.timeout 410s >"$OUT/cuda-gpu.log" 2>&1; then
    log "cuda-gpu.test: PASS ($(grep -c -- '--- PASS' "$OUT/cuda-gpu.log") passed, $(( $(date +%s) - t0 )) s)"
  else log "cuda-gpu.test: FAIL"; grep -E -A4 -- '--- FAIL' "$OUT/cuda-gpu.log" | head -30 | tee -a "$OUT/summary.md"; fi
  timeout 150 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 bin/cuda-gpu.test -test.timeout 140s \
    -test.run 'TestMatMulTall|TestMoE|TestMoEWide|TestAttention|TestGraphReplay' >"$OUT/cuda-memcheck.log" 2>&1
  log "memcheck (MatMulTall, MoE, MoEWide, Attention, GraphReplay): rc=$? $(grep -m1 'ERROR SUMMARY' "$OUT/cuda-memcheck.log")"
fi

if has perf && [ -x bin/cuda-gpu.test ]; then
  # the kernel timing table (sdk/ml/cuda TestPerf), current defaults, then the kernels they replace
  ORCH_GPU_PERF=1 ORCH_PERF_OUT="$OUT/perf.md" timeout 240 bin/cuda-gpu.test -test.run TestPerf -test.timeout 230s >"$OUT/perf.log" 2>&1
  log "perf (defaults): rc=$? $(grep -E 'decode step' "$OUT/perf.md" | cut -c1-160 | tr '\n' ' ')"
  if [ -n "${ORCH_PERF_BASE:-}" ]; then
    env $ORCH_PERF_BASE ORCH_GPU_PERF=1 ORCH_PERF_OUT="$OUT/perf-base.md" timeout 240 bin/cuda-gpu.test -test.run TestPerf -test.timeout 230s >>"$OUT/perf.log" 2>&1
    log "perf ($ORCH_PERF_BASE): rc=$? $(grep -E 'decode step' "$OUT/perf-base.md" | cut -c1-160 | tr '\n' ' ')"
  fi
fi

if has tables && [ -x bin/cuda-gpu.test ]; then
  # the kernel-version tables named by E2E_TABLES (space-separated test names), each test's '|' rows into tables.md
  for tst in ${E2E_TABLES:-TestPerfGEMVVersions TestPerfMoEVersions TestPerfPrefillMatMul TestPerfMoEPrefill}; do
    t0=$(date +%s)
    ORCH_GPU_PERF=1 timeout 200 bin/cuda-gpu.test -test.run "^$tst\$" -test.v -test.timeout 190s >"/tmp/$tst.log" 2>&1
    rc=$?
    { echo "### $tst (rc=$rc, $(( $(date +%s) - t0 )) s)"; grep -E '^\s*(\S+\.go:[0-9]+: )?\|' "/tmp/$tst.log" | sed -E 's/^\s*\S+\.go:[0-9]+: //' | awk '!seen[$0]++'
      grep -E -A5 -- '--- FAIL|panic' "/tmp/$tst.log" | head -20; echo; } >>"$OUT/tables.md"
    log "table $tst: rc=$rc ($(( $(date +%s) - t0 )) s)"
  done
fi

# step ncu: Nsight Compute on single kernels of the kernel-table children (not the bench: its kernels run in the
# adapter process, inside graphs). E2E_NCU: lines "name;ENV=v ...;test;kernel regex;launch-skip;launch-count", each
# into ncu-<name>.txt (packed into logs.tar.gz), a one-line summary per kernel into ncu.md.
if has ncu && [ -x bin/cuda-gpu.test ]; then
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$ncu" ]; then log "ncu: not found"; else
    while IFS=';' read -r name envs tst kre skip cnt; do
      [ -z "$name" ] || [[ "$name" == \#* ]] && continue
      t0=$(date +%s)
      env $envs ORCH_GPU_PERF=1 timeout 300 "$ncu" --kernel-name "regex:$kre" --launch-skip "$skip" --launch-count "$cnt" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
        --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section SourceCounters \
        bin/cuda-gpu.test -test.run "^$tst\$" -test.timeout 280s >"$OUT/ncu-$name.txt" 2>&1
      rc=$?
      { echo "### ncu $name ($envs $tst, /$kre/ skip $skip count $cnt): rc=$rc, $(( $(date +%s) - t0 )) s"
        grep -E '^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per|Block Size|Grid Size|Warp Cycles Per Issued|One or More Eligible|Active Warps Per' "$OUT/ncu-$name.txt" | cut -c1-160
        echo; } >>"$OUT/ncu.md"
      log "ncu $name: rc=$rc"
    done <"${E2E_NCU:-.gpu/ncu.txt}"
  fi
fi

synth() { # arch size file
  [ -f "$3" ] && return 0
  t0=$(date +%s)
  bin/orch-host synth --arch "$1" --size "$2" --out "$3" --seed 1 >/dev/null 2>>"$OUT/synth.log" || { log "synth $1 $2 FAILED"; return 1; }
  log "synth $1 $2: $(du -h "$3" | cut -f1) in $(( $(date +%s) - t0 )) s"
}

if has bench || has serve || has replicas || has tp || has profile || has ab; then
  synth gpt-oss 20b "$M/gpt-oss-20b.gguf"
fi
if has bench; then
  log "bench gpt-oss-20b (cuda)"
  timeout 300 bin/orch-host bench --model "$M/gpt-oss-20b.gguf" --device cuda -p 512,2048 -n 128 -r 3 2>>"$OUT/bench.log" | tee -a "$OUT/summary.md"
  timeout 120 bin/orch-host bench --model "$M/gpt-oss-20b.gguf" --device cuda -p 2048 -n 0 --batch-tokens 512 -r 2 2>>"$OUT/bench.log" | tail -1 | sed 's/$/ (--batch-tokens 512: the step budget before session 7)/' | tee -a "$OUT/summary.md"
  timeout 300 bin/orch-host bench --model "$M/gpt-oss-20b.gguf" --device cuda -p 0 -n 128 --streams 8,32,64 -r 1 2>>"$OUT/bench.log" | tee -a "$OUT/summary.md"
  # KV cache sized from free device memory (issue 8): half of what is free after the weights
  timeout 200 bin/orch-host bench --model "$M/gpt-oss-20b.gguf" --device cuda -p 0 -n 128 --streams 64 --kv-cache-fraction 0.5 -r 1 --log-level debug 2>"$OUT/bench-kvfrac.log" | tail -1 | sed 's/$/ (--kv-cache-fraction 0.5)/' | tee -a "$OUT/summary.md"
  grep -m2 -E 'kv_blocks|kv cache|KV' "$OUT/bench-kvfrac.log" | cut -c1-300 | tee -a "$OUT/summary.md"
  has depth && timeout 200 bin/orch-host bench --model "$M/gpt-oss-20b.gguf" --device cuda -p 0 -n 128 --depth 8192 -r 2 2>>"$OUT/bench.log" | tee -a "$OUT/summary.md"
fi
profile() { # name model.gguf [prefill]: device time per op (ORCH_CUDA_OPTIME, sdk/ml/cuda/optime.go) of a
  # one-stream decode (graph ops timed as event nodes: "graph:" rows) or of 2048-token prefills
  local args="-p 0 -n 64" what="one stream, bench -p 0 -n 64 -r 1 (warm-up included; decode graphs timed node by node, PDL overlap off)"
  [ "${3:-}" = prefill ] && args="-p 2048 -n 0 ${E2E_PREFILL_BT:+--batch-tokens $E2E_PREFILL_BT}" what="bench $args -r 1 (two 2048-token prefills with the warm-up)"
  rm -f "/tmp/optime-$1.md"
  ORCH_CUDA_OPTIME="/tmp/optime-$1.md" timeout 200 bin/orch-host bench --model "$2" --device cuda $args -r 1 >"$OUT/profile-$1.log" 2>&1
  local rc=$?
  { echo "### $1 ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)): $what, rc=$rc"; grep '|' "$OUT/profile-$1.log" | tail -1
    cat "/tmp/optime-$1.md" 2>/dev/null || echo "(no op table written)"; echo; } >>"$OUT/profile.md"
  log "profile $1: rc=$rc $(grep -m1 '^total' "/tmp/optime-$1.md" 2>/dev/null)"
}
if has profile; then
  [ -z "${E2E_PROFILE_NO_DECODE:-}" ] && profile gpt-oss-20b "$M/gpt-oss-20b.gguf"
  profile gpt-oss-20b-pp2048 "$M/gpt-oss-20b.gguf" prefill
fi
cupti_trace_lib() { # build cuda/scripts/cupti-trace.c (CUPTI kernel activity, an injection library) once
  [ -f /tmp/libcupti-trace.so ] && return 0
  local home inc lib; home=$(dirname "$(dirname "$(command -v nvcc)")")
  inc=$(find "$home" /usr/local/cuda* /usr/include -name cupti.h 2>/dev/null | head -1)
  lib=$(find "$home" /usr/local/cuda* /usr/lib /opt -name 'libcupti.so*' 2>/dev/null | head -1)
  [ -n "$inc" ] && [ -n "$lib" ] || { log "trace: no CUPTI (cupti.h: ${inc:-none}, libcupti: ${lib:-none})"; return 1; }
  gcc -O2 -shared -fPIC -I"$home/include" -I"$(dirname "$inc")" -o /tmp/libcupti-trace.so cuda/scripts/cupti-trace.c \
    "$lib" -Wl,-rpath,"$(dirname "$lib")" >>"$OUT/trace-build.log" 2>&1 || { log "trace: cupti-trace.c build FAILED"; return 1; }
}
trace() { # name model.gguf [bench args] [ENV=v ...]: every kernel's start and end through CUPTI (graph nodes one by
  # one, PDL overlap kept), summarised per kernel and per position in the decode step by cuda/scripts/trace-summary.py
  # into trace.md; the environment assignments (4th argument) apply to that bench only
  cupti_trace_lib || return 0
  local args=${3:-"-p 0 -n 64 -r 1"}
  rm -f /tmp/tr-$1.*
  env ${4:-} CUDA_INJECTION64_PATH=/tmp/libcupti-trace.so CUDA_ORCH_TRACE="/tmp/tr-$1" timeout 240 \
    bin/orch-host bench --model "$2" --device cuda $args >"$OUT/trace-$1.log" 2>&1
  local rc=$?
  ls -la /tmp/tr-$1.* >>"$OUT/trace-$1.log" 2>&1
  { grep -E '^\| (gpt|llama|synth)' "$OUT/trace-$1.log" | tail -1
    python3 cuda/scripts/trace-summary.py "$1, ${4:+$4, }bench $args ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)), rc=$rc" \
      $(ls -S /tmp/tr-$1.*.csv 2>/dev/null | head -1) || echo "### $1: no trace (rc=$rc)"; echo; } >>"$OUT/trace.md" 2>&1
  log "trace $1: rc=$rc $(grep -A1 "^### $1," "$OUT/trace.md" | tail -1 | cut -c1-200)"
}
if has trace; then
  synth gpt-oss 20b "$M/gpt-oss-20b.gguf" && {
    trace gpt-oss-20b "$M/gpt-oss-20b.gguf"
    trace gpt-oss-20b-x16 "$M/gpt-oss-20b.gguf" "-p 0 -n 64 --streams 16 -r 1"
    has depth && trace gpt-oss-20b-d8192 "$M/gpt-oss-20b.gguf" "-p 0 -n 32 --depth 8192 -r 1"; }
  synth llama llama3-8b "$M/llama3-8b.gguf" && trace llama3-8b "$M/llama3-8b.gguf"
fi
# step traceab: traces under other settings, lines "name;ENV=v ENV2=v;gpt|llama;bench args" from $E2E_TRACE_AB
# (default .gpu/trace.txt; empty args: -p 0 -n 64 -r 1), each into trace.md as the trace step's (session 15).
if has traceab; then
  tf=${E2E_TRACE_AB:-.gpu/trace.txt}
  if [ -f "$tf" ]; then
    while IFS=';' read -r name envs model args; do
      [ -z "$name" ] || [[ "$name" == \#* ]] && continue
      if [ "$model" = llama ]; then synth llama llama3-8b "$M/llama3-8b.gguf" || continue; f="$M/llama3-8b.gguf"
      else synth gpt-oss 20b "$M/gpt-oss-20b.gguf" || continue; f="$M/gpt-oss-20b.gguf"; fi
      trace "$name" "$f" "${args:--p 0 -n 64 -r 1}" "$envs" </dev/null
    done <"$tf"
  else log "traceab: no $tf"; fi
fi
# step ab: A/B bench lines from $E2E_AB (default .gpu/ab.txt), one per line: "label;ENV=v ENV2=v;gpt|llama;bench args"
# (e.g. "v2 from 33;ORCH_CUDA_DENSE_V2_FROM=33;gpt;-p 0 -n 128 --streams 64 -r 1") into ab.md, in file order.
if has ab; then
  abf=${E2E_AB:-.gpu/ab.txt}
  if [ -f "$abf" ]; then
    grep -q ';llama;' "$abf" && synth llama llama3-8b "$M/llama3-8b.gguf"
    echo "### A/B ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" >>"$OUT/ab.md"
    while IFS=';' read -r label envs model args; do
      [ -z "$label" ] || [[ "$label" == \#* ]] && continue
      f="$M/gpt-oss-20b.gguf"; [ "$model" = llama ] && f="$M/llama3-8b.gguf"
      t0=$(date +%s)
      res=$(env $envs timeout 200 bin/orch-host bench --model "$f" --device cuda $args 2>>"$OUT/ab.log" </dev/null | grep -E '^\| (gpt|llama|synth)' | tr '\n' ' ')
      echo "| $label | $envs | $model $args | ${res:-FAILED rc=$?} ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/ab.md"
    done <"$abf"
  else
    log "ab: no $abf"
  fi
fi
if has serve; then
  log "serve gpt-oss-20b (cuda)"
  bin/orch-host serve --model "$M/gpt-oss-20b.gguf" --device cuda --addr 127.0.0.1:18080 >"$OUT/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do curl -sf 127.0.0.1:18080/health >/dev/null 2>&1 && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
  curl -s 127.0.0.1:18080/health | tee -a "$OUT/summary.md"; echo | tee -a "$OUT/summary.md"
  curl -sN --max-time 60 127.0.0.1:18080/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"gpt-oss-20b","messages":[{"role":"user","content":"Say hello."}],"reasoning_effort":"low","max_tokens":48,"stream":true,"stream_options":{"include_usage":true}}' \
    >"$OUT/serve-stream.txt" 2>&1
  log "streamed chunks: $(grep -c '^data: {' "$OUT/serve-stream.txt"), done: $(grep -c '^data: \[DONE\]' "$OUT/serve-stream.txt")"
  tail -3 "$OUT/serve-stream.txt" | cut -c1-400 | tee -a "$OUT/summary.md"
  grep -E 'backend|placement' "$OUT/serve.log" | head -4 | cut -c1-300 | tee -a "$OUT/summary.md"
  kill $pid; wait $pid 2>/dev/null
fi
if has llama; then
  synth llama llama3-8b "$M/llama3-8b.gguf" && {
    log "bench llama3-8b Q8_0 (cuda)"
    timeout 200 bin/orch-host bench --model "$M/llama3-8b.gguf" --device cuda -p 512,2048 -n 128 -r 3 2>>"$OUT/bench.log" | tee -a "$OUT/summary.md"
    timeout 200 bin/orch-host bench --model "$M/llama3-8b.gguf" --device cuda -p 0 -n 128 --streams 8,32,64 -r 1 2>>"$OUT/bench.log" | tee -a "$OUT/summary.md"
    has profile && profile llama3-8b "$M/llama3-8b.gguf" && profile llama3-8b-pp2048 "$M/llama3-8b.gguf" prefill
    rm -f "$M/llama3-8b.gguf"; }
fi
if has replicas && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  log "replicas: ${E2E_REPLICAS:-1 2} GPUs, gpt-oss-20b, ${E2E_REPLICA_STREAMS:-32} streams x 64 tokens"
  REPLICAS=${E2E_REPLICAS:-1 2} timeout 420 bash host/replica/testdata/two-gpu.sh bin "$M/gpt-oss-20b.gguf" "${E2E_REPLICA_STREAMS:-32}" 64 2>&1 | tail -40 | tee -a "$OUT/summary.md"
fi
if has tp && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  export NCCL_NVLS_ENABLE=0
  timeout 120 bin/cuda-gpu.test -test.run 'TestComm' -test.v -test.timeout 110s >"$OUT/comm.log" 2>&1
  log "NCCL comm tests: rc=$? $(grep -c -- '--- PASS' "$OUT/comm.log") passed, $(grep -c -- '--- FAIL' "$OUT/comm.log") failed"
  grep -E 'NCCL|us per|µs' "$OUT/comm.log" | head -8 | cut -c1-200 | tee -a "$OUT/summary.md"
  log "gpt-oss-20b split over 2 GPUs vs whole (RunSplitRanks)"
  (cd plugins/gpt && export ORCH_GPU_MODEL="$M/gpt-oss-20b.gguf" ORCH_TP_SIZE=2 ORCH_TP_ADDR=127.0.0.1:29533
   CUDA_VISIBLE_DEVICES=1 ORCH_TP_RANK=1 timeout 280 ../../bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v -test.timeout 270s >"$OUT/tp-rank1.log" 2>&1 &
   CUDA_VISIBLE_DEVICES=0 ORCH_TP_RANK=0 ORCH_TP_OUT="$OUT/tp.json" timeout 280 ../../bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v -test.timeout 270s >"$OUT/tp-rank0.log" 2>&1
   echo "rank0 rc=$?"; wait) | tee -a "$OUT/summary.md"
  grep -E -- '--- (PASS|FAIL|SKIP)|tok/s|max|Error|error' "$OUT/tp-rank0.log" | head -20 | cut -c1-250 | tee -a "$OUT/summary.md"
  [ -f "$OUT/tp.json" ] && head -c 1500 "$OUT/tp.json" | tee -a "$OUT/summary.md" && echo | tee -a "$OUT/summary.md"
  if [ -z "${E2E_TP_SKIP_SERVE:-}" ]; then
    log "serve gpt-oss-20b unsplit vs --tensor-parallel 2, 1 and 32 streams x 128 tokens"
    timeout 330 bash host/replica/testdata/tp-gpu.sh bin "$M/gpt-oss-20b.gguf" 32 128 2>&1 | tail -30 | tee -a "$OUT/summary.md"
  fi
fi
if has llamatp && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  export NCCL_NVLS_ENABLE=0
  synth llama llama3-8b "$M/llama3-8b.gguf" && {
    log "serve llama3-8b unsplit vs --tensor-parallel ${E2E_LLAMA_TP:-2}, 1 and 32 streams x 128 tokens"
    TP=${E2E_LLAMA_TP:-2} timeout 480 bash host/replica/testdata/tp-gpu.sh bin "$M/llama3-8b.gguf" 32 128 2>&1 | tail -60 | tee -a "$OUT/summary.md"; }
fi
log "done"
# at most 8 files come back: keep summary.md and the tables, pack the logs into one archive
(cd "$OUT" && ls | grep -v -E '^(summary\.md|trace\.md|perf\.md|perf-base\.md|perf-attention\.md|profile\.md|tables\.md|ab\.md|logs\.tar\.gz)$' > /tmp/e2e-logs.txt
 [ -s /tmp/e2e-logs.txt ] && tar -czf logs.tar.gz -T /tmp/e2e-logs.txt && xargs rm -f < /tmp/e2e-logs.txt)
