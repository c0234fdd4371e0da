package nn_test

import (
	"context"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// hostSampler gives a CPU backend SampleRows through ml.SampleRowRef, so the
// runner's device-sampling path (params staging, head, Host rows) runs here.
type hostSampler struct {
	*cpu.Backend
	calls, filters int
}

func (h *hostSampler) SampleRowsAvailable() bool { return true }

func (h *hostSampler) SampleRows(dst, x, params ml.Tensor, filters int) {
	v, n := x.Shape()[0], x.Len()/x.Shape()[0]
	lg, w := make([]float32, v*n), make([]int32, ml.SampleParamsWords*n)
	if h.ReadF32(x, lg) != nil || h.ReadI32(params, w) != nil {
		panic("hostSampler: read")
	}
	out := make([]int32, n)
	ps := make([]ml.SampleParams, n)
	for i := range n {
		ps[i] = unpackSampleParams(w[i*ml.SampleParamsWords:])
		out[i] = ml.SampleRowRef(lg[i*v:(i+1)*v], ps[i])
	}
	if filters < ml.SampleFilters(v, ps) {
		panic("hostSampler: filters too small for the rows")
	}
	h.calls++
	h.filters = max(h.filters, filters)
	if h.WriteI32(dst, out) != nil {
		panic("hostSampler: write")
	}
}

func unpackSampleParams(w []int32) ml.SampleParams {
	return ml.SampleParams{Temperature: math.Float32frombits(uint32(w[0])), TopP: math.Float32frombits(uint32(w[1])),
		MinP: math.Float32frombits(uint32(w[2])), TopK: w[3], Seed: uint64(uint32(w[4])) | uint64(uint32(w[5]))<<32,
		Counter: uint64(uint32(w[6])) | uint64(uint32(w[7]))<<32}
}

// ForwardSample: device rows are ml.SampleRowRef of Forward's rows with their
// (seed, index), greedy rows ForwardGreedy's tokens, Host rows come back as
// logits; with a device sampler (hostSampler) and without one (the host
// fallback). Sub-batches (MaxTokens 8 < the batch's tokens) and a prefill
// chunk mix in.
func TestForwardSample(t *testing.T) {
	batch := func() *engine.Batch {
		blk := func(i int32) []int32 { return []int32{4 * i, 4*i + 1, 4*i + 2, 4*i + 3} }
		return &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: []int32{5, 6, 7, 8, 9, 10}, Pos: 0, Blocks: blk(0)},
			{Tokens: []int32{11}, Pos: 3, Blocks: blk(1)},
			{Tokens: []int32{12}, Pos: 2, Blocks: blk(2)},
			{Tokens: []int32{13}, Pos: 7, Blocks: blk(3)},
			{Tokens: []int32{14, 15}, Pos: 1, Blocks: blk(4)},
			{Tokens: []int32{16}, Pos: 0, Blocks: blk(5)},
		}}
	}
	specs := []engine.SampleSpec{
		{Temperature: 1, TopP: 0.9, Seed: 1, Index: 4},
		{}, // greedy
		{Host: true},
		{Temperature: 0.7, TopK: 20, TopP: 0.95, MinP: 0.05, Seed: 2, Index: 9},
		{Temperature: 1.5, Seed: 3, Index: 0},
		{Host: true}, // two Host rows around a device row: one copy, sliced
	}
	for _, dev := range []bool{true, false} {
		cb := cpu.New(1)
		var b ml.Backend = cb
		hs := &hostSampler{Backend: cb}
		if dev {
			b = hs
		}
		rn := nntest.NewTokRunner(t, b, 8, 300)
		assert.Equal(t, dev, rn.DeviceSampling())
		ctx := context.Background()
		ref, err := rn.Forward(ctx, batch())
		require.NoError(t, err)
		greedy, err := rn.ForwardGreedy(ctx, batch())
		require.NoError(t, err)
		toks, out, err := rn.ForwardSample(ctx, batch(), specs)
		require.NoError(t, err)
		require.Len(t, toks, len(specs))
		for i, sp := range specs {
			switch {
			case sp.Host:
				assert.Equal(t, ref.Logits[i], out.Logits[i], "dev=%v: Host row %d: Forward's logits", dev, i)
			case sp.Temperature == 0:
				assert.Equal(t, greedy[i], toks[i], "dev=%v: greedy row %d", dev, i)
				assert.Nil(t, out.Logits[i])
			default:
				want := ml.SampleRowRef(ref.Logits[i], ml.SampleParams{Temperature: sp.Temperature, TopK: int32(sp.TopK),
					TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
				assert.Equal(t, want, toks[i], "dev=%v: row %d", dev, i)
				assert.Nil(t, out.Logits[i])
			}
		}
		if dev {
			assert.Positive(t, hs.calls)
			assert.Equal(t, 3, hs.filters, "top-k and top-p rows: filters 3")
		}
		assert.Len(t, out.Logits[2], 300)
		assert.Len(t, out.Logits[5], 300)
		_, _, err = rn.ForwardSample(ctx, batch(), specs[:2])
		assert.Error(t, err, "one spec per sequence")
		b2 := batch()
		b2.Seqs[0].AllLogits = true
		_, _, err = rn.ForwardSample(ctx, b2, specs)
		assert.Error(t, err, "AllLogits is refused")
	}
}

// Decode steps with rotating settings (the loop of sdk/ml/cuda
// TestForwardSampleGPU, on the CPU with hostSampler): every row as the
// reference draws it.
func TestForwardSampleSteps(t *testing.T) {
	cb := cpu.New(1)
	hs := &hostSampler{Backend: cb}
	rn := nntest.NewTokRunner(t, hs, 16, 3000)
	ctx := context.Background()
	settings := []engine.SampleSpec{
		{Temperature: 1}, {Temperature: 0.8, TopP: 0.9}, {}, {Host: true}, {Temperature: 1, TopK: 40, TopP: 0.95},
		{Temperature: 1.3, MinP: 0.05}, {Temperature: 1, TopK: 5}, {Temperature: 0.6, TopK: 100, TopP: 0.8, MinP: 0.01},
	}
	const n = 8
	toks := make([]int32, n)
	for i := range toks {
		toks[i] = int32(300*i + 7)
	}
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
		got, out, err := rn.ForwardSample(ctx, batch(), specs)
		require.NoError(t, err)
		for i, sp := range specs {
			want := ml.SampleRowRef(ref.Logits[i], ml.SampleParams{Temperature: sp.Temperature, TopK: int32(sp.TopK),
				TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
			if sp.Host {
				require.Equal(t, ref.Logits[i], out.Logits[i])
				got[i] = want
			}
			require.Equal(t, want, got[i], "step %d row %d", step, i)
			toks[i] = got[i]
		}
	}
}
