//go:build hftokenizers

package hfrust

import (
	"errors"
	"fmt"
	"math"

	"github.com/daulet/tokenizers"
)

// Tokenizer wraps one Rust tokenizer. Close it when done; it is not safe to
// use after Close.
type Tokenizer struct {
	tk *tokenizers.Tokenizer
}

// FromFile loads a Hugging Face tokenizer.json.
func FromFile(path string) (*Tokenizer, error) {
	tk, err := tokenizers.FromFile(path)
	if err != nil {
		return nil, fmt.Errorf("hfrust: %s: %w", path, err)
	}
	return &Tokenizer{tk: tk}, nil
}

// FromBytes loads a tokenizer.json held in memory.
func FromBytes(data []byte) (*Tokenizer, error) {
	if len(data) == 0 {
		return nil, errors.New("hfrust: empty tokenizer.json")
	}
	tk, err := tokenizers.FromBytes(data)
	if err != nil {
		return nil, fmt.Errorf("hfrust: %w", err)
	}
	return &Tokenizer{tk: tk}, nil
}

// Encode returns the token ids of text; addSpecial adds the post-processor's
// tokens (BOS for Llama 3). Added/special tokens in the text are always
// matched, as Hugging Face does.
func (t *Tokenizer) Encode(text string, addSpecial bool) []int32 {
	ids, _ := t.tk.Encode(text, addSpecial)
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out
}

// Decode turns ids back into text; skipSpecial drops special tokens. An id
// that is negative or does not fit 32 bits is an error.
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	u := make([]uint32, len(ids))
	for i, id := range ids {
		if id < 0 || int64(id) > math.MaxUint32 {
			return "", fmt.Errorf("hfrust: token id %d at %d out of range", id, i)
		}
		u[i] = uint32(id)
	}
	return t.tk.Decode(u, skipSpecial), nil
}

// VocabSize is the number of tokens including added tokens.
func (t *Tokenizer) VocabSize() int { return int(t.tk.VocabSize()) }

// Close frees the Rust tokenizer.
func (t *Tokenizer) Close() error { return t.tk.Close() }
