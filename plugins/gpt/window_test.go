package gpt

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// recorder wraps a runner and records, per Forward, the batch size and the
// window-group blocks each sequence's table holds.
type recorder struct {
	*nn.Runner
	window, bs     int
	maxSeqs        atomic.Int64
	maxDecode      atomic.Int64 // most sequences decoding (one token) in one step
	maxWindow      atomic.Int64 // most window blocks one table held
	over           atomic.Int64 // tables over ceil((W+n)/bs)+1
	grouped, steps atomic.Int64
}

func (r *recorder) record(b *engine.Batch) {
	r.steps.Add(1)
	storeMax(&r.maxSeqs, int64(len(b.Seqs)))
	dec := 0
	for _, s := range b.Seqs {
		if len(s.Tokens) == 1 {
			dec++
		}
	}
	storeMax(&r.maxDecode, int64(dec))
	for _, s := range b.Seqs {
		if s.GroupBlocks == nil {
			continue
		}
		r.grouped.Add(1)
		held := 0
		for _, blk := range s.GroupBlocks[1] {
			if blk >= 0 {
				held++
			}
		}
		storeMax(&r.maxWindow, int64(held))
		if held > (r.window+len(s.Tokens)+r.bs-1)/r.bs+1 {
			r.over.Add(1)
		}
	}
}

func storeMax(a *atomic.Int64, v int64) {
	for {
		cur := a.Load()
		if v <= cur || a.CompareAndSwap(cur, v) {
			return
		}
	}
}

func (r *recorder) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	r.record(b)
	return r.Runner.Forward(ctx, b)
}

func (r *recorder) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	r.record(b)
	return r.Runner.ForwardGreedy(ctx, b)
}

// windowModel is the tiny gpt-oss (window 8 on even layers) with 4 layers.
func windowModel(t *testing.T) string {
	c := nntest.Tiny("gpt-oss")
	c.Layers = 4
	return nntest.MustWrite(t, c)
}

// serve loads path with opts into an engine adapter; the recorder sees
// every step.
func serve(t *testing.T, path string, opts nn.Options, eopts ...engine.Option) (sdk.Adapter, *recorder) {
	t.Helper()
	if opts.Backend == nil {
		opts.Backend = cpu.New(2)
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = 4
	}
	var rec *recorder
	loader := func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		m, err := Load(path, opts)
		if err != nil {
			return nil, sdk.ModelInfo{}, err
		}
		rec = &recorder{Runner: m.(*nn.Runner), window: m.Spec().SlidingWindow, bs: opts.BlockSize}
		return rec, sdk.ModelInfo{MaxSequences: opts.MaxSequences}, nil
	}
	a := engine.NewAdapter(loader, nil, eopts...)
	_, err := a.Load(context.Background(), sdk.LoadRequest{Path: path}, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = a.Unload(context.Background()) })
	return a, rec
}

func generate(ctx context.Context, a sdk.Adapter, req sdk.GenerateRequest) ([]int32, *sdk.Timings, error) {
	var toks []int32
	var tm *sdk.Timings
	err := a.Generate(ctx, req, func(c sdk.Chunk) error {
		toks = append(toks, c.Tokens...)
		if c.Timings != nil {
			tm = c.Timings
		}
		return nil
	})
	return toks, tm, err
}

func generateAll(t *testing.T, a sdk.Adapter, reqs []sdk.GenerateRequest) [][]int32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out := make([][]int32, len(reqs))
	errs := make([]error, len(reqs))
	var wg sync.WaitGroup
	for i, rq := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], _, errs[i] = generate(ctx, a, rq)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "request %d", i)
	}
	return out
}

func windowPrompts(n, minLen, step int) []sdk.GenerateRequest {
	r := rand.New(rand.NewPCG(3, 4))
	reqs := make([]sdk.GenerateRequest, n)
	for i := range reqs {
		p := make([]int32, minLen+step*i)
		for j := range p {
			p[j] = int32(r.IntN(300))
		}
		reqs[i] = sdk.GenerateRequest{Prompt: p, MaxTokens: 40}
	}
	return reqs
}

