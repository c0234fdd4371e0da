package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Loading Hugging Face tokenizer.json files, for models whose GGUF lacks a
// tokenizer. Supported: BPE models, byte-level (GPT-2, Llama 3, o200k; the
// pre-tokenizer is recognised from its Split regex) and SentencePiece-style
// with Metaspace/byte fallback (Llama 2; tokenizer.json keeps no scores, so
// scores are derived from the merge order, which orders merges the same way).

type hfFile struct {
	AddedTokens []struct {
		ID      int32  `json:"id"`
		Content string `json:"content"`
		Special bool   `json:"special"`
	} `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Decoder       json.RawMessage `json:"decoder"`
	Model         struct {
		Type         string           `json:"type"`
		Vocab        map[string]int32 `json:"vocab"`
		Merges       json.RawMessage  `json:"merges"`
		ByteFallback bool             `json:"byte_fallback"`
		UnkToken     *string          `json:"unk_token"`
	} `json:"model"`
}

type hfConfig struct {
	BOS          json.RawMessage `json:"bos_token"`
	EOS          json.RawMessage `json:"eos_token"`
	PAD          json.RawMessage `json:"pad_token"`
	AddBOS       *bool           `json:"add_bos_token"`
	AddEOS       *bool           `json:"add_eos_token"`
	ChatTemplate json.RawMessage `json:"chat_template"`
}

// tokenName reads "x" or {"content": "x"}.
func tokenName(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var o struct{ Content string }
	if json.Unmarshal(raw, &o) == nil {
		return o.Content
	}
	return ""
}

// VocabFromHF builds a Vocab from the bytes of a tokenizer.json and, when
// not nil, its tokenizer_config.json (BOS/EOS, add_bos_token, chat_template).
func VocabFromHF(tokenizerJSON, configJSON []byte) (Vocab, error) {
	v := Vocab{BOS: NoToken, EOS: NoToken, EOT: NoToken, EOM: NoToken, UNK: NoToken, PAD: NoToken}
	var f hfFile
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return v, fmt.Errorf("%w: tokenizer.json: %w", ErrInvalidVocab, err)
	}
	if f.Model.Type != "BPE" {
		return v, fmt.Errorf("%w: tokenizer.json model %q (only BPE is supported)", ErrInvalidVocab, f.Model.Type)
	}
	n := 0
	for _, id := range f.Model.Vocab {
		if int(id) >= n {
			n = int(id) + 1
		}
	}
	for _, a := range f.AddedTokens {
		if int(a.ID) >= n {
			n = int(a.ID) + 1
		}
	}
	if n == 0 || n > 1<<24 {
		return v, fmt.Errorf("%w: tokenizer.json has %d tokens", ErrInvalidVocab, n)
	}
	v.Tokens = make([]string, n)
	v.Types = make([]TokenType, n)
	for s, id := range f.Model.Vocab {
		if id < 0 {
			return v, fmt.Errorf("%w: negative id for %q", ErrInvalidVocab, s)
		}
		v.Tokens[id] = s
		v.Types[id] = TypeNormal
	}
	for _, a := range f.AddedTokens {
		if a.ID < 0 {
			return v, fmt.Errorf("%w: negative id for %q", ErrInvalidVocab, a.Content)
		}
		v.Tokens[a.ID] = a.Content
		v.Types[a.ID] = TypeUserDefined
		if a.Special {
			v.Types[a.ID] = TypeControl
		}
	}
	for i, ty := range v.Types {
		if ty == TypeUndefined {
			v.Tokens[i] = fmt.Sprintf("[PAD%d]", i)
			v.Types[i] = TypeUnused
		}
	}
	merges, err := hfMerges(f.Model.Merges)
	if err != nil {
		return v, err
	}
	v.Merges = merges

	pre := string(f.PreTokenizer)
	metaspace := strings.Contains(pre, `"Metaspace"`) || strings.Contains(string(f.Normalizer), "\u2581") ||
		strings.Contains(string(f.Decoder), `"ByteFallback"`)
	switch {
	case strings.Contains(pre, `"ByteLevel"`) || strings.Contains(string(f.Decoder), `"ByteLevel"`):
		v.Model = "gpt2"
		v.Pre = hfPre(f.PreTokenizer)
	case metaspace:
		v.Model = "llama"
		v.AddSpacePrefix = strings.Contains(string(f.Normalizer), "Prepend") || strings.Contains(pre, `"prepend_scheme":"always"`) ||
			strings.Contains(pre, `"add_prefix_space":true`)
		v.Scores = make([]float32, n)
		for i := range v.Scores {
			v.Scores[i] = -1e9
			if s := v.Tokens[i]; len(s) == 6 && strings.HasPrefix(s, "<0x") && strings.HasSuffix(s, ">") {
				v.Types[i] = TypeByte
			}
		}
		index := make(map[string]int, n)
		for i, s := range v.Tokens {
			index[s] = i
		}
		seen := make([]bool, n)
		for r, m := range merges {
			if id, ok := index[strings.Replace(m, " ", "", 1)]; ok && !seen[id] {
				seen[id] = true
				v.Scores[id] = -float32(r)
			}
		}
		v.Merges = nil
	default:
		return v, fmt.Errorf("%w: tokenizer.json is neither byte-level nor SentencePiece-style BPE", ErrInvalidVocab)
	}
	if f.Model.UnkToken != nil {
		for i, s := range v.Tokens {
			if s == *f.Model.UnkToken {
				v.UNK = int32(i)
				v.Types[i] = TypeUnknown
				break
			}
		}
	}
	// BOS from the post-processor's single template, e.g. Llama 2's "<s> $A".
	var pp struct {
		Type   string `json:"type"`
		Single []struct {
			SpecialToken *struct{ ID string } `json:"SpecialToken"`
		} `json:"single"`
	}
	if json.Unmarshal(f.PostProcessor, &pp) == nil && pp.Type == "TemplateProcessing" && len(pp.Single) > 0 && pp.Single[0].SpecialToken != nil {
		v.AddBOS = true
		if id, ok := lookup(v.Tokens, pp.Single[0].SpecialToken.ID); ok {
			v.BOS = id
		}
	}
	if configJSON != nil {
		var c hfConfig
		if err := json.Unmarshal(configJSON, &c); err != nil {
			return v, fmt.Errorf("%w: tokenizer_config.json: %w", ErrInvalidVocab, err)
		}
		for _, p := range []struct {
			raw json.RawMessage
			dst *int32
		}{{c.BOS, &v.BOS}, {c.EOS, &v.EOS}, {c.PAD, &v.PAD}} {
			if id, ok := lookup(v.Tokens, tokenName(p.raw)); ok {
				*p.dst = id
			}
		}
		if c.AddBOS != nil {
			v.AddBOS = *c.AddBOS
		}
		if c.AddEOS != nil {
			v.AddEOS = *c.AddEOS
		}
		v.ChatTemplate = hfChatTemplate(c.ChatTemplate)
	}
	return v, nil
}

func lookup(tokens []string, s string) (int32, bool) {
	if s == "" {
		return 0, false
	}
	for i, t := range tokens {
		if t == s {
			return int32(i), true
		}
	}
	return 0, false
}

func hfMerges(raw json.RawMessage) ([]string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return []string{}, nil
	}
	var ss []string
	if json.Unmarshal(raw, &ss) == nil {
		return ss, nil
	}
	var pairs [][]string
	if err := json.Unmarshal(raw, &pairs); err != nil {
		return nil, fmt.Errorf("%w: tokenizer.json merges: %w", ErrInvalidVocab, err)
	}
	out := make([]string, len(pairs))
	for i, p := range pairs {
		if len(p) != 2 {
			return nil, fmt.Errorf("%w: tokenizer.json merge %d has %d parts", ErrInvalidVocab, i, len(p))
		}
		out[i] = p[0] + " " + p[1]
	}
	return out, nil
}

// hfPre names the pre-tokenizer whose regex the tokenizer.json's Split
// uses ("" for plain ByteLevel, i.e. GPT-2's).
func hfPre(raw json.RawMessage) string {
	var walk func(v any) string
	walk = func(v any) string {
		switch x := v.(type) {
		case map[string]any:
			if p, ok := x["pattern"].(map[string]any); ok {
				if re, ok := p["Regex"].(string); ok {
					for k, pat := range prePatterns {
						if pat == re {
							_, name := preFor(map[preKind]string{preGPT2: "gpt-2", preLlama3: "llama-bpe", preO200k: "gpt-4o"}[k])
							return name
						}
					}
					return "unknown regex"
				}
			}
			keys := make([]string, 0, len(x))
			for k := range x {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				if s := walk(x[k]); s != "" {
					return s
				}
			}
		case []any:
			for _, e := range x {
				if s := walk(e); s != "" {
					return s
				}
			}
		}
		return ""
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return ""
	}
	if s := walk(v); s != "" {
		return s
	}
	return "gpt-2"
}

func hfChatTemplate(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var named []struct{ Name, Template string }
	if json.Unmarshal(raw, &named) == nil {
		for _, t := range named {
			if t.Name == "default" {
				return t.Template
			}
		}
		if len(named) > 0 {
			return named[0].Template
		}
	}
	return ""
}

// OpenHF loads a tokenizer.json (and the tokenizer_config.json beside it,
// when there is one).
func OpenHF(path string) (*Tokenizer, error) {
	tj, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer.json: %w", err)
	}
	cj, err := os.ReadFile(filepath.Join(filepath.Dir(path), "tokenizer_config.json"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("tokenizer_config.json: %w", err)
		}
		cj = nil
	}
	v, err := VocabFromHF(tj, cj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return New(v)
}
