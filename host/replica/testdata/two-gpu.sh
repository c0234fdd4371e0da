#!/usr/bin/env bash
# two-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]
#
# Replica scaling on a multi-GPU box: serves MODEL with models[].replicas = 1
# and then = 2 (REPLICAS="1 2 4" for more; one adapter process per GPU,
# CUDA_VISIBLE_DEVICES=<i>), sends
# STREAMS concurrent /v1/completions (ignore_eos, MAX_TOKENS each) to each,
# and prints aggregate decode tokens/s and which GPUs held adapter processes.
# Needs: BIN_DIR/orch-host and the adapters, python3, curl, nvidia-smi.
#
# The replicas come from the config file (models[].replicas, see
# docs/multi-gpu.md); with replicas=2 each GPU shows one adapter process.
set -euo pipefail
BIN=${1:?usage: two-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]}
MODEL=${2:?usage: two-gpu.sh BIN_DIR MODEL.gguf [STREAMS] [MAX_TOKENS]}
STREAMS=${3:-32}
MAXTOK=${4:-128}
PORT=${PORT:-18080}
BIN=$(cd "$BIN" && pwd)
MODEL=$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")
ID=$(basename "$MODEL" .gguf)
WORK=$(mktemp -d)
trap 'kill $SERVE_PID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
SERVE_PID=

nvidia-smi --query-gpu=index,name,memory.free,memory.total --format=csv || true

for R in ${REPLICAS:-1 2}; do
  cat >"$WORK/orch-host.yaml" <<EOF
plugins:
  dir: $BIN
models:
  - path: $MODEL
    replicas: $R
EOF
  "$BIN/orch-host" serve --config "$WORK/orch-host.yaml" --addr "127.0.0.1:$PORT" \
    --max-queue 1024 >"$WORK/serve-$R.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $SERVE_PID 2>/dev/null || { echo "serve exited:"; tail -30 "$WORK/serve-$R.log"; exit 1; }
    sleep 1
  done
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "serve not ready"; tail -30 "$WORK/serve-$R.log"; exit 1; }
  echo "== replicas=$R: adapter processes per GPU"
  nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader || true
  python3 - "$PORT" "$ID" "$STREAMS" "$MAXTOK" "$R" <<'PY'
import json, sys, time, threading, urllib.request
port, model, streams, maxtok, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def one(out, i):
    body = json.dumps({"model": model, "prompt": "The quick brown fox", "max_tokens": maxtok,
                       "ignore_eos": True, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out[i] = json.load(r)["usage"]["completion_tokens"]
one([0], 0)  # warm-up
out = [0] * streams
t0 = time.time()
ts = [threading.Thread(target=one, args=(out, i)) for i in range(streams)]
for t in ts: t.start()
for t in ts: t.join()
dt = time.time() - t0
print(f"replicas={reps} streams={streams} max_tokens={maxtok}: {sum(out)} tokens in {dt:.2f} s = {sum(out)/dt:.1f} tok/s aggregate")
PY
  kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true; SERVE_PID=
done
