package synth

import (
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"unicode"

	sdktok "github.com/llama-orch/orch/sdk/tokenizer"
	"github.com/llama-orch/orch/sdk/tokenizer/tiktoken"
)

// llama.cpp token types (enum llama_token_type).
const (
	TokenNormal      int32 = 1
	TokenUnknown     int32 = 2
	TokenControl     int32 = 3
	TokenUserDefined int32 = 4
	TokenUnused      int32 = 5
	TokenByte        int32 = 6
)

// tokenizer is the tokenizer part of a model file.
type tokenizer struct {
	model, pre   string
	tokens       []string
	types        []int32
	merges       []string  // BPE only
	scores       []float32 // SentencePiece only
	bos, eos     int
	pad, unk     int // -1 = absent
	addBOS       bool
	chatTemplate string
}

func (t *tokenizer) metadata() []KeyValue {
	kv := []KeyValue{
		{"tokenizer.ggml.model", t.model},
	}
	if t.pre != "" {
		kv = append(kv, KeyValue{"tokenizer.ggml.pre", t.pre})
	}
	kv = append(kv,
		KeyValue{"tokenizer.ggml.tokens", t.tokens},
		KeyValue{"tokenizer.ggml.token_type", t.types},
	)
	if t.scores != nil {
		kv = append(kv, KeyValue{"tokenizer.ggml.scores", t.scores})
	}
	if t.merges != nil {
		kv = append(kv, KeyValue{"tokenizer.ggml.merges", t.merges})
	}
	kv = append(kv,
		KeyValue{"tokenizer.ggml.bos_token_id", uint32(t.bos)},
		KeyValue{"tokenizer.ggml.eos_token_id", uint32(t.eos)},
	)
	if t.unk >= 0 {
		kv = append(kv, KeyValue{"tokenizer.ggml.unknown_token_id", uint32(t.unk)})
	}
	if t.pad >= 0 {
		kv = append(kv, KeyValue{"tokenizer.ggml.padding_token_id", uint32(t.pad)})
	}
	kv = append(kv, KeyValue{"tokenizer.ggml.add_bos_token", t.addBOS}, KeyValue{"tokenizer.ggml.add_eos_token", false})
	if t.chatTemplate != "" {
		kv = append(kv, KeyValue{"tokenizer.chat_template", t.chatTemplate})
	}
	return kv
}

// Chat templates (Jinja, as HF tokenizer_config.json carries them).
const (
	llama3Template = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
	llama2Template = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] | trim + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
	gpt2Template   = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

// Llama 3.1 specials from 128000 (others are <|reserved_special_token_N|>).
var llama3Specials = map[int]string{
	128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
	128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
	128009: "<|eot_id|>", 128010: "<|python_tag|>",
}

func buildTokenizer(c Config) (*tokenizer, error) {
	switch c.Tokenizer {
	case TokTinyBPE:
		tokens, merges := tinyBPE()
		t := &tokenizer{model: "gpt2", merges: merges, pad: -1, unk: -1}
		t.tokens = append([]string(nil), tokens...)
		t.types = make([]int32, len(tokens))
		for i := range t.types {
			t.types[i] = TokenNormal
		}
		special := func(s string) int {
			t.tokens = append(t.tokens, s)
			t.types = append(t.types, TokenControl)
			return len(t.tokens) - 1
		}
		switch c.Arch {
		case ArchGPTOSS:
			t.pre = "gpt-4o"
			t.bos = special("<|startoftext|>")
			t.pad = special("<|endoftext|>")
			t.eos = special("<|return|>")
			for _, s := range []string{"<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"} {
				special(s)
			}
		case ArchGPT2:
			t.pre = "gpt-2"
			t.bos = special("<|endoftext|>")
			t.eos = t.bos
			t.chatTemplate = gpt2Template
		default:
			t.pre = "llama-bpe"
			t.bos = special("<|begin_of_text|>")
			special("<|end_of_text|>")
			special("<|start_header_id|>")
			special("<|end_header_id|>")
			t.eos = special("<|eot_id|>")
			t.addBOS = true
			t.chatTemplate = llama3Template
		}
		return t, nil
	case TokTinySPM:
		tokens, scores, types := tinySPM()
		return &tokenizer{model: "llama", pre: "default", tokens: tokens, scores: scores, types: types,
			bos: 1, eos: 2, unk: 0, pad: -1, addBOS: true, chatTemplate: llama2Template}, nil
	case TokO200kHarmony:
		tokens, types, merges, err := VocabO200kHarmony()
		if err != nil {
			return nil, err
		}
		return &tokenizer{model: "gpt2", pre: "gpt-4o", tokens: tokens, types: types, merges: merges,
			bos: 199998, eos: 200002, pad: 199999, unk: -1}, nil
	case TokR50k:
		tokens, types, merges, err := VocabR50k()
		if err != nil {
			return nil, err
		}
		return &tokenizer{model: "gpt2", pre: "gpt-2", tokens: tokens, types: types, merges: merges,
			bos: 50256, eos: 50256, pad: -1, unk: -1, chatTemplate: gpt2Template}, nil
	case TokLlama3:
		tokens, types, merges, err := VocabLlama3()
		if err != nil {
			return nil, err
		}
		return &tokenizer{model: "gpt2", pre: "llama-bpe", tokens: tokens, types: types, merges: merges,
			bos: 128000, eos: 128009, pad: -1, unk: -1, addBOS: true, chatTemplate: llama3Template}, nil
	}
	return nil, fmt.Errorf("synth: unknown tokenizer %q", c.Tokenizer)
}

