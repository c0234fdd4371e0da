#!/usr/bin/env bash
# Prints the path of a CUDA 12.4 nvcc for compile-checking sm_90a code (wgmma, TMA bulk copies,
# setmaxnreg) on a machine without a GPU, installing it first when missing. Debian bookworm's
# nvidia-cuda-toolkit is 11.8 (no sm_90a); trixie's non-free has 12.4. The .debs are fetched with a
# private apt state and unpacked under $ORCH_NVCC12_ROOT (default /opt/cuda124): the system's
# packages (and its nvcc 11.8, which CI's sm_80/sm_90 check uses) are left alone. ~1 GB download.
# Usage: NVCC12=$(bash cuda/scripts/nvcc12.sh) && "$NVCC12" -arch=sm_90a -c f.cu
set -euo pipefail
root=${ORCH_NVCC12_ROOT:-/opt/cuda124}
nvcc="$root/usr/lib/nvidia-cuda-toolkit/bin/nvcc"
if [ ! -x "$nvcc" ] || [ ! -f "$root/.ready" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs" "$root"
  echo 'deb http://deb.debian.org/debian trixie main contrib non-free' >"$tmp/sources.list"
  apt=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$tmp/lists"
    -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root)
  apt-get "${apt[@]}" -q update >&2
  (cd "$tmp/debs" && apt-get "${apt[@]}" -q download nvidia-cuda-toolkit nvidia-cuda-dev libcudart12 libnvvm4 libcu++-dev >&2)
  for f in "$tmp"/debs/*.deb; do dpkg -x "$f" "$root"; done
  # The packaged nvcc.profile points at /usr/...: re-root it. It is a symlink to /etc/nvcc.profile (the
  # system nvcc's, Debian's 11.8 included): replace the link with a file rather than write through it.
  r="$root/usr"
  rm -f "$r/lib/nvidia-cuda-toolkit/bin/nvcc.profile"
  cat >"$r/lib/nvidia-cuda-toolkit/bin/nvcc.profile" <<PROFILE
NVVMIR_LIBRARY_DIR = $r/lib/nvidia-cuda-toolkit/libdevice
PATH += $r/lib/nvidia-cuda-toolkit/bin:$r/bin:
INCLUDES += "-I$r/include" \$(_SPACE_)
LIBRARIES =+ \$(_SPACE_) -L$r/lib/x86_64-linux-gnu/stubs -L$r/lib/x86_64-linux-gnu
PROFILE
  "$nvcc" --version | grep -q 'release 12' || { echo "nvcc12: $nvcc is not CUDA 12" >&2; exit 1; }
  touch "$root/.ready"
fi
echo "$nvcc"
