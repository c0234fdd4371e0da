package tokenizer_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/tokenizer"
)

// TestStreamDecoder feeds golden texts' ids one at a time: every chunk is
// valid UTF-8 and the chunks add up to the text.
func TestStreamDecoder(t *testing.T) {
	texts := loadCorpus(t)
	for _, tc := range []struct {
		name string
		tok  func(testing.TB) *tokenizer.Tokenizer
	}{{"o200k", o200k}, {"llama2", llama2}} {
		t.Run(tc.name, func(t *testing.T) {
			tok := tc.tok(t)
			for i, text := range texts {
				if i%7 != 0 || !utf8.ValidString(text) {
					continue
				}
				d := tok.NewStreamDecoder()
				var sb strings.Builder
				for _, id := range tok.Encode(text, tokenizer.EncodeOptions{}) {
					chunk := d.Add(id)
					require.True(t, utf8.ValidString(chunk), "text %d: chunk %q", i, chunk)
					sb.WriteString(chunk)
				}
				sb.WriteString(d.Flush())
				require.Equal(t, text, sb.String(), "text %d", i)
			}
		})
	}
}

func TestStreamDecoderHoldsPartialCharacters(t *testing.T) {
	tok := o200k(t)
	// U+1F916 as its four byte tokens.
	var ids []int32
	for _, b := range []byte("🤖") {
		id, ok := tok.TokenID(tokenizer.ByteLevelEncode([]byte{b}))
		require.True(t, ok)
		ids = append(ids, id)
	}
	d := tok.NewStreamDecoder()
	assert.Equal(t, "", d.Add(ids[0]))
	assert.Equal(t, "", d.Add(ids[1]))
	assert.Equal(t, "", d.Add(ids[2]))
	assert.Equal(t, "🤖", d.Add(ids[3]))
	// An unfinished character is U+FFFD on Flush; an impossible byte at once.
	d.Add(ids[0])
	assert.Equal(t, "\uFFFD", d.Flush())
	assert.Equal(t, "\uFFFDa", d.Add(ids[3])+d.Add(tok.Encode("a", tokenizer.EncodeOptions{})[0]))
}

func TestSpecialTokens(t *testing.T) {
	tok := o200k(t)
	start, ok := tok.TokenID("<|start|>")
	require.True(t, ok)
	assert.Equal(t, int32(200006), start)
	assert.True(t, tok.IsSpecial(start))
	assert.False(t, tok.IsSpecial(tok.Encode("hi", tokenizer.EncodeOptions{})[0]))

	plain := tok.Encode("<|start|>user", tokenizer.EncodeOptions{})
	assert.NotContains(t, plain, start)
	parsed := tok.Encode("<|start|>user<|message|>hi<|end|><|start|>", tokenizer.EncodeOptions{ParseSpecial: true})
	assert.Equal(t, start, parsed[0])
	assert.Equal(t, start, parsed[len(parsed)-1])
	assert.Equal(t, "<|start|>user<|message|>hi<|end|><|start|>", tok.Decode(parsed))
	// Text that only looks like a special token stays text.
	assert.Equal(t, "<|star|>", tok.Decode(tok.Encode("<|star|>", tokenizer.EncodeOptions{ParseSpecial: true})))

	eog := tok.EndOfGeneration()
	for _, s := range []string{"<|return|>", "<|call|>"} {
		id, _ := tok.TokenID(s)
		assert.Contains(t, eog, id, s)
	}
	end, _ := tok.TokenID("<|end|>")
	assert.NotContains(t, eog, end)
	assert.Equal(t, 201088, tok.VocabSize())
	assert.Equal(t, "gpt-4o", tok.PreTokenizer())
}

func TestUserDefinedAndLongestFirst(t *testing.T) {
	toks := []string{}
	for b := 0; b < 256; b++ {
		toks = append(toks, tokenizer.ByteLevelEncode([]byte{byte(b)}))
	}
	toks = append(toks, "<tool>", "<tool_call>", "<|ctl|>")
	types := make([]tokenizer.TokenType, len(toks))
	for i := range types {
		types[i] = tokenizer.TypeNormal
	}
	types[256], types[257], types[258] = tokenizer.TypeUserDefined, tokenizer.TypeUserDefined, tokenizer.TypeControl
	tok, err := tokenizer.New(tokenizer.Vocab{Model: "gpt2", Pre: "gpt-2", Tokens: toks, Types: types, Merges: []string{},
		BOS: -1, EOS: -1, EOT: -1, EOM: -1, UNK: -1, PAD: -1})
	require.NoError(t, err)
	// User-defined tokens are always split out, longest match first;
	// control tokens only with ParseSpecial.
	assert.Equal(t, []int32{257, 'x', 256}, tok.Encode("<tool_call>x<tool>", tokenizer.EncodeOptions{}))
	assert.NotContains(t, tok.Encode("<|ctl|>", tokenizer.EncodeOptions{}), int32(258))
	assert.Equal(t, []int32{258}, tok.Encode("<|ctl|>", tokenizer.EncodeOptions{ParseSpecial: true}))
}