// The window layers' own pool gives exactly the tokens of the shared-table
// path: 8 concurrent greedy streams with prompts and generations far longer
// than the window (8), prefilled in chunks, and every window table within
// ceil((W+chunk)/bs)+1 blocks.
func TestWindowKVMatchesShared(t *testing.T) {
	const chunk, bs = 16, 4
	path := windowModel(t)
	reqs := windowPrompts(8, 20, 7) // 20..69 prompt tokens + 40 generated
	shared, srec := serve(t, path, nn.Options{NumBlocks: 256, ContextLength: 128, MaxTokens: 8, SharedKV: true},
		engine.WithMaxBatchTokens(chunk), engine.WithMaxSequences(8))
	want := make([][]int32, len(reqs))
	for i, rq := range reqs { // alone: the reference
		var err error
		want[i], _, err = generate(context.Background(), shared, rq)
		require.NoError(t, err)
		require.Len(t, want[i], 40)
	}
	assert.Zero(t, srec.grouped.Load(), "the shared path passes one table")

	grouped, rec := serve(t, path, nn.Options{NumBlocks: 256, ContextLength: 128, MaxTokens: 8, MaxSequences: 8, StepTokens: chunk},
		engine.WithMaxBatchTokens(chunk), engine.WithMaxSequences(8))
	spec := rec.Spec()
	require.Len(t, spec.Groups, 2)
	assert.Equal(t, 8, spec.Groups[1].Window)
	assert.Equal(t, nn.WindowBlocks(8, bs, chunk, 128, 8), spec.Groups[1].NumBlocks)
	assert.Less(t, spec.Groups[1].NumBlocks, spec.Groups[0].NumBlocks/3, "the window pool is bounded by the window, not the context")
	got := generateAll(t, grouped, reqs)
	for i := range reqs {
		assert.Equal(t, want[i], got[i], "stream %d", i)
	}
	assert.Greater(t, rec.maxSeqs.Load(), int64(4), "streams were batched together")
	assert.Positive(t, rec.grouped.Load())
	assert.Zero(t, rec.over.Load(), "window tables within ceil((W+n)/bs)+1")
	assert.LessOrEqual(t, rec.maxWindow.Load(), int64((8+chunk+bs-1)/bs+1))
	st, err := grouped.Stats(context.Background())
	require.NoError(t, err)
	assert.Zero(t, st.KVUsedBlocks)
}

// Tiny pools force preemption (through the full pool and through the
// window pool): still the tokens of the shared path, pools empty at the end.
func TestWindowKVPreemption(t *testing.T) {
	path := windowModel(t)
	reqs := windowPrompts(6, 30, 5)
	shared, _ := serve(t, path, nn.Options{NumBlocks: 256, ContextLength: 128, SharedKV: true}, engine.WithMaxBatchTokens(8))
	want := make([][]int32, len(reqs))
	for i, rq := range reqs {
		var err error
		want[i], _, err = generate(context.Background(), shared, rq)
		require.NoError(t, err)
	}
	for _, tc := range []struct {
		name          string
		full, window  int
		prefix        bool
		preemptWindow bool
	}{
		{"full pool", 40, 0, true, false},
		{"window pool", 256, 9, true, true},
		{"window pool, no prefix cache", 256, 9, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, rec := serve(t, path, nn.Options{NumBlocks: tc.full, ContextLength: 128, MaxSequences: 6, StepTokens: 8, WindowBlocks: tc.window},
				engine.WithMaxBatchTokens(8), engine.WithMaxSequences(6), engine.WithPrefixCache(tc.prefix))
			got := generateAll(t, a, reqs)
			for i := range reqs {
				assert.Equal(t, want[i], got[i], "stream %d", i)
			}
			assert.Greater(t, rec.maxSeqs.Load(), int64(1))
			assert.Zero(t, rec.over.Load())
			st, err := a.Stats(context.Background())
			require.NoError(t, err)
			assert.Zero(t, st.KVUsedBlocks)
		})
	}
}

// Prefix reuse with a window pool: a shared system prompt is served from the
// cache (both groups) and the tokens equal a fresh run's; a whole-block
// prompt repeats with copy-on-write in both groups.
func TestWindowKVPrefixReuse(t *testing.T) {
	path := windowModel(t)
	r := rand.New(rand.NewPCG(9, 10))
	rnd := func(n int) []int32 {
		p := make([]int32, n)
		for i := range p {
			p[i] = int32(r.IntN(300))
		}
		return p
	}
	system := rnd(32)
	p1 := append(append([]int32(nil), system...), rnd(6)...)
	p2 := append(append([]int32(nil), system...), rnd(9)...)
	p3 := p1[:36]
	fresh, _ := serve(t, path, nn.Options{NumBlocks: 128, ContextLength: 128, SharedKV: true}, engine.WithPrefixCache(false))
	want := map[int][]int32{}
	for i, p := range [][]int32{p1, p2, p3} {
		toks, _, err := generate(context.Background(), fresh, sdk.GenerateRequest{Prompt: p, MaxTokens: 12})
		require.NoError(t, err)
		want[i] = toks
	}
	a, _ := serve(t, path, nn.Options{NumBlocks: 128, ContextLength: 128, MaxSequences: 2, StepTokens: 16}, engine.WithMaxBatchTokens(16))
	ctx := context.Background()
	toks, tm, err := generate(ctx, a, sdk.GenerateRequest{Prompt: p1, MaxTokens: 12})
	require.NoError(t, err)
	assert.Equal(t, want[0], toks)
	assert.Zero(t, tm.CachedTokens)
	toks, tm, err = generate(ctx, a, sdk.GenerateRequest{Prompt: p2, MaxTokens: 12})
	require.NoError(t, err)
	assert.Equal(t, want[1], toks, "reused prefix == fresh run")
	assert.Equal(t, 32, tm.CachedTokens)
	for i := 0; i < 2; i++ {
		toks, tm, err = generate(ctx, a, sdk.GenerateRequest{Prompt: p3, MaxTokens: 12})
		require.NoError(t, err)
		assert.Equal(t, want[2], toks, "whole-block prompt, run %d", i)
	}
	assert.Equal(t, 35, tm.CachedTokens)
	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, int64(3), st.PrefixHits)
}

