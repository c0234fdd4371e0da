//go:build gpu

package cuda_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// TestForwardSampleGPU: the runner's device sampling on the CUDA backend
// (orch_sample_rows after the LM head, in captured decode graphs replayed
// with new settings each step): 8 sequences decoding 12 steps, mixed
// settings (sampled with every filter, greedy, Host) that rotate every step,
// against Forward's logits drawn on the host by ml.SampleRowRef (equal but
// for last-bit float differences in near ties), ForwardGreedy and Forward.
func TestForwardSampleGPU(t *testing.T) {
	g, err := cuda.New(0) // (a second context on the test device)
	require.NoError(t, err)
	t.Cleanup(func() { g.Close() })
	const vocab = 201088
	rn := nntest.NewTokRunner(t, g, 16, vocab)
	require.True(t, rn.DeviceSampling(), "the CUDA library has orch_sample_rows")
	ctx := context.Background()
	settings := []engine.SampleSpec{
		{Temperature: 1}, {Temperature: 0.8, TopP: 0.9}, {}, {Host: true}, {Temperature: 1, TopK: 40, TopP: 0.95},
		{Temperature: 1.3, MinP: 0.05}, {Temperature: 1, TopK: 5}, {Temperature: 0.6, TopK: 100, TopP: 0.8, MinP: 0.01},
	}
	const n = 8
	toks := make([]int32, n)
	for i := range toks {
		toks[i] = int32(1000*i + 7)
	}
	mismatch := 0
	for step := range 12 {
		batch := func() *engine.Batch {
			b := &engine.Batch{}
			for i := range n {
				b.Seqs = append(b.Seqs, engine.SeqInput{Tokens: []int32{toks[i]}, Pos: step, Blocks: []int32{int32(3 * i), int32(3*i + 1), int32(3*i + 2)}})
			}
			return b
		}
		specs := make([]engine.SampleSpec, n)
		for i := range specs {
			specs[i] = settings[(i+step)%len(settings)]
			specs[i].Seed, specs[i].Index = uint64(i+1), uint64(step)
		}
		ref, err := rn.Forward(ctx, batch())
		require.NoError(t, err)
		greedy, err := rn.ForwardGreedy(ctx, batch())
		require.NoError(t, err)
		got, out, err := rn.ForwardSample(ctx, batch(), specs)
		require.NoError(t, err)
		for i, sp := range specs {
			switch {
			case sp.Host:
				require.Equal(t, ref.Logits[i], out.Logits[i], "step %d row %d: Host logits", step, i)
			case sp.Temperature == 0:
				require.Equal(t, greedy[i], got[i], "step %d row %d: greedy", step, i)
			default:
				want := ml.SampleRowRef(ref.Logits[i], ml.SampleParams{Temperature: sp.Temperature, TopK: int32(sp.TopK),
					TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
				if want != got[i] {
					mismatch++
					t.Logf("step %d row %d %+v: token %d, reference %d", step, i, sp, got[i], want)
				}
			}
			toks[i] = got[i]
			if sp.Host {
				toks[i] = greedy[i]
			}
		}
	}
	assert.LessOrEqual(t, mismatch, 2, "device draws differing from the host reference (near ties only)")
}
