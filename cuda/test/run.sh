#!/usr/bin/env bash
# Host tests of the CUDA sources, no GPU needed (CI runs this from .ci/cuda-check.sh):
#  - *_test.cpp with "emu" in the name compile the kernel sources themselves against cuda_emu.h (a fiber
#    per CUDA thread, barriers, shuffles, WMMA, fp16/bf16) under AddressSanitizer and compare every output
#    with a float64 reference;
#  - the other *_test.cpp check index / tile-plan math;
#  - dec16_test.cu (nvcc host code) checks the fp16 decode bit tricks exhaustively.
# Usage: cuda/test/run.sh [name-filter]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
filter=${1:-}
fail=0
run() { # name, build command..., then the binary runs
  local name=$1; shift
  [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && return
  local t0=$SECONDS
  if ! "$@" >"$out/$name.build.log" 2>&1; then
    echo "cuda host test $name: BUILD FAILED"; tail -20 "$out/$name.build.log"; fail=1; return
  fi
  if "$out/$name" >"$out/$name.log" 2>&1; then
    echo "cuda host test $name: ok ($((SECONDS - t0)) s)"
  else
    echo "cuda host test $name: FAILED"; tail -30 "$out/$name.log"; fail=1
  fi
}
for f in cuda/test/*_test.cpp; do
  name=$(basename "$f" .cpp)
  if [[ "$name" == *emu* ]]; then
    run "$name" g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include -o "$out/$name" "$f"
  else
    run "$name" g++ -std=c++17 -Wall -Werror -Icuda/include -o "$out/$name" "$f"
  fi
done
if command -v nvcc >/dev/null 2>&1; then
  run dec16_test nvcc -std=c++17 -O2 -o "$out/dec16_test" cuda/test/dec16_test.cu
else
  echo "cuda host test dec16_test: skipped (no nvcc)"
fi
exit $fail
