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
for f in cuda/src/*.cu; do
  for arch in 80 90; do
    if ! nvcc -std=c++17 -c -arch=sm_$arch -Xptxas=-warn-spills -Icuda/include -o "$out/$(basename "$f").$arch.o" "$f"; then
      echo "cuda-check: FAILED $f sm_$arch" >&2
      fail=1
    fi
  done
done
# sm_90a (what the device builds: wgmma, TMA bulk copies, setmaxnreg behind __CUDA_ARCH_FEAT_SM90_ALL) needs
# CUDA 12: cuda/scripts/nvcc12.sh unpacks Debian trixie's 12.4 under /opt/cuda124 (~1 GB, ~1 min).
nvcc12=$(bash cuda/scripts/nvcc12.sh) || { echo "cuda-check: could not install CUDA 12 nvcc" >&2; exit 1; }
"$nvcc12" --version | tail -1
for f in cuda/src/*.cu; do
  if ! "$nvcc12" -std=c++17 -c -arch=sm_90a -Xptxas=-warn-spills -Icuda/include -o "$out/$(basename "$f").90a.o" "$f"; then
    echo "cuda-check: FAILED $f sm_90a (CUDA 12)" >&2
    fail=1
  fi
done
# Link the sm_90a objects into one relocatable object (ld -r: no runtime needed): a kernel or
# variable defined in a header that two .cu files include (e.g. a non-template, non-static __global__) fails here.
if [ "$fail" = 0 ] && ! ld -r -o "$out/orch_cuda_link_check.o" "$out"/*.90a.o; then
  echo "cuda-check: FAILED linking the objects (multiple definitions?)" >&2
  fail=1
fi
# Host tests of the CUDA sources (no GPU): index/tile-plan math, the fp16 decode bit tricks, and the
# kernels themselves compiled against the CPU emulation cuda/test/cuda_emu.h under ASan (~8–12 min on 2 cores; the attention emulation is most of it).
if ! bash cuda/test/run.sh; then
  echo "cuda-check: FAILED cuda/test host tests" >&2
  fail=1
fi
# The C ABI header must stay plain C (no CUDA types): compile it as C.
echo '#include "orch_cuda.h"' | cc -x c -std=c11 -Wall -Werror -Icuda/include -fsyntax-only -
[ "$fail" = 0 ] && echo "cuda-check: all $(ls cuda/src/*.cu | wc -l) sources compile for sm_80, sm_90 and sm_90a"
exit "$fail"