// For the same KV bytes (a kv_cache_fraction of the same free memory), the
// grouped cache holds about twice the full-context blocks (half the layers
// keep the context) and decodes more long sequences at once than the shared
// one, with the same tokens.
func TestWindowKVAdmitsMore(t *testing.T) {
	path := windowModel(t)
	ctx := context.Background()
	opts := func(groups string) sdk.LoadOptions {
		return sdk.LoadOptions{Device: "cpu", Threads: 2, ContextLength: 256, MaxSequences: 8, KVCacheFraction: 0.5,
			Extra: map[string]string{"block_size": "4", "kv_groups": groups, "engine.max_batch_tokens": "64"}}
	}
	// the same step budget as the loads below: it sizes the workspace
	plain, err := NewPlanner(nil)(ctx, sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", MaxSequences: 8,
		Extra: map[string]string{"engine.max_batch_tokens": "64"}}})
	require.NoError(t, err)
	// KV share: 0.5 x 2 MiB = 1 MiB: 252 shared blocks of 4 KiB (4 layers)
	withFree(t, plain.WeightBytes+plain.WorkspaceBytes+2<<20)
	reqs := windowPrompts(8, 200, 0) // 8 x (200 + 40) tokens: 51..60 blocks each
	var toks [2][][]int32
	var decoding [2]int64
	var kv [2]int64
	for k, groups := range []string{"off", "on"} {
		var rec *recorder
		a := engine.NewAdapter(func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
			m, info, err := NewLoader(nil)(ctx, req, progress)
			if err != nil {
				return nil, info, err
			}
			rec = &recorder{Runner: m.(*nn.Runner), window: 8, bs: 4}
			return rec, info, nil
		}, nil)
		info, err := a.Load(ctx, sdk.LoadRequest{Path: path, Options: opts(groups)}, nil)
		require.NoError(t, err)
		kv[k] = info.KVBytes
		toks[k] = generateAll(t, a, reqs)
		decoding[k] = rec.maxDecode.Load()
		require.NoError(t, a.Unload(ctx))
	}
	t.Logf("KV bytes shared %d, grouped %d; most sequences decoding at once: shared %d, grouped %d", kv[0], kv[1], decoding[0], decoding[1])
	assert.Equal(t, toks[0], toks[1], "same tokens")
	assert.InDelta(t, float64(kv[0]), float64(kv[1]), float64(kv[0])/25, "the same KV bytes")
	// a sequence decoding past position 200 holds >= 51 blocks of group 0
	assert.LessOrEqual(t, decoding[0], int64(4), "252 shared blocks hold 4 such sequences")
	assert.GreaterOrEqual(t, decoding[1], int64(7), "the grouped cache's ~440 full blocks hold 7 or 8")
}

// On a GPU (skipped without one; not a gpu-tagged file so that any GPU run
// of the package covers it): the grouped KV path gives the tokens of the
// shared path for the same requests, one stream at a time (both then run
// the same kernels on the same batch shapes: chunked prefill, then decode
// steps replayed as graphs).
func TestWindowKVDevice(t *testing.T) {
	if err := cuda.Available(); err != nil {
		t.Skipf("no usable GPU: %v", err)
	}
	g, err := cuda.New(0)
	require.NoError(t, err)
	t.Cleanup(func() { g.Close() })
	c := nntest.TinyGPU("gpt-oss")
	c.Layers = 4
	path := nntest.MustWrite(t, c)
	reqs := windowPrompts(4, 40, 23)
	run := func(opts nn.Options) [][]int32 {
		a, rec := serve(t, path, opts, engine.WithMaxBatchTokens(16), engine.WithMaxSequences(4))
		out := make([][]int32, len(reqs))
		for i, rq := range reqs {
			var err error
			out[i], _, err = generate(context.Background(), a, rq)
			require.NoError(t, err)
		}
		assert.Zero(t, rec.over.Load())
		return out
	}
	shared := run(nn.Options{Backend: g, NumBlocks: 128, ContextLength: 256, MaxTokens: 16, SharedKV: true})
	grouped := run(nn.Options{Backend: g, NumBlocks: 128, ContextLength: 256, MaxTokens: 16, MaxSequences: 4, StepTokens: 16})
	assert.Equal(t, shared, grouped)
}