// byteOrder lists bytes in the order GPT-2's vocabulary numbers them:
// printable ones (those GPT-2's byte-to-unicode table maps to themselves)
// first, then the rest.
var byteOrder = func() []byte {
	var printable, other []byte
	for b := 0; b < 256; b++ {
		if sdktok.ByteLevelEncode([]byte{byte(b)}) == string(rune(b)) {
			printable = append(printable, byte(b))
		} else {
			other = append(other, byte(b))
		}
	}
	return append(printable, other...)
}()

// pretokenize splits text GPT-2 style: optional leading space + letters,
// optional space + digits, optional space + other symbols, runs of space.
func pretokenize(text string) []string {
	var out []string
	rs := []rune(text)
	class := func(r rune) int {
		switch {
		case unicode.IsLetter(r):
			return 1
		case unicode.IsDigit(r):
			return 2
		case unicode.IsSpace(r):
			return 3
		}
		return 4
	}
	for i := 0; i < len(rs); {
		j := i
		if rs[j] == ' ' && j+1 < len(rs) && class(rs[j+1]) != 3 {
			j++
		}
		k := class(rs[j])
		for j < len(rs) && class(rs[j]) == k {
			j++
		}
		out = append(out, string(rs[i:j]))
		i = j
	}
	return out
}

var tinyOnce struct {
	sync.Once
	tokens []string
	merges []string
	spmTok []string
	spmSc  []float32
	spmTy  []int32
}

