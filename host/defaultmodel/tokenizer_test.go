package defaultmodel

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/tokenizer"
)

// The Go tokenizer must split text exactly as HF `tokenizers` (which trained the vocabulary) does:
// train/results/tokenizer_cases.json holds strings and the ids HF gave them on the GPU box.
func TestTokenizerMatchesHF(t *testing.T) {
	raw, err := os.ReadFile("train/results/tokenizer_cases.json")
	require.NoError(t, err)
	var cases []struct {
		Text string  `json:"text"`
		IDs  []int32 `json:"ids"`
	}
	require.NoError(t, json.Unmarshal(raw, &cases))
	require.NotEmpty(t, cases)

	p, err := PathIn(t.TempDir())
	require.NoError(t, err)
	tok, err := tokenizer.Open(p)
	require.NoError(t, err)
	for _, c := range cases {
		got := tok.Encode(c.Text, tokenizer.EncodeOptions{AddSpecial: true, ParseSpecial: true})
		assert.Equal(t, c.IDs, got, "%q", c.Text)
		assert.Equal(t, c.Text, tok.Decode(got), "round trip of %q", c.Text)
	}
	eos, ok := tok.EOS()
	require.True(t, ok)
	assert.Equal(t, "<|endoftext|>", tok.TokenText(eos))
}
