// Package synth writes random-weight GGUF models with llama.cpp's exact
// tensor names, shapes, dtypes and metadata for the gpt-oss, gpt2 and llama
// architectures, from tiny test models to full-size benchmark files
// (gpt-oss-20b: MXFP4 experts, Q8_0 attention/embeddings, F32 norms, biases
// and sinks). Every file carries a tokenizer: tiny presets a small byte-level
// BPE (or SentencePiece) vocabulary learned here from an embedded English
// text, small and full presets the real vocabularies of the embedded
// tiktoken files (o200k_base + harmony specials, r50k_base, cl100k_base
// padded to Llama 3's layout).
//
// Weights are deterministic in the seed: each tensor's bytes depend only on
// the seed, the tensor name and its chunk index, so generation runs in
// parallel and still gives the same bytes. Values are drawn uniformly with
// the standard deviations given in Tensors (1/sqrt(fan_in) for matrices,
// norms near 1), which keeps activations finite through all layers and gives
// logits a useful spread.
//
// Tensors documents every tensor per architecture; it is the single source
// of truth for names used by the generator.
//
// Presets (Preset, Sizes; heads are query/KV):
//
//	gpt-oss  tiny          2 layers, d   64,  4/2 heads x  16, 4 experts top-2, window 128, vocab    565, 178 KiB
//	gpt-oss  tiny-swa      same as tiny with sliding window 8
//	gpt-oss  small         4 layers, d   64,  4/2 heads x  64, 8 experts top-4, window 32, vocab 201088, 34.4 MiB
//	gpt-oss  20b          24 layers, d 2880, 64/8 heads x  64, 32 experts top-4, window 128, vocab 201088, 11.27 GiB
//	gpt2     tiny          2 layers, d   64,  4 heads x 16, ff  256, vocab    557, F32, 748 KiB
//	gpt2     small         4 layers, d   64,  2 heads x 32, ff  256, vocab  50257, F16, 14.6 MiB
//	gpt2     124m         12 layers, d  768, 12 heads x 64, ff 3072, vocab  50257, F16, 314 MiB
//	llama    tiny          2 layers, d   64,  4/2 heads x  16, ff   128, vocab    561, Q8_0, rope_freqs, 167 KiB
//	llama    tiny-llama2   2 layers, d   64,  4/4 heads x  16, ff   160, vocab    614 (SentencePiece), F32, 691 KiB
//	llama    small         4 layers, d   64,  4/2 heads x  32, ff   192, vocab 128256, Q8_0, 21 MiB
//	llama    llama3-8b    32 layers, d 4096, 32/8 heads x 128, ff 14336, vocab 128256, Q8_0, 7.95 GiB
//
// The 20b and llama3-8b files have exactly the sizes of llama.cpp's files of
// those models (11.27 GiB MXFP4, 7.95 GiB Q8_0). On the 2-core development
// machine (shared) generation runs at ~750 MB/s for MXFP4 and ~450 MB/s for
// Q8_0 (BenchmarkGenerate*); it scales with cores, so on a 16-core box the
// disk is the limit.
package synth

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/llama-orch/orch/sdk/gguf"
)

// Config is a model's shape, dtypes and tokenizer.
type Config struct {
	Arch    string // gpt-oss, gpt2, llama
	Name    string // general.name
	Layers  int
	Embd    int
	Heads   int
	KVHeads int
	HeadDim int
	FF      int // feed_forward_length (dense FFN; for gpt-oss the same as ExpertFF)
	Context int

	Experts, ExpertsUsed, ExpertFF int // gpt-oss
	SlidingWindow                  int // gpt-oss
	RopeBase                       float32
	YarnFactor                     float32 // gpt-oss: rope.scaling.factor (0 = no scaling keys)
	YarnOrigContext                int
	RopeFreqs                      bool // llama: write rope_freqs.weight (Llama 3.1 scaling)
	NormEps                        float32

	MatType, EmbdType, OutType, ExpertType gguf.Type

	// Tokenizer: TokTinyBPE, TokTinySPM, TokO200kHarmony, TokR50k, TokLlama3.
	Tokenizer string
	// VocabSize is filled from the tokenizer by Plan/Write.
	VocabSize int
}

// Tokenizer kinds.
const (
	TokTinyBPE      = "tiny-bpe"      // byte-level BPE learned from the embedded text
	TokTinySPM      = "tiny-spm"      // SentencePiece (llama 2 style) learned from the embedded text
	TokO200kHarmony = "o200k-harmony" // o200k_base + harmony specials, 201088 ids
	TokR50k         = "r50k"          // GPT-2's r50k_base, 50257 ids
	TokLlama3       = "llama3-cl100k" // cl100k_base padded to 128000 + Llama 3 specials, 128256 ids
)

