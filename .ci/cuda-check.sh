#!/usr/bin/env bash
# CI compile check of cuda/: every .cu must compile for sm_80 and sm_90 (nvcc 11.8) and sm_90a (nvcc 12.4).
# Installs Debian's nvidia-cuda-toolkit (nvcc 11.8; needs the contrib and
# non-free components) when nvcc is missing (~1.5 min). Nothing runs on a GPU.
# Code that only sm_90a / newer CUDA can compile (wgmma, setmaxnreg) must sit
# behind __CUDA_ARCH_FEAT_SM90_ALL / CUDART_VERSION guards so this passes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "cuda-check: nvcc missing and not root: cannot install" >&2; exit 1; fi
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && ! grep -q 'non-free' "$src"; then
    sed -i '0,/^Components: main$/s//Components: main contrib non-free/' "$src"
  elif [ -f /etc/apt/sources.list ] && ! grep -q 'non-free' /etc/apt/sources.list; then
    sed -i 's/ main$/ main contrib non-free/' /etc/apt/sources.list
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-cuda-toolkit
fi
nvcc --version | tail -1

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fail=0
# sm_90a (what the device builds: wgmma, TMA bulk copies, setmaxnreg behind __CUDA_ARCH_FEAT_SM90_ALL) needs
# CUDA 12: cuda/scripts/nvcc12.sh unpacks Debian trixie's 12.4 under /opt/cuda124 (~1 GB, ~1 min).
nvcc12=$(bash cuda/scripts/nvcc12.sh) || { echo "cuda-check: could not install CUDA 12 nvcc" >&2; exit 1; }
"$nvcc12" --version | tail -1
# Every (source, arch) compiles as its own job, ORCH_TEST_JOBS at a time (default: the number of CPUs); each job's
# compiler output (ptxas spill warnings included) is printed in order once all have run.
source cuda/test/pool.sh
compile() { # compiler, arch, source, job id
  if ! "$1" -std=c++17 -c -arch=sm_$2 -Xptxas=-warn-spills -Icuda/include -o "$out/$(basename "$3").$2.o" "$3" \
    >"$out/job$4.log" 2>&1; then
    echo "cuda-check: FAILED $3 sm_$2 ($1)" >>"$out/job$4.log"
    return 1
  fi
}
n=0
for f in cuda/src/*.cu; do
  for job in "nvcc 80" "nvcc 90" "$nvcc12 90a"; do
    set -- $job
    pool_run compile "$1" "$2" "$f" "$n"
    n=$((n + 1))
  done
done
pool_wait
[ "$pool_fail" = 0 ] || fail=1
for ((i = 0; i < n; i++)); do cat "$out/job$i.log" >&2; done
# Link the sm_90a objects into one relocatable object (ld -r: no runtime needed): a kernel or
# variable defined in a header that two .cu files include (e.g. a non-template, non-static __global__) fails here.
if [ "$fail" = 0 ] && ! ld -r -o "$out/orch_cuda_link_check.o" "$out"/*.90a.o; then
  echo "cuda-check: FAILED linking the objects (multiple definitions?)" >&2
  fail=1
fi
# Host tests of the CUDA sources (no GPU): index/tile-plan math, the fp16 decode bit tricks, and the
# kernels themselves compiled against the CPU emulation cuda/test/cuda_emu.h under ASan (~14 min of CPU, two at a
# time on 2 cores; MoE v6's is the longest).
if ! bash cuda/test/run.sh; then
  echo "cuda-check: FAILED cuda/test host tests" >&2
  fail=1
fi
# The C ABI header must stay plain C (no CUDA types): compile it as C.
echo '#include "orch_cuda.h"' | cc -x c -std=c11 -Wall -Werror -Icuda/include -fsyntax-only -
[ "$fail" = 0 ] && echo "cuda-check: all $(ls cuda/src/*.cu | wc -l) sources compile for sm_80, sm_90 and sm_90a"
exit "$fail"