func TestAddSpecial(t *testing.T) {
	l3 := llama3(t)
	ids := l3.Encode("Hello", tokenizer.EncodeOptions{AddSpecial: true})
	assert.Equal(t, []int32{128000, 9906}, ids)
	assert.Equal(t, []int32{9906}, l3.Encode("Hello", tokenizer.EncodeOptions{}))
	assert.Contains(t, l3.EndOfGeneration(), int32(128009))
	assert.Contains(t, l3.EndOfGeneration(), int32(128008))

	l2 := llama2(t)
	assert.Equal(t, []int32{1, 15043, 3186}, l2.Encode("Hello world", tokenizer.EncodeOptions{AddSpecial: true}))
	// The space prefix added on encode is removed on decode.
	assert.Equal(t, "Hello world", l2.Decode(l2.Encode("Hello world", tokenizer.EncodeOptions{})))
	assert.Equal(t, "<s>Hello", l2.Decode([]int32{1, 15043}))
	// After a special token, llama.cpp adds the space prefix again.
	ids = l2.Encode("<s>Hello", tokenizer.EncodeOptions{ParseSpecial: true})
	assert.Equal(t, []int32{1, 15043}, ids)
	assert.Equal(t, "llama", l2.Model())
}

func TestNewErrors(t *testing.T) {
	base := func() tokenizer.Vocab {
		toks := []string{}
		for b := 0; b < 256; b++ {
			toks = append(toks, tokenizer.ByteLevelEncode([]byte{byte(b)}))
		}
		return tokenizer.Vocab{Model: "gpt2", Tokens: toks, BOS: -1, EOS: -1, EOT: -1, EOM: -1, UNK: -1, PAD: -1}
	}
	for name, mut := range map[string]func(*tokenizer.Vocab){
		"empty":       func(v *tokenizer.Vocab) { v.Tokens = nil },
		"model":       func(v *tokenizer.Vocab) { v.Model = "wordpiece" },
		"types":       func(v *tokenizer.Vocab) { v.Types = []tokenizer.TokenType{1} },
		"scores":      func(v *tokenizer.Vocab) { v.Scores = []float32{1} },
		"bos":         func(v *tokenizer.Vocab) { v.BOS = 9999 },
		"merge":       func(v *tokenizer.Vocab) { v.Merges = []string{"ab"} },
		"missingbyte": func(v *tokenizer.Vocab) { v.Tokens = v.Tokens[:100] },
		"spm-scores":  func(v *tokenizer.Vocab) { v.Model = "llama" },
		"spm-byte": func(v *tokenizer.Vocab) {
			v.Model = "llama"
			v.Scores = make([]float32, len(v.Tokens))
			v.Types = make([]tokenizer.TokenType, len(v.Tokens))
			v.Types[5] = tokenizer.TypeByte
		},
	} {
		v := base()
		mut(&v)
		_, err := tokenizer.New(v)
		assert.ErrorIs(t, err, tokenizer.ErrInvalidVocab, name)
	}
	tok, err := tokenizer.New(base())
	require.NoError(t, err)
	assert.Equal(t, "", tok.TokenText(-1))
	assert.Equal(t, "", tok.Decode([]int32{-5, 99999}))
	assert.Equal(t, "gpt-2", tok.PreTokenizer())
	v := base()
	v.Pre = "exotic"
	tok, err = tokenizer.New(v)
	require.NoError(t, err)
	assert.Contains(t, tok.PreTokenizer(), "fallback")
}

// TestMergesFromRanks checks that merges written in Hugging Face's order
// (what a GGUF carries) tokenize like the ranks themselves.
func TestMergesFromRanks(t *testing.T) {
	ref := gpt2(t)
	v, err := gpt2Vocab()
	require.NoError(t, err)
	v.Merges = tokenizer.MergesFromRanks(v.Tokens[:50256])
	tok, err := tokenizer.New(v)
	require.NoError(t, err)
	for i, text := range loadCorpus(t) {
		if i%3 != 0 {
			continue
		}
		require.Equal(t, ref.Encode(text, tokenizer.EncodeOptions{}), tok.Encode(text, tokenizer.EncodeOptions{}), "text %d", i)
	}
}

func FuzzRoundTrip(f *testing.F) {
	for _, s := range []string{"Hello world", "日本語 🤖", "  \n\tx", "I'M"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !utf8.ValidString(s) {
			return
		}
		for _, tok := range []*tokenizer.Tokenizer{o200k(t), llama2(t)} {
			if got := tok.Decode(tok.Encode(s, tokenizer.EncodeOptions{})); got != s {
				t.Fatalf("%s: %q -> %q", tok.Model(), s, got)
			}
		}
	})
}

// TestConcurrentEncode shares one tokenizer between goroutines (run with
// -race).
func TestConcurrentEncode(t *testing.T) {
	tok := o200k(t)
	texts := loadCorpus(t)[:200]
	want := make([][]int32, len(texts))
	for i, s := range texts {
		want[i] = tok.Encode(s, tokenizer.EncodeOptions{})
	}
	done := make(chan error, 4)
	for g := 0; g < 4; g++ {
		go func() {
			for i, s := range texts {
				if got := tok.Encode(s, tokenizer.EncodeOptions{}); !equal(got, want[i]) {
					done <- assert.AnError
					return
				}
				_ = tok.Decode(want[i])
			}
			done <- nil
		}()
	}
	for g := 0; g < 4; g++ {
		require.NoError(t, <-done)
	}
}
