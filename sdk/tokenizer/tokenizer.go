// Package tokenizer turns text into token ids and back for the vocabularies
// GGUF files carry: byte-level BPE (tokenizer.ggml.model = "gpt2", used by
// gpt-oss/o200k, Llama 3 and GPT-2) with the pre-tokenizer named by
// tokenizer.ggml.pre, and SentencePiece BPE (model "llama", Llama 2) with
// score-ordered merges and byte fallback.
//
// The pre-tokenizers are hand-written splitters that reproduce the regular
// expressions of tiktoken / Hugging Face tokenizers exactly (Go's regexp has
// no lookahead); a test checks them against github.com/dlclark/regexp2 and
// committed goldens produced by the reference implementations
// (testdata/gen). They are hand-written because they are several times faster
// than a backtracking regexp engine, and speed matters here.
//
// Special (control) tokens are split out of the text only when the caller asks
// (EncodeOptions.ParseSpecial); user text never turns into control tokens.
// User-defined tokens (GGUF type 4, non-special added tokens) are always
// split out, as llama.cpp and Hugging Face do.
//
// Sources: FromGGUF/Open (tokenizer.ggml.* metadata), OpenHF/VocabFromHF
// (Hugging Face tokenizer.json, for models whose GGUF lacks a tokenizer),
// New (a Vocab built by hand; sdk/tokenizer/tiktoken has o200k_harmony and
// GPT-2 offline). Conformance: testdata/README.md.
package tokenizer

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// TokenType is the GGUF token type (tokenizer.ggml.token_type).
type TokenType int32

// Token types as llama.cpp writes them.
const (
	TypeUndefined   TokenType = 0
	TypeNormal      TokenType = 1
	TypeUnknown     TokenType = 2
	TypeControl     TokenType = 3
	TypeUserDefined TokenType = 4
	TypeUnused      TokenType = 5
	TypeByte        TokenType = 6
)

// ErrInvalidVocab reports a vocabulary that cannot be used.
var ErrInvalidVocab = errors.New("invalid tokenizer vocabulary")

// Vocab is everything a tokenizer needs, as GGUF metadata holds it. Ids that
// are absent are -1.
type Vocab struct {
	Model  string // "gpt2" (byte-level BPE) or "llama" (SentencePiece)
	Pre    string // tokenizer.ggml.pre: "gpt-4o", "llama-bpe", "gpt-2", "default", ...
	Tokens []string
	Types  []TokenType // optional; default normal (specials detected from <|...|> when absent)
	Scores []float32   // SentencePiece merge scores
	// Merges are "left right" in the token text form (byte-level mapped for
	// gpt2). When nil for a gpt2 vocabulary, merges are derived from the token
	// order (tiktoken ranks), see MergesFromRanks.
	Merges []string

	BOS, EOS, EOT, EOM, UNK, PAD int32
	AddBOS, AddEOS               bool
	// AddSpacePrefix (SentencePiece) prepends a space to the text; llama.cpp's
	// default is true.
	AddSpacePrefix bool
	ChatTemplate   string
}

// NoToken marks an absent special id in Vocab.
const NoToken int32 = -1

// EncodeOptions controls Encode.
type EncodeOptions struct {
	// AddSpecial adds BOS/EOS as the model's metadata says (add_bos_token,
	// add_eos_token).
	AddSpecial bool
	// ParseSpecial turns special-token text (e.g. "<|start|>") into the
	// token; otherwise it is tokenized as plain text. Use it for rendered
	// prompt templates, never for user text.
	ParseSpecial bool
}

// Tokenizer encodes and decodes text. It is safe for concurrent use.
type Tokenizer struct {
	v      Vocab
	kind   string // "bpe" or "spm"
	pre    preKind
	preSrc string

	text     []string // token texts as in the vocabulary
	types    []TokenType
	bytes    [][]byte // decoded bytes of each token (specials: their text)
	index    map[string]int32
	eog      []int32
	special  *specialSet
	bpe      *bpeModel
	spm      *spmModel
	bos, eos int32
}

// New builds a tokenizer from a vocabulary.
func New(v Vocab) (*Tokenizer, error) {
	n := len(v.Tokens)
	if n == 0 {
		return nil, fmt.Errorf("%w: no tokens", ErrInvalidVocab)
	}
	if v.Types != nil && len(v.Types) != n {
		return nil, fmt.Errorf("%w: %d token types for %d tokens", ErrInvalidVocab, len(v.Types), n)
	}
	if v.Scores != nil && len(v.Scores) != n {
		return nil, fmt.Errorf("%w: %d scores for %d tokens", ErrInvalidVocab, len(v.Scores), n)
	}
	for _, p := range []struct {
		name string
		id   int32
	}{{"bos", v.BOS}, {"eos", v.EOS}, {"eot", v.EOT}, {"eom", v.EOM}, {"unknown", v.UNK}, {"padding", v.PAD}} {
		if p.id < -1 || int(p.id) >= n {
			return nil, fmt.Errorf("%w: %s token id %d out of range [0,%d)", ErrInvalidVocab, p.name, p.id, n)
		}
	}
	t := &Tokenizer{v: v, text: v.Tokens, index: make(map[string]int32, n), bos: v.BOS, eos: v.EOS}
	t.types = v.Types
	if t.types == nil {
		t.types = make([]TokenType, n)
		for i, s := range v.Tokens {
			t.types[i] = TypeNormal
			if len(s) > 4 && strings.HasPrefix(s, "<|") && strings.HasSuffix(s, "|>") {
				t.types[i] = TypeControl
			}
		}
	}
	for i, s := range v.Tokens {
		if _, dup := t.index[s]; !dup {
			t.index[s] = int32(i)
		}
	}
	var err error
	switch v.Model {
	case "gpt2":
		t.kind = "bpe"
		t.pre, t.preSrc = preFor(v.Pre)
		t.bpe, err = newBPE(t)
	case "llama":
		t.kind = "spm"
		t.spm, err = newSPM(t)
	default:
		return nil, fmt.Errorf("%w: unsupported tokenizer model %q (want gpt2 or llama)", ErrInvalidVocab, v.Model)
	}
	if err != nil {
		return nil, err
	}
	t.special = newSpecialSet(t)
	t.eog = t.endOfGeneration()
	return t, nil
}

