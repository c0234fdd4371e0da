package engine_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
)

// nullModel costs nothing: it returns a fixed logits row per sequence (or
// its argmax), so a benchmark over it measures the engine's own host cost
// per step (scheduling, block tables, sampling, streaming).
type nullModel struct {
	vocab int
	row   []float32
}

func (m *nullModel) Spec() engine.Spec {
	return engine.Spec{VocabSize: m.vocab, ContextLength: 4096, BlockSize: 16, NumBlocks: 64 * 4096 / 16}
}

func (m *nullModel) Forward(_ context.Context, b *engine.Batch) (*engine.Output, error) {
	out := &engine.Output{Logits: make([][]float32, len(b.Seqs))}
	for i, s := range b.Seqs {
		if s.AllLogits {
			return nil, fmt.Errorf("not supported")
		}
		out.Logits[i] = m.row
	}
	return out, nil
}

func (m *nullModel) CopyBlock(dst, src int32) error { return nil }
func (m *nullModel) Close() error                   { return nil }

type nullGreedy struct{ *nullModel }

func (m nullGreedy) ForwardGreedy(_ context.Context, b *engine.Batch) ([]int32, error) {
	return make([]int32, len(b.Seqs)), nil
}

// BenchmarkDecode64 reports the engine's host time per generated token with
// 64 concurrent greedy streams over a gpt-oss-sized vocabulary (201088).
func BenchmarkDecode64(b *testing.B) {
	for _, dev := range []bool{false, true} {
		b.Run(fmt.Sprintf("device_greedy=%v", dev), func(b *testing.B) {
			r := rand.New(rand.NewPCG(1, 1))
			nm := &nullModel{vocab: 201088, row: make([]float32, 201088)}
			for i := range nm.row {
				nm.row[i] = float32(r.NormFloat64())
			}
			var m engine.Model = nm
			if dev {
				m = nullGreedy{nm}
			}
			a := engine.NewAdapter(func(context.Context, sdk.LoadRequest, func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
				return m, sdk.ModelInfo{}, nil
			}, nil, engine.WithMaxSequences(64))
			ctx := context.Background()
			if _, err := a.Load(ctx, sdk.LoadRequest{}, nil); err != nil {
				b.Fatal(err)
			}
			defer a.Unload(ctx)
			const streams, gen = 64, 64
			b.ResetTimer()
			for range b.N {
				var wg sync.WaitGroup
				for s := range streams {
					wg.Add(1)
					go func() {
						defer wg.Done()
						p := []int32{int32(s), 1, 2, 3}
						if err := a.Generate(ctx, sdk.GenerateRequest{Prompt: p, MaxTokens: gen}, func(sdk.Chunk) error { return nil }); err != nil {
							b.Error(err)
						}
					}()
				}
				wg.Wait()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*streams*gen)/1e3, "µs/token")
		})
	}
}