// learn runs BPE over the corpus words split into initial symbols by split.
func learn(words []string, split func(string) []string, n int) [][2]string {
	freq := map[string]int{}
	for _, w := range words {
		freq[w]++
	}
	keys := make([]string, 0, len(freq))
	for k := range freq {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	syms := make([][]string, len(keys))
	for i, k := range keys {
		syms[i] = split(k)
	}
	var merges [][2]string
	for len(merges) < n {
		pairs := map[[2]string]int{}
		for i, s := range syms {
			for j := 0; j+1 < len(s); j++ {
				pairs[[2]string{s[j], s[j+1]}] += freq[keys[i]]
			}
		}
		var best [2]string
		bestN := 0
		for p, c := range pairs {
			if c > bestN || (c == bestN && (p[0] < best[0] || (p[0] == best[0] && p[1] < best[1]))) {
				best, bestN = p, c
			}
		}
		if bestN < 2 {
			break
		}
		merges = append(merges, best)
		joined := best[0] + best[1]
		for i, s := range syms {
			out := s[:0:0]
			for j := 0; j < len(s); j++ {
				if j+1 < len(s) && s[j] == best[0] && s[j+1] == best[1] {
					out = append(out, joined)
					j++
				} else {
					out = append(out, s[j])
				}
			}
			syms[i] = out
		}
	}
	return merges
}

const tinyMerges = 300

// tinyBPE returns the tiny byte-level vocabulary: 256 byte tokens in GPT-2
// order, then one token per learned merge; and the merges ("a b").
func tinyBPE() (tokens, merges []string) {
	tinyOnce.Do(buildTiny)
	return tinyOnce.tokens, tinyOnce.merges
}

// TinyBPE returns the byte-level vocabulary and merges that tiny presets use
// (without special tokens).
func TinyBPE() (tokens, merges []string) {
	t, m := tinyBPE()
	return append([]string(nil), t...), append([]string(nil), m...)
}

func tinySPM() ([]string, []float32, []int32) {
	tinyOnce.Do(buildTiny)
	return tinyOnce.spmTok, tinyOnce.spmSc, tinyOnce.spmTy
}

func buildTiny() {
	words := pretokenize(corpus)
	// byte-level BPE
	enc := make([]string, len(words))
	for i, w := range words {
		enc[i] = sdktok.ByteLevelEncode([]byte(w))
	}
	splitRunes := func(s string) []string {
		var out []string
		for _, r := range s {
			out = append(out, string(r))
		}
		return out
	}
	ms := learn(enc, splitRunes, tinyMerges)
	for _, b := range byteOrder {
		tinyOnce.tokens = append(tinyOnce.tokens, sdktok.ByteLevelEncode([]byte{b}))
	}
	for _, m := range ms {
		tinyOnce.merges = append(tinyOnce.merges, m[0]+" "+m[1])
		tinyOnce.tokens = append(tinyOnce.tokens, m[0]+m[1])
	}
	// SentencePiece: words with spaces as ▁ (and a leading ▁, the dummy prefix)
	var spWords []string
	for _, w := range strings.Fields(corpus) {
		spWords = append(spWords, "▁"+w)
	}
	chars := map[string]bool{}
	for _, w := range spWords {
		for _, r := range w {
			chars[string(r)] = true
		}
	}
	charList := make([]string, 0, len(chars))
	for ch := range chars {
		charList = append(charList, ch)
	}
	sort.Strings(charList)
	sms := learn(spWords, splitRunes, tinyMerges)
	tok := []string{"<unk>", "<s>", "</s>"}
	ty := []int32{TokenUnknown, TokenControl, TokenControl}
	sc := []float32{0, 0, 0}
	for b := 0; b < 256; b++ {
		tok = append(tok, fmt.Sprintf("<0x%02X>", b))
		ty = append(ty, TokenByte)
		sc = append(sc, 0)
	}
	seen := map[string]bool{}
	for i, m := range sms {
		p := m[0] + m[1]
		if seen[p] {
			continue
		}
		seen[p] = true
		tok = append(tok, p)
		ty = append(ty, TokenNormal)
		sc = append(sc, float32(-i))
	}
	for i, ch := range charList {
		if seen[ch] {
			continue
		}
		tok = append(tok, ch)
		ty = append(ty, TokenNormal)
		sc = append(sc, float32(-1000-i))
	}
	tinyOnce.spmTok, tinyOnce.spmSc, tinyOnce.spmTy = tok, sc, ty
}

// mergesFor rebuilds the merges of ranks lo..hi-1.
func mergesFor(byRank [][]byte, ranks map[string]int, lo, hi int) []string {
	var merges []string
	var starts []int // start offsets of the current parts of tok (plus len(tok))
	for r := lo; r < hi; r++ {
		tok := byRank[r]
		if len(tok) < 2 {
			continue
		}
		starts = starts[:0]
		for i := 0; i <= len(tok); i++ {
			starts = append(starts, i)
		}
		for len(starts) > 3 { // more than two parts
			best, bestRank := -1, r
			for i := 0; i+2 < len(starts); i++ {
				pr, ok := ranks[string(tok[starts[i]:starts[i+2]])]
				if ok && pr < bestRank {
					best, bestRank = i, pr
				}
			}
			if best < 0 {
				break
			}
			starts = append(starts[:best+1], starts[best+2:]...)
		}
		if len(starts) == 3 {
			merges = append(merges, sdktok.ByteLevelEncode(tok[:starts[1]])+" "+sdktok.ByteLevelEncode(tok[starts[1]:]))
		}
	}
	return merges
}

// tiktoken vocabularies, built once per process.
var tiktokenCache sync.Map // name -> *tiktokenVocab

type tiktokenVocab struct {
	once   sync.Once
	byRank [][]byte
	merges []string
	err    error
}

func loadTiktoken(name string) ([][]byte, []string, error) {
	v, _ := tiktokenCache.LoadOrStore(name, &tiktokenVocab{})
	tv := v.(*tiktokenVocab)
	tv.once.Do(func() { tv.byRank, tv.merges, tv.err = buildTiktoken(name) })
	return tv.byRank, tv.merges, tv.err
}

// buildTiktoken loads ranks from the embedded .tiktoken file and rebuilds
// BPE merges: for each multi-byte token, run BPE on its bytes with only the
// lower-ranked tokens; the last two parts are the merge (the standard
// tiktoken -> HF conversion).
func buildTiktoken(name string) ([][]byte, []string, error) {
	byRank, err := tiktoken.Ranks(name + ".tiktoken")
	if err != nil {
		return nil, nil, fmt.Errorf("synth: load %s: %w", name, err)
	}
	ranks := make(map[string]int, len(byRank))
	for r, tok := range byRank {
		ranks[string(tok)] = r
	}
	// tokens are independent: split the ranks over goroutines, keep rank order
	workers := runtime.GOMAXPROCS(0)
	per := (len(byRank) + workers - 1) / workers
	parts := make([][]string, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		lo, hi := w*per, min(len(byRank), (w+1)*per)
		if lo >= hi {
			continue
		}
		wg.Add(1)
		go func(w, lo, hi int) {
			defer wg.Done()
			parts[w] = mergesFor(byRank, ranks, lo, hi)
		}(w, lo, hi)
	}
	wg.Wait()
	var merges []string
	for _, p := range parts {
		merges = append(merges, p...)
	}
	return byRank, merges, nil
}

func vocabFromRanks(byRank [][]byte, size int, specials map[int32]string, reserved func(int) string) ([]string, []int32) {
	tokens := make([]string, size)
	types := make([]int32, size)
	for i := 0; i < size; i++ {
		switch {
		case specials[int32(i)] != "":
			tokens[i], types[i] = specials[int32(i)], TokenControl
		case i < len(byRank) && byRank[i] != nil:
			tokens[i], types[i] = sdktok.ByteLevelEncode(byRank[i]), TokenNormal
		default:
			tokens[i], types[i] = reserved(i), TokenUnused
		}
	}
	return tokens, types
}

// VocabO200kHarmony returns gpt-oss's vocabulary: o200k_base (ids
// 0..199997) plus the harmony special tokens at their real ids, padded with
// <|reserved_N|> to 201088; and the BPE merges rebuilt from the ranks.
func VocabO200kHarmony() (tokens []string, types []int32, merges []string, err error) {
	byRank, merges, err := loadTiktoken("o200k_base")
	if err != nil {
		return nil, nil, nil, err
	}
	tokens, types = vocabFromRanks(byRank, tiktoken.HarmonyVocabSize, tiktoken.HarmonySpecials, func(i int) string { return fmt.Sprintf("<|reserved_%d|>", i) })
	for i := len(byRank); i < tiktoken.HarmonyVocabSize; i++ { // harmony reserves the whole range as specials
		types[i] = TokenControl
	}
	return tokens, types, merges, nil
}

// VocabR50k returns GPT-2's vocabulary: r50k_base plus <|endoftext|> (50256).
func VocabR50k() (tokens []string, types []int32, merges []string, err error) {
	byRank, merges, err := loadTiktoken("r50k_base")
	if err != nil {
		return nil, nil, nil, err
	}
	tokens, types = vocabFromRanks(byRank, 50257, map[int32]string{50256: "<|endoftext|>"}, func(i int) string { return fmt.Sprintf("<|unused_%d|>", i) })
	return tokens, types, merges, nil
}

// VocabLlama3 returns a Llama-3-shaped vocabulary: cl100k_base (ids
// 0..100255), unused placeholders up to 128000 (Llama 3's extra 28k merges
// are not available offline), then the 256 Llama 3.1 special tokens.
func VocabLlama3() (tokens []string, types []int32, merges []string, err error) {
	byRank, merges, err := loadTiktoken("cl100k_base")
	if err != nil {
		return nil, nil, nil, err
	}
	specials := map[int32]string{}
	r := 0
	for i := 128000; i < 128256; i++ {
		if s, ok := llama3Specials[i]; ok {
			specials[int32(i)] = s
			continue
		}
		specials[int32(i)] = fmt.Sprintf("<|reserved_special_token_%d|>", r)
		r++
	}
	tokens, types = vocabFromRanks(byRank, 128256, specials, func(i int) string { return fmt.Sprintf("<|unused_%d|>", i) })
	return tokens, types, merges, nil
}
