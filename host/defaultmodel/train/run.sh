#!/bin/sh
# GPU box: train the default model from DATA_DIR (made by fetch_corpus.sh) into OUT_DIR.
# Usage: run.sh DATA_DIR OUT_DIR   (OUT_DIR gets default.gguf, train_log.txt, samples.txt, tokenizer.json,
# tokenizer_cases.json, train_meta.json). Then copy OUT_DIR/default.gguf to host/defaultmodel/model.gguf.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
python3 "$here/train.py" "$1" "$2"