// Model reports the tokenizer model ("gpt2" or "llama").
func (t *Tokenizer) Model() string { return t.v.Model }

// PreTokenizer reports the pre-tokenizer in use; it differs from the
// metadata's tokenizer.ggml.pre when that name was unknown and the GPT-2
// splitter stands in.
func (t *Tokenizer) PreTokenizer() string { return t.preSrc }

// VocabSize is the number of tokens.
func (t *Tokenizer) VocabSize() int { return len(t.text) }

// TokenText is the vocabulary text of id ("" when out of range).
func (t *Tokenizer) TokenText(id int32) string {
	if id < 0 || int(id) >= len(t.text) {
		return ""
	}
	return t.text[id]
}

// TokenID looks a token up by its exact vocabulary text.
func (t *Tokenizer) TokenID(text string) (int32, bool) {
	id, ok := t.index[text]
	return id, ok
}

// TokenType is the type of id (TypeUndefined when out of range).
func (t *Tokenizer) TokenType(id int32) TokenType {
	if id < 0 || int(id) >= len(t.types) {
		return TypeUndefined
	}
	return t.types[id]
}

// IsSpecial reports whether id is a control, unknown or unused token.
func (t *Tokenizer) IsSpecial(id int32) bool {
	switch t.TokenType(id) {
	case TypeControl, TypeUnknown, TypeUnused:
		return true
	}
	return false
}

// BOS is the beginning-of-sequence token.
func (t *Tokenizer) BOS() (int32, bool) { return t.bos, t.bos >= 0 }

// EOS is the end-of-sequence token.
func (t *Tokenizer) EOS() (int32, bool) { return t.eos, t.eos >= 0 }

// AddBOS reports tokenizer.ggml.add_bos_token.
func (t *Tokenizer) AddBOS() bool { return t.v.AddBOS }

// ChatTemplate is tokenizer.chat_template ("" when absent).
func (t *Tokenizer) ChatTemplate() string { return t.v.ChatTemplate }

// EndOfGeneration lists the ids that end a generation: EOS, EOT, EOM and,
// where the vocabulary has them, the harmony stop tokens <|return|> and
// <|call|> and Llama 3's <|eot_id|> and <|eom_id|>.
func (t *Tokenizer) EndOfGeneration() []int32 { return append([]int32(nil), t.eog...) }

func (t *Tokenizer) endOfGeneration() []int32 {
	seen := map[int32]bool{}
	var out []int32
	add := func(id int32) {
		if id >= 0 && int(id) < len(t.text) && !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	add(t.v.EOS)
	add(t.v.EOT)
	add(t.v.EOM)
	for _, s := range []string{"<|return|>", "<|call|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>"} {
		if id, ok := t.index[s]; ok && t.IsSpecial(id) {
			if s == "<|endoftext|>" && len(out) > 0 {
				continue // only a fallback when nothing else ends generation
			}
			add(id)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Encode turns text into token ids.
func (t *Tokenizer) Encode(text string, o EncodeOptions) []int32 {
	out := make([]int32, 0, len(text)/3+2)
	if o.AddSpecial && t.v.AddBOS && t.bos >= 0 {
		out = append(out, t.bos)
	}
	afterSpecial := true
	t.special.split(text, o.ParseSpecial, func(frag string, id int32) {
		if id >= 0 {
			out = append(out, id)
			afterSpecial = true
			return
		}
		if t.kind == "bpe" {
			out = t.bpe.encode(out, frag)
		} else {
			out = t.spm.encode(out, frag, afterSpecial)
		}
		afterSpecial = false
	})
	if o.AddSpecial && t.v.AddEOS && t.eos >= 0 {
		out = append(out, t.eos)
	}
	return out
}

// Decode turns ids into text. Special tokens are rendered as their text;
// ids out of range are skipped. The result may hold invalid UTF-8 when the
// ids end inside a character.
func (t *Tokenizer) Decode(ids []int32) string {
	var b []byte
	first := true
	for _, id := range ids {
		b, first = t.appendToken(b, id, first)
	}
	return string(b)
}

// appendToken appends the bytes of id. first tracks the SentencePiece
// leading-space rule: the space prefix added on encode is removed from the
// first text token.
func (t *Tokenizer) appendToken(b []byte, id int32, first bool) ([]byte, bool) {
	if id < 0 || int(id) >= len(t.bytes) {
		return b, first
	}
	tb := t.bytes[id]
	if t.kind == "spm" && first && t.v.AddSpacePrefix {
		switch t.types[id] {
		case TypeNormal, TypeUserDefined, TypeByte:
			first = false
			if len(tb) > 0 && tb[0] == ' ' && t.types[id] == TypeNormal {
				tb = tb[1:]
			}
		}
	}
	return append(b, tb...), first
}
