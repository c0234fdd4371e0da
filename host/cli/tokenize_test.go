package cli

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

// tinyVocabModel writes a GGUF with a small byte-level BPE vocabulary: the
// 256 bytes, "he", "ll", "hell", "hello", and the specials <|endoftext|>
// (BOS/EOS) and <|start|>.
func tinyVocabModel(t *testing.T) string {
	t.Helper()
	var toks []string
	var types []int32
	for b := 0; b < 256; b++ {
		toks = append(toks, tokenizer.ByteLevelEncode([]byte{byte(b)}))
		types = append(types, 1)
	}
	toks = append(toks, "he", "ll", "hell", "hello", "<|endoftext|>", "<|start|>")
	types = append(types, 1, 1, 1, 1, 3, 3)
	w := gguf.NewWriter()
	w.Set("general.architecture", "gpt2")
	w.Set("tokenizer.ggml.model", "gpt2")
	w.Set("tokenizer.ggml.pre", "gpt-2")
	w.Set("tokenizer.ggml.tokens", toks)
	w.Set("tokenizer.ggml.token_type", types)
	w.Set("tokenizer.ggml.merges", []string{"h e", "l l", "he ll", "hell o"})
	w.Set("tokenizer.ggml.bos_token_id", uint32(260))
	w.Set("tokenizer.ggml.eos_token_id", uint32(260))
	w.Set("tokenizer.ggml.add_bos_token", true)
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, w.WriteFile(path, nil))
	return path
}

func runCLI(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	root := NewRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&bytes.Buffer{})
	root.SetIn(strings.NewReader(stdin))
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestTokenizeCLI(t *testing.T) {
	model := tinyVocabModel(t)

	out, err := runCLI(t, "", "tokenize", "--model", model, "hello<|start|>")
	require.NoError(t, err)
	// "hello" merges to one token; "<|start|>" is plain text by default.
	assert.Equal(t, "[259,60,124,115,116,97,114,116,124,62]\n", out)

	out, err = runCLI(t, "", "tokenize", "--model", model, "--parse-special", "--add-special", "hello<|start|>")
	require.NoError(t, err)
	assert.Equal(t, "[260,259,261]\n", out)

	out, err = runCLI(t, "\"hello\"\n\"he\\u00e9\"\n\"\"\n", "tokenize", "--model", model, "--jsonl")
	require.NoError(t, err)
	assert.Equal(t, "[259]\n[256,195,169]\n[]\n", out)

	_, err = runCLI(t, "hello\n", "tokenize", "--model", model, "--jsonl")
	require.ErrorContains(t, err, "line 1")

	out, err = runCLI(t, "hello world", "tokenize", "--model", model)
	require.NoError(t, err)
	assert.Equal(t, "[259,32,119,111,114,108,100]\n", out)
}

func TestDetokenizeCLI(t *testing.T) {
	model := tinyVocabModel(t)

	out, err := runCLI(t, "", "detokenize", "--model", model, "[260,259,261]")
	require.NoError(t, err)
	assert.Equal(t, "<|endoftext|>hello<|start|>", out)

	out, err = runCLI(t, "259 32 119, 111", "detokenize", "--model", model)
	require.NoError(t, err)
	assert.Equal(t, "hello wo", out)

	out, err = runCLI(t, "[259]\n[256,195,169]\n[]\n[60]\n", "detokenize", "--model", model, "--jsonl")
	require.NoError(t, err)
	assert.Equal(t, "\"hello\"\n\"heé\"\n\"\"\n\"<\"\n", out)

	_, err = runCLI(t, "[999]\n", "detokenize", "--model", model, "--jsonl")
	require.ErrorContains(t, err, "out of range")
	_, err = runCLI(t, "", "detokenize", "--model", model, "1 x")
	require.Error(t, err)
	_, err = runCLI(t, "", "detokenize", "--model", filepath.Join(t.TempDir(), "missing.gguf"), "1")
	require.Error(t, err)
}
