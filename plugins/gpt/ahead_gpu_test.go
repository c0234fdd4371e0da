//go:build gpu

package gpt

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// Decode steps launched ahead on the GPU (sdk/ml/nn/ahead.go, queued token
// reads in sdk/ml/cuda/ahead.go): one stream at a time, greedy and sampled
// (drawn on the device), the tokens of ORCH_CUDA_STEP_AHEAD=0 bit for bit,
// nearly every step a hit; four streams at once (misses as they join and
// finish) complete with every block returned.
func TestGPUStepAhead(t *testing.T) {
	c := nntest.TinyGPU("gpt-oss")
	c.Layers = 4
	path := nntest.MustWrite(t, c)
	reqs := windowPrompts(4, 10, 9)
	for i := range reqs {
		reqs[i].MaxTokens = 40 + 5*i
		if i%2 == 1 {
			reqs[i].Sampling = sdk.SamplingParams{Temperature: 0.9, TopK: 40, Seed: uint64(7 + i), HasSeed: true}
		}
	}
	run := func(t *testing.T, ahead bool) ([][]int32, *recorder, sdk.Adapter) {
		if !ahead {
			t.Setenv("ORCH_CUDA_STEP_AHEAD", "0")
		}
		g, err := cuda.New(0)
		require.NoError(t, err)
		t.Cleanup(func() { g.Close() })
		require.Equal(t, ahead, g.StepAhead())
		a, rec := serve(t, path, nn.Options{Backend: g, NumBlocks: 256, ContextLength: 256, MaxTokens: 16, MaxSequences: 4},
			engine.WithMaxSequences(4), engine.WithMaxBatchTokens(16))
		var out [][]int32
		for _, rq := range reqs {
			toks, _, err := generate(context.Background(), a, rq)
			require.NoError(t, err)
			require.Len(t, toks, rq.MaxTokens)
			out = append(out, toks)
		}
		return out, rec, a
	}
	var want [][]int32
	t.Run("off", func(t *testing.T) {
		var rec *recorder
		want, rec, _ = run(t, false)
		launched, _ := rec.AheadStats()
		assert.Zero(t, launched)
	})
	require.NotNil(t, want)
	t.Run("on", func(t *testing.T) {
		got, rec, a := run(t, true)
		for i := range reqs {
			assert.Equal(t, want[i], got[i], "stream %d", i)
		}
		launched, hits := rec.AheadStats()
		t.Logf("alone: launched ahead %d, hits %d", launched, hits)
		assert.GreaterOrEqual(t, 100*hits, 90*launched)
		assert.Positive(t, hits)
		all := generateAll(t, a, reqs)
		for i, rq := range reqs {
			assert.Len(t, all[i], rq.MaxTokens, "stream %d", i)
		}
		l2, h2 := rec.AheadStats()
		t.Logf("together: launched ahead %d, hits %d", l2-launched, h2-hits)
		st, err := a.Stats(context.Background())
		require.NoError(t, err)
		assert.Zero(t, st.KVUsedBlocks)
	})
}
