// Package tiktoken builds tokenizer vocabularies from the tiktoken rank files
// embedded in github.com/pkoukk/tiktoken-go-loader, so that tests, tools and
// the synthetic-model generator have real vocabularies offline: o200k_harmony
// (gpt-oss) and r50k/GPT-2. It is a separate package because importing it
// links the embedded rank files (several MB) into the binary.
package tiktoken

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"strconv"

	"github.com/llama-orch/orch/sdk/tokenizer"
	"github.com/pkoukk/tiktoken-go-loader/assets"
)

// Ranks reads an embedded .tiktoken file ("o200k_base.tiktoken",
// "cl100k_base.tiktoken", "r50k_base.tiktoken", "p50k_base.tiktoken") and
// returns the raw bytes of each token indexed by rank.
func Ranks(file string) ([][]byte, error) {
	data, err := assets.Assets.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("tiktoken ranks %s: %w", file, err)
	}
	var out [][]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 {
			continue
		}
		sp := bytes.IndexByte(line, ' ')
		if sp < 0 {
			return nil, fmt.Errorf("tiktoken ranks %s: bad line %q", file, line)
		}
		tok, err := base64.StdEncoding.DecodeString(string(line[:sp]))
		if err != nil {
			return nil, fmt.Errorf("tiktoken ranks %s: %w", file, err)
		}
		rank, err := strconv.Atoi(string(line[sp+1:]))
		if err != nil {
			return nil, fmt.Errorf("tiktoken ranks %s: %w", file, err)
		}
		for len(out) <= rank {
			out = append(out, nil)
		}
		out[rank] = tok
	}
	for i, t := range out {
		if t == nil {
			return nil, fmt.Errorf("tiktoken ranks %s: rank %d missing", file, i)
		}
	}
	return out, nil
}

// HarmonySpecials are o200k_harmony's named special tokens (gpt-oss); the
// other ids from 199998 to 201087 are <|reserved_N|>.
var HarmonySpecials = map[int32]string{
	199998: "<|startoftext|>",
	199999: "<|endoftext|>",
	200002: "<|return|>",
	200003: "<|constrain|>",
	200005: "<|channel|>",
	200006: "<|start|>",
	200007: "<|end|>",
	200008: "<|message|>",
	200012: "<|call|>",
	200018: "<|endofprompt|>",
}

// HarmonyVocabSize is gpt-oss's vocabulary size.
const HarmonyVocabSize = 201088

// O200kBaseSize is the number of ordinary (ranked) tokens of o200k.
const O200kBaseSize = 199998

// O200kHarmony is the gpt-oss vocabulary as a GGUF file carries it
// (model gpt2, pre gpt-4o, byte-level token text). BOS <|startoftext|>,
// EOS <|return|>, PAD <|endoftext|>. Merges are left nil: the tokenizer then
// derives them from the ranks, which is faster; a GGUF writer needs
// tokenizer.MergesFromRanks(v.Tokens[:O200kBaseSize]) (Hugging Face's order).
func O200kHarmony() (tokenizer.Vocab, error) {
	ranks, err := Ranks("o200k_base.tiktoken")
	if err != nil {
		return tokenizer.Vocab{}, err
	}
	v := fromRanks(ranks, HarmonyVocabSize)
	v.Pre = "gpt-4o"
	for i := len(ranks); i < HarmonyVocabSize; i++ {
		name, ok := HarmonySpecials[int32(i)]
		if !ok {
			name = fmt.Sprintf("<|reserved_%d|>", i)
		}
		v.Tokens[i] = name
		v.Types[i] = tokenizer.TypeControl
	}
	v.BOS, v.EOS, v.PAD = 199998, 200002, 199999
	return v, nil
}

// GPT2 is the GPT-2 vocabulary (r50k_base) with <|endoftext|> (50256) as
// BOS and EOS. Merges are nil, as for O200kHarmony.
func GPT2() (tokenizer.Vocab, error) {
	ranks, err := Ranks("r50k_base.tiktoken")
	if err != nil {
		return tokenizer.Vocab{}, err
	}
	v := fromRanks(ranks, len(ranks)+1)
	v.Pre = "gpt-2"
	v.Tokens[len(ranks)] = "<|endoftext|>"
	v.Types[len(ranks)] = tokenizer.TypeControl
	v.BOS, v.EOS = int32(len(ranks)), int32(len(ranks))
	return v, nil
}

func fromRanks(ranks [][]byte, size int) tokenizer.Vocab {
	v := tokenizer.Vocab{
		Model:  "gpt2",
		Tokens: make([]string, size),
		Types:  make([]tokenizer.TokenType, size),
		BOS:    tokenizer.NoToken, EOS: tokenizer.NoToken, EOT: tokenizer.NoToken,
		EOM: tokenizer.NoToken, UNK: tokenizer.NoToken, PAD: tokenizer.NoToken,
	}
	for i, b := range ranks {
		v.Tokens[i] = tokenizer.ByteLevelEncode(b)
		v.Types[i] = tokenizer.TypeNormal
	}
	return v
}
