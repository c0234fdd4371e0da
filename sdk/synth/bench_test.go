package synth_test

import (
	"io"
	"testing"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/synth"
)

// BenchmarkGenerateExperts measures weight generation for one gpt-oss-20b
// layer's expert tensors (MXFP4, ~3 x 140 MB) into io.Discard.
func BenchmarkGenerateExperts(b *testing.B) {
	c, err := synth.Preset("gpt-oss", "20b")
	if err != nil {
		b.Fatal(err)
	}
	c.Layers = 1
	c.Tokenizer = synth.TokTinyBPE // keep the vocabulary out of the measurement
	p, err := synth.NewPlan(synth.Options{Config: &c})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(p.Bytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := p.Stream(io.Discard, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGenerateQ8 measures Q8_0 generation (llama3-8b's dominant type).
func BenchmarkGenerateQ8(b *testing.B) {
	c, err := synth.Preset("llama", "llama3-8b")
	if err != nil {
		b.Fatal(err)
	}
	c.Layers = 1
	c.Tokenizer = synth.TokTinyBPE
	c.EmbdType, c.OutType = gguf.TypeQ8_0, gguf.TypeQ8_0
	p, err := synth.NewPlan(synth.Options{Config: &c})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(p.Bytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := p.Stream(io.Discard, nil); err != nil {
			b.Fatal(err)
		}
	}
}
