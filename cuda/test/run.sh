#!/usr/bin/env bash
# Host tests of the CUDA sources, no GPU needed (CI runs this from .ci/cuda-check.sh):
#  - *_test.cpp with "emu" in the name compile the kernel sources themselves against cuda_emu.h (a fiber
#    per CUDA thread, barriers, shuffles, WMMA, fp16/bf16) under AddressSanitizer and compare every output
#    with a float64 reference;
#  - the other *_test.cpp check index / tile-plan math;
#  - dec16_test.cu (nvcc host code) checks the fp16 decode bit tricks exhaustively.
# The tests run ORCH_TEST_JOBS at a time (default: the number of CPUs), the slowest first; each one's result line
# (and the tail of its log when it fails) is printed in the order of the file names once all have run.
# Usage: cuda/test/run.sh [name-filter]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
filter=${1:-}
source cuda/test/pool.sh
# one test: build, run; its result line into $out/NAME.result (with the log's tail on failure)
one() { # name, build command...
  local name=$1; shift
  local t0=$SECONDS
  if ! "$@" >"$out/$name.build.log" 2>&1; then
    { echo "cuda host test $name: BUILD FAILED"; tail -20 "$out/$name.build.log"; } >"$out/$name.result"
    return 1
  fi
  if "$out/$name" >"$out/$name.log" 2>&1; then
    echo "cuda host test $name: ok ($((SECONDS - t0)) s)" >"$out/$name.result"
  else
    { echo "cuda host test $name: FAILED"; tail -30 "$out/$name.log"; } >"$out/$name.result"
    return 1
  fi
}
names=()
declare -A cmd
add() { # name, build command...
  local name=$1; shift
  [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && return
  names+=("$name")
  cmd[$name]=$(printf '%q ' "$@")
}
for f in cuda/test/*_test.cpp; do
  name=$(basename "$f" .cpp)
  if [[ "$name" == *emu* ]]; then
    add "$name" g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include -o "$out/$name" "$f"
  else
    add "$name" g++ -std=c++17 -Wall -Werror -Icuda/include -o "$out/$name" "$f"
  fi
done
if command -v nvcc >/dev/null 2>&1; then
  add dec16_test nvcc -std=c++17 -O2 -o "$out/dec16_test" cuda/test/dec16_test.cu
else
  echo "cuda host test dec16_test: skipped (no nvcc)"
fi
# the slowest first (seconds on 2 cores, session 17), so the last one to start is a short one
cost() {
  case $1 in
    moe_emu_test) echo 290 ;; decode_emu_test) echo 145 ;; attention_emu_test) echo 135 ;;
    moe_oproj_emu_test) echo 130 ;; *emu*) echo 50 ;; *) echo 5 ;;
  esac
}
order=$(for n in "${names[@]}"; do echo "$(cost "$n") $n"; done | sort -k1,1nr -k2 | cut -d' ' -f2)
for name in $order; do eval "pool_run one $name ${cmd[$name]}"; done
pool_wait
fail=$pool_fail
for name in "${names[@]}"; do
  if [ -f "$out/$name.result" ]; then cat "$out/$name.result"; else echo "cuda host test $name: no result"; fail=1; fi
done
exit $fail
