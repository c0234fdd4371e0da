package tokenizer_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/tokenizer"
)

type hfAdded struct {
	ID      int32  `json:"id"`
	Content string `json:"content"`
	Special bool   `json:"special"`
}

// writeHF writes a tokenizer.json shaped like Hugging Face's (and a
// tokenizer_config.json when cfg is not nil) from a test vocabulary.
func writeHF(t *testing.T, v tokenizer.Vocab, merges any, extra map[string]any, cfg map[string]any) string {
	t.Helper()
	vocab := map[string]int32{}
	var added []hfAdded
	for i, s := range v.Tokens {
		switch v.Types[i] {
		case tokenizer.TypeControl, tokenizer.TypeUnknown:
			added = append(added, hfAdded{int32(i), s, true})
			if v.Model == "llama" {
				vocab[s] = int32(i)
			}
		default:
			vocab[s] = int32(i)
		}
	}
	model := map[string]any{"type": "BPE", "vocab": vocab, "merges": merges}
	doc := map[string]any{"model": model, "added_tokens": added}
	for k, x := range extra {
		if k == "unk_token" || k == "byte_fallback" {
			model[k] = x
			continue
		}
		doc[k] = x
	}
	dir := t.TempDir()
	b, err := json.Marshal(doc)
	require.NoError(t, err)
	path := filepath.Join(dir, "tokenizer.json")
	require.NoError(t, os.WriteFile(path, b, 0o644))
	if cfg != nil {
		b, err := json.Marshal(cfg)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), b, 0o644))
	}
	return path
}

func TestOpenHF(t *testing.T) {
	texts := loadCorpus(t)
	t.Run("llama3", func(t *testing.T) {
		v := refVocab(t, "llama3")
		pairs := make([][]string, len(v.Merges)) // the newer [a, b] merge form
		for i, m := range v.Merges {
			a, b, _ := strings.Cut(m, " ")
			pairs[i] = []string{a, b}
		}
		path := writeHF(t, v, pairs, map[string]any{
			"pre_tokenizer": map[string]any{"type": "Sequence", "pretokenizers": []any{
				map[string]any{"type": "Split", "pattern": map[string]any{"Regex": `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}, "behavior": "Isolated"},
				map[string]any{"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}}},
			"decoder": map[string]any{"type": "ByteLevel"},
		}, map[string]any{"bos_token": "<|begin_of_text|>", "eos_token": map[string]any{"content": "<|eot_id|>"}, "add_bos_token": true,
			"chat_template": []any{map[string]any{"name": "default", "template": "{{ bos_token }}"}}})
		tok, err := tokenizer.OpenHF(path)
		require.NoError(t, err)
		ref := llama3(t)
		assert.Equal(t, "llama-bpe", tok.PreTokenizer())
		assert.Equal(t, "{{ bos_token }}", tok.ChatTemplate())
		eos, _ := tok.EOS()
		assert.Equal(t, int32(128009), eos)
		for i, s := range texts {
			if i%4 == 0 {
				require.Equal(t, ref.Encode(s, tokenizer.EncodeOptions{AddSpecial: true, ParseSpecial: true}),
					tok.Encode(s, tokenizer.EncodeOptions{AddSpecial: true, ParseSpecial: true}), "text %d", i)
			}
		}
	})
	t.Run("llama2", func(t *testing.T) {
		v := refVocab(t, "llama2")
		var d struct{ Merges []string }
		readGz(t, "llama2-vocab.json.gz", &d)
		path := writeHF(t, v, d.Merges, map[string]any{
			"normalizer": map[string]any{"type": "Sequence", "normalizers": []any{
				map[string]any{"type": "Prepend", "prepend": "\u2581"},
				map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "\u2581"}}},
			"decoder":        map[string]any{"type": "Sequence", "decoders": []any{map[string]any{"type": "ByteFallback"}}},
			"post_processor": map[string]any{"type": "TemplateProcessing", "single": []any{map[string]any{"SpecialToken": map[string]any{"id": "<s>"}}, map[string]any{"Sequence": map[string]any{"id": "A"}}}},
			"unk_token":      "<unk>", "byte_fallback": true,
		}, nil)
		tok, err := tokenizer.OpenHF(path)
		require.NoError(t, err)
		ref := llama2(t)
		assert.Equal(t, "llama", tok.Model())
		bos, ok := tok.BOS()
		require.True(t, ok)
		assert.Equal(t, int32(1), bos)
		for i, s := range texts {
			if i%4 == 0 {
				require.Equal(t, ref.Encode(s, tokenizer.EncodeOptions{AddSpecial: true}),
					tok.Encode(s, tokenizer.EncodeOptions{AddSpecial: true}), "text %d", i)
			}
		}
	})
	t.Run("errors", func(t *testing.T) {
		dir := t.TempDir()
		for name, doc := range map[string]string{
			"json":    `{`,
			"unigram": `{"model":{"type":"Unigram"}}`,
			"empty":   `{"model":{"type":"BPE","vocab":{}}}`,
			"merges":  `{"model":{"type":"BPE","vocab":{"a":0},"merges":[["a"]]},"decoder":{"type":"ByteLevel"}}`,
			"kind":    `{"model":{"type":"BPE","vocab":{"a":0},"merges":[]}}`,
		} {
			p := filepath.Join(dir, name+".json")
			require.NoError(t, os.WriteFile(p, []byte(doc), 0o644))
			_, err := tokenizer.OpenHF(p)
			assert.ErrorIs(t, err, tokenizer.ErrInvalidVocab, name)
		}
		_, err := tokenizer.OpenHF(filepath.Join(dir, "missing.json"))
		assert.Error(t, err)
	})
}
