package tokenizer_test

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

// writeVocabGGUF writes v as GGUF tokenizer metadata (no tensors), the way
// llama.cpp's converter does.
func writeVocabGGUF(t *testing.T, v tokenizer.Vocab, tmpl string) string {
	t.Helper()
	w := gguf.NewWriter()
	w.Set("general.architecture", "llama")
	w.Set("tokenizer.ggml.model", v.Model)
	w.Set("tokenizer.ggml.pre", v.Pre)
	w.Set("tokenizer.ggml.tokens", v.Tokens)
	types := make([]int32, len(v.Types))
	for i, ty := range v.Types {
		types[i] = int32(ty)
	}
	w.Set("tokenizer.ggml.token_type", types)
	if v.Scores != nil {
		w.Set("tokenizer.ggml.scores", v.Scores)
	}
	if v.Merges != nil {
		w.Set("tokenizer.ggml.merges", v.Merges)
	}
	if v.BOS >= 0 {
		w.Set("tokenizer.ggml.bos_token_id", uint32(v.BOS))
	}
	if v.EOS >= 0 {
		w.Set("tokenizer.ggml.eos_token_id", uint32(v.EOS))
	}
	if v.UNK >= 0 {
		w.Set("tokenizer.ggml.unknown_token_id", uint32(v.UNK))
	}
	w.Set("tokenizer.ggml.add_bos_token", v.AddBOS)
	w.Set("tokenizer.chat_template", tmpl)
	path := filepath.Join(t.TempDir(), "vocab.gguf")
	require.NoError(t, w.WriteFile(path, nil))
	return path
}

func TestFromGGUF(t *testing.T) {
	texts := []string{"Hello world", " it's  <|start|>\n\n x", "日本語 🤖 ñ", ""}
	for _, tc := range []struct {
		name string
		tok  func(testing.TB) *tokenizer.Tokenizer
	}{{"llama3", llama3}, {"llama2", llama2}} {
		t.Run(tc.name, func(t *testing.T) {
			ref := tc.tok(t)
			v := refVocab(t, tc.name)
			path := writeVocabGGUF(t, v, "{{ bos_token }}")
			tok, err := tokenizer.Open(path)
			require.NoError(t, err)
			assert.Equal(t, ref.VocabSize(), tok.VocabSize())
			assert.Equal(t, "{{ bos_token }}", tok.ChatTemplate())
			for _, s := range texts {
				for _, o := range []tokenizer.EncodeOptions{{}, {AddSpecial: true, ParseSpecial: true}} {
					assert.Equal(t, ref.Encode(s, o), tok.Encode(s, o), "%q %+v", s, o)
				}
			}
			bos, ok := tok.BOS()
			require.True(t, ok)
			assert.Equal(t, bos, tok.Encode("x", tokenizer.EncodeOptions{AddSpecial: true})[0])
		})
	}
}

func TestFromGGUFErrors(t *testing.T) {
	w := gguf.NewWriter()
	w.Set("general.architecture", "llama")
	path := filepath.Join(t.TempDir(), "none.gguf")
	require.NoError(t, w.WriteFile(path, nil))
	_, err := tokenizer.Open(path)
	require.ErrorIs(t, err, tokenizer.ErrInvalidVocab)

	w.Set("tokenizer.ggml.model", "gpt2")
	w.Set("tokenizer.ggml.tokens", []string{"a", "b"})
	require.NoError(t, w.WriteFile(path, nil))
	_, err = tokenizer.Open(path)
	require.ErrorIs(t, err, tokenizer.ErrInvalidVocab) // no merges

	w.Set("tokenizer.ggml.merges", []string{"a b"})
	require.NoError(t, w.WriteFile(path, nil))
	_, err = tokenizer.Open(path)
	require.ErrorIs(t, err, tokenizer.ErrInvalidVocab) // bytes missing

	_, err = tokenizer.Open(filepath.Join(t.TempDir(), "missing.gguf"))
	require.Error(t, err)
}
