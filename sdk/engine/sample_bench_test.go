package engine

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/llama-orch/orch/sdk"
)

// gptLogits: a gpt-oss-sized row (201,088) with a head of likely tokens.
func gptLogits(seed uint64) []float32 {
	r := rand.New(rand.NewPCG(seed, 1))
	l := make([]float32, 201088)
	for i := range l {
		l[i] = float32(r.NormFloat64()*2.5 - 3)
	}
	for range 40 {
		l[r.IntN(len(l))] += 12
	}
	return l
}

// BenchmarkSample: the host sampler's cost per token at gpt-oss's vocabulary.
func BenchmarkSample(b *testing.B) {
	l := gptLogits(1)
	for _, c := range []struct {
		name string
		p    sdk.SamplingParams
	}{
		{"T=1", sdk.SamplingParams{Temperature: 1}},
		{"T=1,top_p=0.9", sdk.SamplingParams{Temperature: 1, TopP: 0.9}},
		{"T=0.7,top_k=50", sdk.SamplingParams{Temperature: 0.7, TopK: 50}},
		{"T=1,min_p=0.05", sdk.SamplingParams{Temperature: 1, MinP: 0.05}},
	} {
		for _, par := range []int{1, 4} {
			b.Run(fmt.Sprintf("%s,par=%d", c.name, par), func(b *testing.B) {
				s := newSampler(sdk.GenerateRequest{Sampling: c.p})
				s.par = par
				b.ReportAllocs()
				for b.Loop() {
					s.sample(l, 0)
				}
			})
		}
	}
}