func (c Config) validate() error {
	switch {
	case c.Layers < 1, c.Embd < 1, c.Heads < 1, c.HeadDim < 1, c.Context < 1:
		return fmt.Errorf("synth: %s: layers, embd, heads, head_dim and context must be positive", c.Arch)
	case c.VocabSize < 1:
		return fmt.Errorf("synth: %s: empty vocabulary", c.Arch)
	}
	switch c.Arch {
	case ArchGPTOSS:
		if c.KVHeads < 1 || c.Heads%c.KVHeads != 0 || c.Experts < 1 || c.ExpertsUsed < 1 || c.ExpertsUsed > c.Experts || c.ExpertFF < 1 {
			return fmt.Errorf("synth: gpt-oss: bad heads/experts (%d/%d heads, %d of %d experts)", c.Heads, c.KVHeads, c.ExpertsUsed, c.Experts)
		}
	case ArchGPT2:
		if c.Heads*c.HeadDim != c.Embd || c.FF < 1 {
			return fmt.Errorf("synth: gpt2: heads*head_dim (%d) must equal embd (%d)", c.Heads*c.HeadDim, c.Embd)
		}
	case ArchLlama:
		if c.KVHeads < 1 || c.Heads%c.KVHeads != 0 || c.FF < 1 || c.HeadDim%2 != 0 {
			return fmt.Errorf("synth: llama: bad heads %d/%d or ff %d", c.Heads, c.KVHeads, c.FF)
		}
	default:
		return fmt.Errorf("synth: unknown architecture %q (want gpt-oss, gpt2 or llama)", c.Arch)
	}
	return nil
}

// presets: arch -> size -> config (VocabSize filled later from the tokenizer).
var presets = map[string]map[string]Config{
	ArchGPTOSS: {
		// tiny: 4 experts top-2, MXFP4 experts, Q8_0 attention, window 128
		// (longer than test prompts: every layer sees everything).
		"tiny": {Arch: ArchGPTOSS, Name: "synth-gpt-oss-tiny", Layers: 2, Embd: 64, Heads: 4, KVHeads: 2, HeadDim: 16,
			FF: 64, ExpertFF: 64, Experts: 4, ExpertsUsed: 2, Context: 4096, SlidingWindow: 128,
			RopeBase: 150000, YarnFactor: 32, YarnOrigContext: 128, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, ExpertType: gguf.TypeMXFP4, Tokenizer: TokTinyBPE},
		// tiny-swa: like tiny with a sliding window of 8 (shorter than test prompts).
		"tiny-swa": {Arch: ArchGPTOSS, Name: "synth-gpt-oss-tiny-swa", Layers: 2, Embd: 64, Heads: 4, KVHeads: 2, HeadDim: 16,
			FF: 64, ExpertFF: 64, Experts: 4, ExpertsUsed: 2, Context: 4096, SlidingWindow: 8,
			RopeBase: 150000, YarnFactor: 32, YarnOrigContext: 128, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, ExpertType: gguf.TypeMXFP4, Tokenizer: TokTinyBPE},
		// small: real o200k_harmony vocabulary, head_dim 64 like the real model.
		"small": {Arch: ArchGPTOSS, Name: "synth-gpt-oss-small", Layers: 4, Embd: 64, Heads: 4, KVHeads: 2, HeadDim: 64,
			FF: 64, ExpertFF: 64, Experts: 8, ExpertsUsed: 4, Context: 8192, SlidingWindow: 32,
			RopeBase: 150000, YarnFactor: 32, YarnOrigContext: 256, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, ExpertType: gguf.TypeMXFP4, Tokenizer: TokO200kHarmony},
		// 20b: gpt-oss-20b's real shapes.
		"20b": {Arch: ArchGPTOSS, Name: "synth-gpt-oss-20b", Layers: 24, Embd: 2880, Heads: 64, KVHeads: 8, HeadDim: 64,
			FF: 2880, ExpertFF: 2880, Experts: 32, ExpertsUsed: 4, Context: 131072, SlidingWindow: 128,
			RopeBase: 150000, YarnFactor: 32, YarnOrigContext: 4096, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, ExpertType: gguf.TypeMXFP4, Tokenizer: TokO200kHarmony},
	},
	ArchGPT2: {
		"tiny": {Arch: ArchGPT2, Name: "synth-gpt2-tiny", Layers: 2, Embd: 64, Heads: 4, HeadDim: 16, FF: 256, Context: 256,
			NormEps: 1e-5, MatType: gguf.TypeF32, EmbdType: gguf.TypeF32, OutType: gguf.TypeF32, Tokenizer: TokTinyBPE},
		"small": {Arch: ArchGPT2, Name: "synth-gpt2-small", Layers: 4, Embd: 64, Heads: 2, HeadDim: 32, FF: 256, Context: 1024,
			NormEps: 1e-5, MatType: gguf.TypeF16, EmbdType: gguf.TypeF16, OutType: gguf.TypeF16, Tokenizer: TokR50k},
		"124m": {Arch: ArchGPT2, Name: "synth-gpt2-124m", Layers: 12, Embd: 768, Heads: 12, HeadDim: 64, FF: 3072, Context: 1024,
			NormEps: 1e-5, MatType: gguf.TypeF16, EmbdType: gguf.TypeF16, OutType: gguf.TypeF16, Tokenizer: TokR50k},
	},
	ArchLlama: {
		"tiny": {Arch: ArchLlama, Name: "synth-llama-tiny", Layers: 2, Embd: 64, Heads: 4, KVHeads: 2, HeadDim: 16, FF: 128,
			Context: 2048, RopeBase: 10000, RopeFreqs: true, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, Tokenizer: TokTinyBPE},
		"tiny-llama2": {Arch: ArchLlama, Name: "synth-llama2-tiny", Layers: 2, Embd: 64, Heads: 4, KVHeads: 4, HeadDim: 16, FF: 160,
			Context: 2048, RopeBase: 10000, NormEps: 1e-5,
			MatType: gguf.TypeF32, EmbdType: gguf.TypeF32, OutType: gguf.TypeF32, Tokenizer: TokTinySPM},
		"small": {Arch: ArchLlama, Name: "synth-llama-small", Layers: 4, Embd: 64, Heads: 4, KVHeads: 2, HeadDim: 32, FF: 192,
			Context: 8192, RopeBase: 500000, RopeFreqs: true, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, Tokenizer: TokLlama3},
		"llama3-8b": {Arch: ArchLlama, Name: "synth-llama3-8b", Layers: 32, Embd: 4096, Heads: 32, KVHeads: 8, HeadDim: 128, FF: 14336,
			Context: 131072, RopeBase: 500000, RopeFreqs: true, NormEps: 1e-5,
			MatType: gguf.TypeQ8_0, EmbdType: gguf.TypeQ8_0, OutType: gguf.TypeQ8_0, Tokenizer: TokLlama3},
	},
}

