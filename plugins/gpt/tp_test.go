package gpt

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
	"github.com/llama-orch/orch/sdk/tp"
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
	// several blocks a rank: attn_output 128 of 256 Q8_0 columns (4 blocks),
	// 8/4 heads of 32; experts ff 2880 as gpt-oss-20b's (45 MXFP4 blocks of
	// ffn_down_exps columns a rank: an odd count, 765-byte rows)
	wide := nntest.Tiny("gpt-oss")
	wide.Width, wide.Heads, wide.KVHeads, wide.HeadDim, wide.FF = 256, 8, 4, 32, 2880
	for _, tc := range []struct {
		name string
		c    nntest.Config
		size int
	}{
		{"gpt-oss/2", nntest.Tiny("gpt-oss"), 2},
		{"gpt-oss-wide/2", wide, 2},
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

// freeAddr returns a loopback address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

// loadRanks runs the adapter's loader for every rank concurrently with the
// tensor-parallel Extra keys (over the real TCP group and host all-reduce,
// as the host's rank processes do) and returns each rank's result.
func loadRanks(t *testing.T, path string, size int, extra func(rank int) map[string]string) ([]engine.Model, []error) {
	t.Helper()
	addr := freeAddr(t)
	models, errs := make([]engine.Model, size), make([]error, size)
	var wg sync.WaitGroup
	for r := range size {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ex := map[string]string{"tp.rank": strconv.Itoa(r), "tp.size": strconv.Itoa(size), "tp.addr": addr}
			for k, v := range extra(r) {
				ex[k] = v
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			models[r], _, errs[r] = NewLoader(nil)(ctx, sdk.LoadRequest{Path: path,
				Options: sdk.LoadOptions{Device: "cpu", Threads: 1, ContextLength: 64, MaxSequences: 2, Extra: ex}}, nil)
		}()
	}
	wg.Wait()
	return models, errs
}

// followerExits records FollowerExit's calls instead of exiting.
func followerExits(t *testing.T) chan error {
	exits := make(chan error, 8)
	old := nn.FollowerExit
	nn.FollowerExit = func(_ hclog.Logger, _ int, err error) { exits <- err }
	t.Cleanup(func() { nn.FollowerExit = old })
	return exits
}

// Two ranks loaded through the adapter's loader (Extra keys, TCP group,
// host all-reduce): the leader's Forward equals the whole model's, the
// follower refuses requests of its own, and closing the leader stops the
// follower cleanly.
func TestTensorParallelLoader(t *testing.T) {
	exits := followerExits(t)
	c := nntest.Tiny("gpt-oss")
	path := nntest.MustWrite(t, c)
	whole, _, err := NewLoader(nil)(context.Background(), sdk.LoadRequest{Path: path,
		Options: sdk.LoadOptions{Device: "cpu", Threads: 1, ContextLength: 64, MaxSequences: 2}}, nil)
	require.NoError(t, err)
	defer whole.Close()
	models, errs := loadRanks(t, path, 2, func(int) map[string]string { return nil })
	require.NoError(t, errors.Join(errs...))
	lead, follower := models[0], models[1]
	ws, ls := whole.Spec(), lead.Spec()
	assert.Equal(t, ws.NumBlocks, ls.NumBlocks, "the engine's pool: same blocks")
	assert.Equal(t, ws.KVBlockBytes, 2*ls.KVBlockBytes, "a rank holds half of every block (its KV heads)")
	assert.Equal(t, len(ws.Groups), len(ls.Groups))
	_, isGroup := lead.(engine.GroupModel)
	assert.True(t, isGroup, "the leader keeps the runner's interfaces")

	prompt := []int32{5, 9, 1, 44, 7, 100, 3, 250, 2, 17, 8, 90, 33, 4}
	batch := func(toks []int32, pos int) *engine.Batch {
		return &engine.Batch{Seqs: []engine.SeqInput{{Tokens: toks, Pos: pos, Blocks: []int32{0, 1}, AllLogits: true,
			GroupBlocks: [][]int32{{0, 1}, {0, 1}}}}}
	}
	for _, step := range []struct{ lo, hi int }{{0, 10}, {10, 11}, {11, 12}, {12, 14}} {
		want, err := whole.Forward(context.Background(), batch(prompt[step.lo:step.hi], step.lo))
		require.NoError(t, err)
		got, err := lead.Forward(context.Background(), batch(prompt[step.lo:step.hi], step.lo))
		require.NoError(t, err)
		assert.LessOrEqual(t, nntest.MaxRelErr(got.Logits[0], want.Logits[0]), tpTol, "tokens %d..%d", step.lo, step.hi)
	}
	_, err = follower.Forward(context.Background(), batch(prompt[:1], 0))
	assert.ErrorIs(t, err, tp.ErrFollower)

	require.NoError(t, lead.Close())
	select {
	case err := <-exits:
		assert.NoError(t, err, "the follower stops cleanly on the leader's Close")
	case <-time.After(10 * time.Second):
		t.Fatal("the follower did not stop")
	}
	require.NoError(t, follower.Close())
}

// A rank that fails its load breaks the group: every rank's load fails.
func TestTensorParallelLoaderFails(t *testing.T) {
	followerExits(t)
	path := nntest.MustWrite(t, nntest.Tiny("gpt-oss"))
	models, errs := loadRanks(t, path, 2, func(r int) map[string]string {
		if r == 1 {
			return map[string]string{"kv_type": "q4"} // rank 1 only
		}
		return nil
	})
	for r, err := range errs {
		assert.Error(t, err, "rank %d", r)
		assert.Nil(t, models[r])
	}
	assert.ErrorIs(t, errs[1], sdk.ErrInvalidArgument)
	assert.ErrorContains(t, errs[0], "kv_type", "rank 0 learns rank 1's reason")
	// incomplete keys are refused before any group is joined
	_, _, err := NewLoader(nil)(context.Background(), sdk.LoadRequest{Path: path,
		Options: sdk.LoadOptions{Device: "cpu", Extra: map[string]string{"tp.size": "2"}}}, nil)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

// The planner plans one rank when the Extra keys say the model is split:
// the rank's weights (== its load), its KV heads.
func TestTensorParallelPlan(t *testing.T) {
	path := nntest.MustWrite(t, nntest.Tiny("gpt-oss"))
	opts := sdk.LoadOptions{Device: "cpu", ContextLength: 64, MaxSequences: 2}
	whole, err := NewPlanner(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: opts})
	require.NoError(t, err)
	for r := range 2 {
		opts.Extra = map[string]string{"tp.size": "2", "tp.rank": strconv.Itoa(r)}
		plan, err := NewPlanner(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: opts})
		require.NoError(t, err)
		fp, err := nntest.OpenShardFootprint(path, footprintGPTOSS, ml.Shard{Rank: r, Size: 2})
		require.NoError(t, err)
		assert.Equal(t, fp.WeightBytes, plan.WeightBytes)
		assert.Less(t, plan.WeightBytes, whole.WeightBytes)
		assert.Equal(t, whole.KVBytes, 2*plan.KVBytes)
		assert.Less(t, plan.WorkspaceBytes, whole.WorkspaceBytes)
	}
	opts.Extra = map[string]string{"tp.size": "4"} // 2 KV heads
	_, err = NewPlanner(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: opts})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestInfoDeclaresTensorParallel(t *testing.T) {
	assert.Contains(t, Info().Features, "tensor-parallel")
}
