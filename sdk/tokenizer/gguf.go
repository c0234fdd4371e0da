package tokenizer

import (
	"fmt"

	"github.com/llama-orch/orch/sdk/gguf"
)

// VocabFromGGUF reads the tokenizer.ggml.* metadata of a GGUF file.
func VocabFromGGUF(f *gguf.File) (Vocab, error) {
	v := Vocab{BOS: NoToken, EOS: NoToken, EOT: NoToken, EOM: NoToken, UNK: NoToken, PAD: NoToken}
	var ok bool
	if v.Model, ok = f.String("tokenizer.ggml.model"); !ok {
		return v, fmt.Errorf("%w: GGUF has no tokenizer.ggml.model", ErrInvalidVocab)
	}
	v.Pre, _ = f.String("tokenizer.ggml.pre")
	if v.Tokens, ok = f.Strings("tokenizer.ggml.tokens"); !ok {
		return v, fmt.Errorf("%w: GGUF has no tokenizer.ggml.tokens", ErrInvalidVocab)
	}
	if types, ok := f.Ints("tokenizer.ggml.token_type"); ok {
		v.Types = make([]TokenType, len(types))
		for i, t := range types {
			v.Types[i] = TokenType(t)
		}
	}
	v.Scores, _ = f.Floats("tokenizer.ggml.scores")
	v.Merges, _ = f.Strings("tokenizer.ggml.merges")
	if v.Model == "gpt2" && v.Merges == nil {
		return v, fmt.Errorf("%w: byte-level BPE GGUF without tokenizer.ggml.merges", ErrInvalidVocab)
	}
	for key, dst := range map[string]*int32{
		"tokenizer.ggml.bos_token_id":     &v.BOS,
		"tokenizer.ggml.eos_token_id":     &v.EOS,
		"tokenizer.ggml.eot_token_id":     &v.EOT,
		"tokenizer.ggml.eom_token_id":     &v.EOM,
		"tokenizer.ggml.unknown_token_id": &v.UNK,
		"tokenizer.ggml.padding_token_id": &v.PAD,
	} {
		if id, ok := f.Uint(key); ok {
			if id >= uint64(len(v.Tokens)) {
				return v, fmt.Errorf("%w: %s = %d, vocabulary has %d tokens", ErrInvalidVocab, key, id, len(v.Tokens))
			}
			*dst = int32(id)
		}
	}
	// llama.cpp's defaults: SentencePiece adds BOS and a space prefix,
	// byte-level BPE adds neither unless the metadata says so.
	v.AddBOS = v.Model == "llama"
	v.AddSpacePrefix = v.Model == "llama"
	if b, ok := f.Bool("tokenizer.ggml.add_bos_token"); ok {
		v.AddBOS = b
	}
	if b, ok := f.Bool("tokenizer.ggml.add_eos_token"); ok {
		v.AddEOS = b
	}
	if b, ok := f.Bool("tokenizer.ggml.add_space_prefix"); ok {
		v.AddSpacePrefix = b
	}
	v.ChatTemplate, _ = f.String("tokenizer.chat_template")
	return v, nil
}

// FromGGUF builds the tokenizer a GGUF file describes.
func FromGGUF(f *gguf.File) (*Tokenizer, error) {
	v, err := VocabFromGGUF(f)
	if err != nil {
		return nil, err
	}
	return New(v)
}

// Open opens a GGUF file and builds its tokenizer.
func Open(path string) (*Tokenizer, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t, err := FromGGUF(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}