// Archs lists the architectures synth knows.
func Archs() []string { return []string{ArchGPTOSS, ArchGPT2, ArchLlama} }

// Sizes lists the presets of an architecture, sorted.
func Sizes(arch string) []string {
	var out []string
	for k := range presets[arch] {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Preset returns the configuration of a preset (VocabSize not yet filled).
func Preset(arch, size string) (Config, error) {
	m, ok := presets[arch]
	if !ok {
		return Config{}, fmt.Errorf("synth: unknown architecture %q (want %s)", arch, strings.Join(Archs(), ", "))
	}
	c, ok := m[size]
	if !ok {
		return Config{}, fmt.Errorf("synth: unknown %s size %q (want %s)", arch, size, strings.Join(Sizes(arch), ", "))
	}
	return c, nil
}

// Options selects what Write generates.
type Options struct {
	Arch string
	Size string
	Seed uint64
	// Config, if not nil, replaces the preset (Arch/Size are then ignored).
	Config *Config
	// Workers bounds parallel generation (0 = GOMAXPROCS).
	Workers int
}

// Plan is what a model file will contain, computed without writing it.
type Plan struct {
	Config  Config
	Tensors []TensorSpec
	Params  int64 // total elements
	Bytes   int64 // file size
	writer  *gguf.Writer
}

// NewPlan builds the writer for opts (tokenizer and metadata included) without
// generating any weights; Plan.Bytes is the exact file size.
func NewPlan(opts Options) (*Plan, error) {
	var c Config
	if opts.Config != nil {
		c = *opts.Config
	} else {
		var err error
		if c, err = Preset(opts.Arch, opts.Size); err != nil {
			return nil, err
		}
	}
	tok, err := buildTokenizer(c)
	if err != nil {
		return nil, err
	}
	c.VocabSize = len(tok.tokens)
	specs, err := Tensors(c)
	if err != nil {
		return nil, err
	}
	w := gguf.NewWriter()
	for _, kv := range metadata(c) {
		w.Set(kv.Key, kv.Value)
	}
	for _, kv := range tok.metadata() {
		w.Set(kv.Key, kv.Value)
	}
	p := &Plan{Config: c, Tensors: specs, writer: w}
	workers := opts.Workers
	for _, s := range specs {
		s := s
		p.Params += s.Elements()
		seed := tensorSeed(opts.Seed, s.Name)
		if err := w.AddTensor(s.Name, s.Type, s.Shape, func(out io.Writer) error {
			return generate(out, s, seed, c, workers)
		}); err != nil {
			return nil, fmt.Errorf("synth: %w", err)
		}
	}
	p.Bytes = w.Size()
	return p, nil
}

// Write generates the model described by opts into path (atomically).
// progress gets bytes written and the total.
func Write(path string, opts Options, progress func(done, total int64)) error {
	if path == "" {
		return errors.New("synth: empty output path")
	}
	p, err := NewPlan(opts)
	if err != nil {
		return err
	}
	return p.writer.WriteFile(path, progress)
}

// WriteTo generates the model into path using this plan.
func (p *Plan) WriteTo(path string, progress func(done, total int64)) error {
	return p.writer.WriteFile(path, progress)
}

// Stream writes the model to w (for example io.Discard to measure the
// generator, or a pipe) and returns the bytes written.
func (p *Plan) Stream(w io.Writer, progress func(done, total int64)) (int64, error) {
	if progress == nil {
		return p.writer.WriteTo(w)
	}
	pw := &progressWriter{w: w, total: p.Bytes, progress: progress}
	return p.writer.WriteTo(pw)
}

type progressWriter struct {
	w        io.Writer
	done     int64
	total    int64
	progress func(done, total int64)
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	p.progress(p.done, p.total)
	return n, err
}
