#!/usr/bin/env bash
# tp-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]
#
# Tensor-parallel scaling on a multi-GPU box: serves MODEL unsplit (one
# adapter process on one GPU) and then with --tensor-parallel 2 (two rank
# processes, CUDA_VISIBLE_DEVICES=0 and 1, meeting in NCCL all-reduces), and
# for each prints:
#   - the adapter processes and memory per GPU (nvidia-smi),
#   - one stream of MAX_TOKENS tokens (decode tok/s of a single request),
#   - STREAMS concurrent streams of MAX_TOKENS tokens (aggregate tok/s),
#   - a greedy 32-token completion of a fixed prompt; at the end the split
#     and unsplit completions are compared (random-weight models have near
#     ties, so a late difference is reported, not failed).
# DEVICE=cpu runs the same on the CPU (plumbing check; slow). TP=4 splits 4 ways;
# TP="2 4" measures each split after the unsplit run.
# Needs: BIN_DIR/orch-host and the adapters, python3, curl, nvidia-smi.
# Fits one 5-minute device call for gpt-oss-20b (two loads of ~12 GB from the
# page cache, 4 short loads).
set -euo pipefail
BIN=${1:?usage: tp-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]}
MODEL=${2:?usage: tp-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]}
STREAMS=${3:-32}
MAXTOK=${4:-128}
PORT=${PORT:-18080}
TP=${TP:-2}
BIN=$(cd "$BIN" && pwd)
MODEL=$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")
ID=$(basename "$MODEL" .gguf)
WORK=$(mktemp -d)
trap 'kill $SERVE_PID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
SERVE_PID=

nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv || true

for N in 1 $TP; do
  LABEL=unsplit
  [ "$N" = 1 ] || LABEL="tensor-parallel=$N"
  cat >"$WORK/orch-host.yaml" <<EOF
plugins:
  dir: $BIN
models:
  - path: $MODEL
    device: ${DEVICE:-auto}
    tensor_parallel: $N
EOF
  t0=$(date +%s)
  "$BIN/orch-host" serve --config "$WORK/orch-host.yaml" --addr "127.0.0.1:$PORT" \
    --max-queue 1024 >"$WORK/serve-$N.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $SERVE_PID 2>/dev/null || { echo "serve ($LABEL) exited:"; tail -40 "$WORK/serve-$N.log"; exit 1; }
    sleep 1
  done
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "serve ($LABEL) not ready"; tail -40 "$WORK/serve-$N.log"; exit 1; }
  echo "== $LABEL: ready in $(( $(date +%s) - t0 )) s; adapter processes and memory per GPU"
  grep -E '"placement"|placement|tensor-parallel group|model loaded' "$WORK/serve-$N.log" | tail -5 || true
  nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader || true
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader || true
  python3 - "$PORT" "$ID" "$STREAMS" "$MAXTOK" "$LABEL" "$WORK/greedy-$N.txt" <<'PY'
import json, sys, time, threading, urllib.request
port, model, streams, maxtok, label, greedy_out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)
def one(out, i, n=maxtok):
    out[i] = post({"model": model, "prompt": "The quick brown fox", "max_tokens": n, "ignore_eos": True, "temperature": 0})["usage"]["completion_tokens"]
one([0], 0, 16)  # warm-up (graphs, allocator)
def run(n):
    out = [0] * n
    t0 = time.time()
    ts = [threading.Thread(target=one, args=(out, i)) for i in range(n)]
    for t in ts: t.start()
    for t in ts: t.join()
    dt = time.time() - t0
    print(f"{label} streams={n} max_tokens={maxtok}: {sum(out)} tokens in {dt:.2f} s = {sum(out)/dt:.1f} tok/s aggregate")
run(1)
run(streams)
g = post({"model": model, "prompt": "Tensor parallelism splits", "max_tokens": 32, "ignore_eos": True, "temperature": 0})
open(greedy_out, "w").write(g["choices"][0]["text"])
PY
  kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true; SERVE_PID=
  grep -iE 'error|panic' "$WORK/serve-$N.log" | grep -v 'level=debug' | tail -5 || true
done

for N in $TP; do
python3 - "$WORK/greedy-1.txt" "$WORK/greedy-$N.txt" "$N" <<'PY'
import sys
a, b, n_split = open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3]
if a == b:
    print(f"greedy 32 tokens: split {n_split} ways == unsplit ({len(a)} chars)")
else:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"greedy 32 tokens: split {n_split} ways and unsplit differ from char {n}: unsplit {a[n:n+40]!r} vs split {b[n:n+40]!r}")
PY
done
