package gpt

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// tpTol bounds the split model's logit error relative to max|logit|: the
// ranks' partial sums add in another order than the whole model's (float32).
const tpTol = 1e-4

// A model split 2 (or 4) ways over in-process ranks gives the whole
// model's logits (prefill, token-by-token decode with paged KV, a mixed
// batch; gpt-oss with its sliding-window layers in their own KV pool) and
// the same greedy tokens.
func TestTensorParallelMatchesWhole(t *testing.T) {
	gpt2x4 := nntest.Tiny("gpt2") // 4 heads, ff 96: splits 4 ways (F32)
	for _, tc := range []struct {
		name string
		c    nntest.Config
		size int
	}{
		{"gpt-oss/2", nntest.Tiny("gpt-oss"), 2},
		{"gpt2/2", nntest.Tiny("gpt2"), 2},
		{"gpt2/4", gpt2x4, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := Options{MaxTokens: 8} // long prompts run in several pieces
			whole := load(t, tc.c, opts)
			split, _ := nntest.LoadSplit(t, tc.c, tc.size, opts, Load)
			assert.Equal(t, whole.Spec().SlidingWindow, split.Spec().SlidingWindow)
			nntest.CompareSplit(t, whole, split, 19, 12, tpTol) // longer than gpt-oss tiny's window (8)
			nntest.CheckGreedy(t, split)
		})
	}
}

// The split gpt-oss model through the engine (continuous batching, KV
// groups, prefix cache) generates what the whole model does.
func TestTensorParallelEngine(t *testing.T) {
	c := nntest.Tiny("gpt-oss")
	gen := func(m engine.Model) []int32 {
		a := engine.NewAdapter(func(context.Context, sdk.LoadRequest, func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
			return m, sdk.ModelInfo{}, nil
		}, nil)
		t.Cleanup(func() { a.Unload(context.Background()) }) //nolint:errcheck
		_, err := a.Load(context.Background(), sdk.LoadRequest{Path: "x"}, nil)
		require.NoError(t, err)
		var toks []int32
		err = a.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5}, MaxTokens: 20},
			func(ch sdk.Chunk) error { toks = append(toks, ch.Tokens...); return nil })
		require.NoError(t, err)
		return toks
	}
	whole := nntest.Load(t, c, Options{}, Load)
	split, _ := nntest.LoadSplit(t, c, 2, Options{}, Load)
	want := gen(noClose{whole})
	require.Len(t, want, 20)
	assert.Equal(t, want, gen(noClose{split}))
}

// noClose keeps a test-owned model open when an adapter unloads it (a
// greedy, grouped model: the engine needs both interfaces of gpt-oss).
type noClose struct{ engine.Model }

func (noClose) Close() error { return nil }

func (m noClose) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	return m.Model.(engine.GreedyModel).ForwardGreedy(ctx, b)
}

func (m noClose) CopyGroupBlock(g int, dst, src int32) error {
	return m.Model.(engine.GroupModel).CopyGroupBlock(g, dst, src)
}

func TestTensorParallelBytes(t *testing.T) {
	nntest.CheckShardBytes(t, nntest.Tiny("gpt-oss"), 2, Options{}, Load, footprintGPTOSS)
	nntest.CheckShardBytes(t, nntest.Tiny("gpt2"), 4, Options{}, Load, footprintGPT2)
}

func TestTensorParallelErrors(t *testing.T) {
	path := nntest.MustWrite(t, nntest.Tiny("gpt-oss"))
	comms := nntest.LocalComms(4)
	for _, tc := range []struct {
		name  string
		c     func(*nntest.Config)
		size  int
		wants []string
	}{
		// 2 KV heads do not split 4 ways
		{"kv heads", nil, 4, []string{"head_count_kv = 2", "size 4"}},
		// ff 96 split 2 ways is 48 columns of ffn_down_exps: not a whole MXFP4 block
		{"ff blocks", func(c *nntest.Config) { c.FF = 96 }, 2, []string{"ffn_down_exps.weight", "dimension 0", "MXFP4 block of 32", "size 2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := path
			if tc.c != nil {
				c := nntest.Tiny("gpt-oss")
				tc.c(&c)
				p = nntest.MustWrite(t, c)
			}
			_, err := Load(p, Options{Backend: cpu.New(1), Shard: ml.Shard{Rank: 1, Size: tc.size, Comm: comms[1]}})
			require.ErrorIs(t, err, sdk.ErrInvalidArgument)
			for _, w := range tc.wants {
				assert.ErrorContains(t, err, w)
			}
		})
	}
	// a split without a Comm, a rank outside the group
	_, err := Load(path, Options{Backend: cpu.New(1), Shard: ml.Shard{Rank: 0, Size: 2}})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = Load(path, Options{Backend: cpu.New(1), Shard: ml.Shard{Rank: 2, Size: 2, Comm: comms[0]}})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	// the footprint refuses as the build does
	_, err = nntest.OpenShardFootprint(path, footprintGPTOSS, ml.Shard{Rank: 0, Size: 4})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

// A failed all-reduce fails the step on every rank with the group's error
// (never logits computed from a partial sum).
func TestTensorParallelCommError(t *testing.T) {
	split, comms := nntest.LoadSplit(t, nntest.Tiny("gpt-oss"), 2, Options{}, Load)
	comms[0].FailAt(3)
	_, err := split.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1, 2, 3}, Blocks: []int32{0}}}})
	require.Error(t, err)
	assert.ErrorContains(t, err, "tensor-parallel all-reduce")
	assert.ErrorContains(t, err, "injected failure")
	_, err = split.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1}, Blocks: []int32{0}}}})
	assert.ErrorContains(t, err, "tensor-parallel all-reduce", "the group stays broken")
}
