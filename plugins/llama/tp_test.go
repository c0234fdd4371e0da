package llama

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// tpTol bounds the split model's logit error relative to max|logit|.
const tpTol = 1e-4

// tp4 is a tiny Llama that splits 4 ways: 4 KV heads, attention width 128
// (32 Q8_0 columns of attn_output a rank), ff 128 (one Q8_0 block of
// ffn_down columns a rank), with q/k/v/o biases.
func tp4() nntest.Config {
	c := nntest.Tiny("llama")
	c.Width, c.KVHeads, c.FF, c.Biases = 128, 4, 128, true
	return c
}

// A Llama split 2 and 4 ways over in-process ranks gives the whole model's
// logits (prefill, token-by-token decode with paged KV, a mixed batch) and
// the same greedy tokens.
func TestTensorParallelMatchesWhole(t *testing.T) {
	two := nntest.Tiny("llama")
	two.FF = 128 // 96 is 3 Q8_0 blocks: does not split
	for _, tc := range []struct {
		name string
		c    nntest.Config
		size int
	}{
		{"gqa/2", two, 2},
		{"gqa/4", tp4(), 4},
		{"mha-f32-tied/2", func() nntest.Config {
			c := nntest.Tiny("llama")
			c.KVHeads, c.MatType, c.Tied = 8, ml.F32, true
			return c
		}(), 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := Options{MaxTokens: 8}
			whole := load(t, tc.c, opts)
			split, _ := nntest.LoadSplit(t, tc.c, tc.size, opts, Load)
			nntest.CompareSplit(t, whole, split, 17, 12, tpTol)
			nntest.CheckGreedy(t, split)
		})
	}
}

func TestTensorParallelBytes(t *testing.T) {
	nntest.CheckShardBytes(t, tp4(), 4, Options{}, Load, footprint)
	nntest.CheckShardBytes(t, tp4(), 2, Options{}, Load, footprint)
}

func TestTensorParallelErrors(t *testing.T) {
	comms := nntest.LocalComms(2)
	c := nntest.Tiny("llama") // ff 96 = 3 Q8_0 blocks
	_, err := Load(nntest.MustWrite(t, c), Options{Backend: cpu.New(1), Shard: ml.Shard{Rank: 0, Size: 2, Comm: comms[0]}})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.ErrorContains(t, err, "blk.0.ffn_")
	assert.ErrorContains(t, err, "size 2")
	c.FF = 128
	_, err = Load(nntest.MustWrite(t, c), Options{Backend: cpu.New(1), Shard: ml.Shard{Rank: 0, Size: 4, Comm: comms[0]}})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.ErrorContains(t, err, "llama.attention.head_count_kv = 2")
}

func TestInfoDeclaresTensorParallel(t *testing.T) {
	assert.Contains(t, Info().Features, "tensor-parallel")
}
