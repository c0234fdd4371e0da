#!/bin/sh
# GPU box, one command: regenerate the transformers goldens for every plugins/testdata/golden/*.gguf
# (prompts from <name>.tokens.json, made by make_goldens.sh on the CPU machine).
# Writes <name>.logits.npy, <name>.greedy.json, <name>.meta.json next to each model; when $OUT is set
# (the device tool), also packs them into $OUT/goldens.tar.
#   device run: sh plugins/testdata/reference/run.sh
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
ref=plugins/testdata/reference
gold=plugins/testdata/golden
python3 "$ref/test_gguf_reader.py" || exit 1
fail=0
for f in "$gold"/*.gguf; do
	python3 "$ref/ref.py" "$f" || { echo "FAILED: $f"; fail=1; }
done
if [ -n "${OUT:-}" ]; then
	(cd "$gold" && tar -cf "$OUT/goldens.tar" ./*.logits.npy ./*.greedy.json ./*.meta.json)
fi
exit $fail
