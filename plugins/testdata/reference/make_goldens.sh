#!/bin/sh
# CPU machine: write the tiny synthetic models and their prompts into plugins/testdata/golden/.
# Needs Go and python3 with NumPy (for the prompt ids: seeded, in-vocab, normal tokens).
# Then run run.sh on the GPU box to make the logits/greedy goldens.
set -eu
cd "$(dirname "$0")/../../.."
gold=plugins/testdata/golden
mkdir -p "$gold"
py=${PYTHON:-python3}
# SYNTH_BIN (optional): a program taking "ARCH SIZE OUT SEED" that calls sdk/synth.Write; default is
# `orch-host synth`.
if [ -z "${SYNTH_BIN:-}" ]; then
	go build -o /tmp/orch-host-goldens ./host/cmd/orch-host
fi
synth() { # arch size seed out
	if [ -n "${SYNTH_BIN:-}" ]; then
		"$SYNTH_BIN" "$1" "$2" "$4" "$3"
	else
		/tmp/orch-host-goldens synth --arch "$1" --size "$2" --seed "$3" --out "$4"
	fi
}
# name arch size seed prompt-length
while read -r name arch size seed n; do
	synth "$arch" "$size" "$seed" "$gold/$name.gguf"
	rm -f "$gold/$name.tokens.json"
	$py plugins/testdata/reference/tokens.py "$gold/$name.gguf" "$n" "$seed" > "$gold/$name.tokens.json"
done <<LIST
gpt-oss-tiny gpt-oss tiny 11 32
gpt-oss-tiny-swa gpt-oss tiny-swa 12 40
gpt2-tiny gpt2 tiny 13 32
llama3-tiny llama tiny 14 32
llama2-tiny llama tiny-llama2 15 32
LIST
# The embedded default model (real trained weights): a real English prompt.
ln -sf ../../../host/defaultmodel/model.gguf "$gold/default-gpt2.gguf"
$py - "$gold/default-gpt2.tokens.json" <<'PY'
import json, sys
cases = json.load(open("host/defaultmodel/train/results/tokenizer_cases.json"))
ids = cases[1]["ids"] + cases[0]["ids"] + cases[2]["ids"]
json.dump(ids, open(sys.argv[1], "w")); open(sys.argv[1], "a").write("\n")
PY
ls -la "$gold"
