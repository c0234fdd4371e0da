package engine_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/engine/enginetest"
	"github.com/llama-orch/orch/sdk/ml"
)

type result struct {
	toks    []int32
	info    []sdk.TokenInfo
	finish  sdk.FinishReason
	timings *sdk.Timings
	chunks  int
	err     error
}

func collect(ctx context.Context, a sdk.Adapter, req sdk.GenerateRequest) result {
	var r result
	r.err = a.Generate(ctx, req, func(c sdk.Chunk) error {
		r.chunks++
		r.toks = append(r.toks, c.Tokens...)
		r.info = append(r.info, c.Info...)
		if c.Finish != sdk.FinishNone {
			r.finish, r.timings = c.Finish, c.Timings
		}
		return nil
	})
	return r
}

func load(t *testing.T, cfg enginetest.Config, opts ...engine.Option) (sdk.Adapter, *enginetest.Model) {
	t.Helper()
	var m *enginetest.Model
	a := engine.NewAdapter(enginetest.Loader(cfg, func(x *enginetest.Model) { m = x }), nil, opts...)
	_, err := a.Load(context.Background(), sdk.LoadRequest{Path: "fake"}, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = a.Unload(context.Background()) })
	return a, m
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func randPrompt(r *rand.Rand, n, vocab int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(r.IntN(vocab))
	}
	return p
}

// prompts returns n prompts of mixed lengths, some sharing prefixes.
func prompts(n, vocab int) [][]int32 {
	r := rand.New(rand.NewPCG(1, 2))
	shared := randPrompt(r, 13, vocab)
	out := make([][]int32, n)
	for i := range out {
		p := randPrompt(r, 3+7*i, vocab)
		if i%2 == 0 {
			p = append(append([]int32(nil), shared...), p...)
		}
		out[i] = p
	}
	return out
}

func greedy(p []int32, n int) sdk.GenerateRequest {
	return sdk.GenerateRequest{Prompt: p, MaxTokens: n}
}

// runConcurrent runs all requests at once and returns their results in order.
func runConcurrent(ctx context.Context, a sdk.Adapter, reqs []sdk.GenerateRequest) []result {
	res := make([]result, len(reqs))
	var wg sync.WaitGroup
	for i, rq := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = collect(ctx, a, rq)
		}()
	}
	wg.Wait()
	return res
}

func TestConcurrentStreamsMatchSolo(t *testing.T) {
	for _, dev := range []bool{false, true} {
		t.Run(fmt.Sprintf("device_greedy=%v", dev), func(t *testing.T) { testConcurrentStreamsMatchSolo(t, dev) })
	}
}

func testConcurrentStreamsMatchSolo(t *testing.T, deviceGreedy bool) {
	// A step cost lets all 8 streams join the batch even on a loaded 2-core machine.
	cfg := enginetest.Config{Vocab: 97, BlockSize: 4, NumBlocks: 512, ContextLength: 512, DeviceGreedy: deviceGreedy, StepCost: 2 * time.Millisecond}
	a, m := load(t, cfg, engine.WithMaxBatchTokens(32))
	ctx := ctxT(t)
	ps := prompts(8, cfg.Vocab)
	reqs := make([]sdk.GenerateRequest, len(ps))
	solo := make([][]int32, len(ps))
	for i, p := range ps {
		reqs[i] = greedy(p, 40)
		r := collect(ctx, a, reqs[i])
		require.NoError(t, r.err)
		assert.Equal(t, sdk.FinishLength, r.finish)
		assert.Equal(t, enginetest.Greedy(p, 40, cfg.Vocab), r.toks, "solo stream %d vs direct reference", i)
		solo[i] = r.toks
	}
	for round := 0; round < 2; round++ { // second round runs with a warm prefix cache
		res := runConcurrent(ctx, a, reqs)
		for i, r := range res {
			require.NoError(t, r.err)
			assert.Equal(t, solo[i], r.toks, "round %d stream %d", round, i)
			assert.Equal(t, 40, r.timings.GeneratedTokens)
			assert.Equal(t, len(ps[i]), r.timings.PromptTokens)
		}
	}
	assert.Greater(t, m.MaxBatchSeqs.Load(), int64(4), "streams were batched together")
	if deviceGreedy {
		assert.Equal(t, m.Forwards.Load(), m.GreedySteps.Load(), "all-greedy steps use the device argmax")
	} else {
		assert.Zero(t, m.GreedySteps.Load())
	}
	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Zero(t, st.KVUsedBlocks)
	assert.Zero(t, st.Running)
}

func TestThroughputScalesWithStreams(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, StepCost: 2 * time.Millisecond, TokenCost: 5 * time.Microsecond}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	ps := prompts(8, cfg.Vocab)
	rate := func(n int) float64 {
		reqs := make([]sdk.GenerateRequest, n)
		for i := range reqs {
			reqs[i] = greedy(ps[i], 24)
		}
		start := time.Now()
		res := runConcurrent(ctx, a, reqs)
		el := time.Since(start)
		total := 0
		for _, r := range res {
			require.NoError(t, r.err)
			total += len(r.toks)
		}
		return float64(total) / el.Seconds()
	}
	one, eight := rate(1), rate(8)
	t.Logf("aggregate decode: 1 stream %.0f tok/s, 8 streams %.0f tok/s", one, eight)
	assert.Greater(t, eight, 2*one)
}

// prefillWhileDecoding starts a greedy decode of short for n tokens, and once
// its first token streamed runs a greedy request of long for 8 tokens
// alongside it; both must give the reference tokens.
func prefillWhileDecoding(t *testing.T, a sdk.Adapter, vocab int, short []int32, n int, long []int32) {
	t.Helper()
	ctx := ctxT(t)
	started := make(chan struct{})
	var wg sync.WaitGroup
	var first result
	wg.Add(1)
	go func() {
		defer wg.Done()
		var once sync.Once
		first.err = a.Generate(ctx, greedy(short, n), func(c sdk.Chunk) error {
			first.toks = append(first.toks, c.Tokens...)
			once.Do(func() { close(started) })
			return nil
		})
	}()
	<-started
	second := collect(ctx, a, greedy(long, 8))
	wg.Wait()
	require.NoError(t, first.err)
	require.NoError(t, second.err)
	assert.Equal(t, enginetest.Greedy(short, n, vocab), first.toks)
	assert.Equal(t, enginetest.Greedy(long, 8, vocab), second.toks)
}

func TestChunkedPrefillMixesWithDecode(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, NumBlocks: 1024, ContextLength: 2048, StepCost: 200 * time.Microsecond}
	a, m := load(t, cfg, engine.WithMaxBatchTokens(16))
	r := rand.New(rand.NewPCG(3, 4))
	short, long := randPrompt(r, 5, cfg.Vocab), randPrompt(r, 400, cfg.Vocab)
	prefillWhileDecoding(t, a, cfg.Vocab, short, 120, long)
	assert.LessOrEqual(t, m.MaxChunk(), 16, "prefill chunked to the step budget")
	assert.Greater(t, m.MixedSteps.Load(), int64(10), "long prefill ran alongside the running decode")
}

// A step that carries decodes plans at most the mixed budget; a prefill
// alone gets the whole step budget.
func TestMixedStepBudget(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, NumBlocks: 1024, ContextLength: 2048, StepCost: 200 * time.Microsecond}
	a, m := load(t, cfg, engine.WithMaxBatchTokens(64), engine.WithMixedBatchTokens(16))
	r := rand.New(rand.NewPCG(7, 8))
	short, long := randPrompt(r, 5, cfg.Vocab), randPrompt(r, 400, cfg.Vocab)
	alone := collect(ctxT(t), a, greedy(long, 2))
	require.NoError(t, alone.err)
	assert.Equal(t, 64, m.MaxChunk(), "a prefill alone runs in whole-budget steps")
	prefillWhileDecoding(t, a, cfg.Vocab, short, 200, randPrompt(r, 400, cfg.Vocab))
	assert.Greater(t, m.MixedSteps.Load(), int64(10), "the prefill ran alongside the decode")
	assert.LessOrEqual(t, m.MaxMixed.Load(), int64(16), "steps with decodes keep to the mixed budget")
}

func TestPrefixReuse(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, BlockSize: 4}
	a, m := load(t, cfg)
	ctx := ctxT(t)
	r := rand.New(rand.NewPCG(5, 6))
	system := randPrompt(r, 32, cfg.Vocab) // 8 full blocks
	p1 := append(append([]int32(nil), system...), randPrompt(r, 6, cfg.Vocab)...)
	p2 := append(append([]int32(nil), system...), randPrompt(r, 9, cfg.Vocab)...)

	r1 := collect(ctx, a, greedy(p1, 10))
	require.NoError(t, r1.err)
	assert.Zero(t, r1.timings.CachedTokens)
	before := m.Tokens.Load()
	r2 := collect(ctx, a, greedy(p2, 10))
	require.NoError(t, r2.err)
	assert.Equal(t, 32, r2.timings.CachedTokens, "shared system prompt served from the cache")
	assert.Equal(t, enginetest.Greedy(p2, 10, cfg.Vocab), r2.toks)
	assert.Equal(t, int64(len(p2)-32+9), m.Tokens.Load()-before, "only the uncached suffix and decodes were computed")

	// The same prompt again, a whole number of blocks long: everything but the
	// last token is cached and the last block is copied before it is written.
	p3 := p1[:36]
	r3 := collect(ctx, a, greedy(p3, 10))
	require.NoError(t, r3.err)
	copies := m.Copies.Load()
	r4 := collect(ctx, a, greedy(p3, 10))
	require.NoError(t, r4.err)
	assert.Equal(t, 35, r4.timings.CachedTokens)
	assert.Equal(t, r3.toks, r4.toks)
	assert.Equal(t, enginetest.Greedy(p3, 10, cfg.Vocab), r4.toks)
	assert.Greater(t, m.Copies.Load(), copies, "copy-on-write of the shared last block")

	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, int64(4), st.PrefixQueries)
	assert.Equal(t, int64(3), st.PrefixHits)
}

func TestPrefixCacheOffComputesEverything(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64}
	a, m := load(t, cfg, engine.WithPrefixCache(false))
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]
	for i := 0; i < 2; i++ {
		r := collect(ctx, a, greedy(p, 5))
		require.NoError(t, r.err)
		assert.Zero(t, r.timings.CachedTokens)
	}
	assert.Equal(t, int64(2*(len(p)+4)), m.Tokens.Load())
}

func TestPreemptionUnderBlockPressure(t *testing.T) {
	for _, prefix := range []bool{true, false} {
		t.Run(fmt.Sprintf("prefix=%v", prefix), func(t *testing.T) {
			// 24 blocks of 4 = 96 tokens; 6 streams of 10+50 tokens need 360.
			cfg := enginetest.Config{Vocab: 64, BlockSize: 4, NumBlocks: 24, ContextLength: 96, StepCost: 200 * time.Microsecond}
			a, m := load(t, cfg, engine.WithPrefixCache(prefix), engine.WithMaxSequences(6))
			ctx := ctxT(t)
			r := rand.New(rand.NewPCG(7, 8))
			reqs := make([]sdk.GenerateRequest, 6)
			unique := 0
			for i := range reqs {
				reqs[i] = greedy(randPrompt(r, 10, cfg.Vocab), 50)
				unique += 10 + 49
			}
			res := runConcurrent(ctx, a, reqs)
			for i, rr := range res {
				require.NoError(t, rr.err)
				assert.Equal(t, enginetest.Greedy(reqs[i].Prompt, 50, cfg.Vocab), rr.toks, "stream %d", i)
			}
			assert.Greater(t, m.MaxBatchSeqs.Load(), int64(1))
			if !prefix {
				assert.Greater(t, m.Tokens.Load(), int64(unique), "preempted sequences were recomputed")
			}
			st, err := a.Stats(ctx)
			require.NoError(t, err)
			assert.Zero(t, st.KVUsedBlocks)
		})
	}
}

func TestCancellationFreesBlocks(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, StepCost: time.Millisecond}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]

	t.Run("cancel by id", func(t *testing.T) {
		got := make(chan struct{})
		var once sync.Once
		var r result
		done := make(chan struct{})
		go func() {
			defer close(done)
			r.err = a.Generate(ctx, sdk.GenerateRequest{ID: "req-1", Prompt: p, MaxTokens: 100000}, func(c sdk.Chunk) error {
				r.toks = append(r.toks, c.Tokens...)
				if c.Finish != sdk.FinishNone {
					r.finish, r.timings = c.Finish, c.Timings
				}
				once.Do(func() { close(got) })
				return nil
			})
		}()
		<-got
		st, err := a.Stats(ctx)
		require.NoError(t, err)
		assert.Positive(t, st.KVUsedBlocks)
		require.NoError(t, a.Cancel(ctx, "req-1"))
		<-done
		require.NoError(t, r.err)
		assert.Equal(t, sdk.FinishCanceled, r.finish)
		require.NotNil(t, r.timings)
		assert.Equal(t, len(r.toks), r.timings.GeneratedTokens)
		assert.Less(t, len(r.toks), 100000)
		st, err = a.Stats(ctx)
		require.NoError(t, err)
		assert.Zero(t, st.KVUsedBlocks)
		assert.Zero(t, st.Running)
	})

	t.Run("context canceled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		n := 0
		err := a.Generate(cctx, sdk.GenerateRequest{Prompt: p, MaxTokens: 100000}, func(c sdk.Chunk) error {
			n += len(c.Tokens)
			if n >= 3 {
				cancel()
			}
			return nil
		})
		require.ErrorIs(t, err, sdk.ErrCanceled)
		assert.Eventually(t, func() bool {
			st, err := a.Stats(ctx)
			return err == nil && st.KVUsedBlocks == 0 && st.Running == 0
		}, 2*time.Second, 5*time.Millisecond)
	})

	t.Run("emit error stops the stream", func(t *testing.T) {
		boom := fmt.Errorf("client went away")
		err := a.Generate(ctx, sdk.GenerateRequest{Prompt: p, MaxTokens: 100000}, func(c sdk.Chunk) error { return boom })
		require.ErrorIs(t, err, boom)
		assert.Eventually(t, func() bool {
			st, err := a.Stats(ctx)
			return err == nil && st.KVUsedBlocks == 0
		}, 2*time.Second, 5*time.Millisecond)
	})
}

func TestQueueBoundAndFIFO(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, StepCost: time.Millisecond}
	a, _ := load(t, cfg, engine.WithMaxSequences(1), engine.WithMaxQueue(1))
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]
	running := make(chan struct{})
	var once sync.Once
	errs := make(chan error, 2)
	go func() {
		errs <- a.Generate(ctx, sdk.GenerateRequest{ID: "a", Prompt: p, MaxTokens: 200}, func(sdk.Chunk) error {
			once.Do(func() { close(running) })
			return nil
		})
	}()
	<-running
	go func() {
		errs <- a.Generate(ctx, sdk.GenerateRequest{ID: "b", Prompt: p, MaxTokens: 2}, func(sdk.Chunk) error { return nil })
	}()
	require.Eventually(t, func() bool { st, _ := a.Stats(ctx); return st.Waiting == 1 }, 2*time.Second, time.Millisecond)
	err := a.Generate(ctx, sdk.GenerateRequest{ID: "c", Prompt: p, MaxTokens: 2}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, sdk.ErrBusy)
	require.NoError(t, a.Cancel(ctx, "a"))
	require.NoError(t, <-errs)
	require.NoError(t, <-errs)
}

func TestSeededSampling(t *testing.T) {
	cfg := enginetest.Config{Vocab: 200}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	ps := prompts(6, cfg.Vocab)
	sampled := func(p []int32, seed uint64) sdk.GenerateRequest {
		return sdk.GenerateRequest{Prompt: p, MaxTokens: 30, Sampling: sdk.SamplingParams{
			Temperature: 1.5, TopK: 50, TopP: 0.95, MinP: 0.01, Seed: seed, HasSeed: true,
			RepetitionPenalty: 1.1, PresencePenalty: 0.2, FrequencyPenalty: 0.1,
		}}
	}
	alone := collect(ctx, a, sampled(ps[0], 42))
	require.NoError(t, alone.err)
	reqs := []sdk.GenerateRequest{sampled(ps[0], 42)}
	for _, p := range ps[1:] {
		reqs = append(reqs, sampled(p, 7))
	}
	res := runConcurrent(ctx, a, reqs)
	require.NoError(t, res[0].err)
	assert.Equal(t, alone.toks, res[0].toks, "same seed, same tokens, whatever the batch")
	other := collect(ctx, a, sampled(ps[0], 43))
	require.NoError(t, other.err)
	assert.NotEqual(t, alone.toks, other.toks, "another seed gives another sample")
	assert.NotEqual(t, enginetest.Greedy(ps[0], 30, cfg.Vocab), alone.toks, "sampling is not greedy")
}

func TestStopTokensAndLimits(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, ContextLength: 64, NumBlocks: 64}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]
	ref := enginetest.Greedy(p, 40, cfg.Vocab)
	stop := ref[5]
	first := 0
	for ref[first] != stop {
		first++
	}

	r := collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: 40, StopTokens: []int32{stop}})
	require.NoError(t, r.err)
	assert.Equal(t, sdk.FinishStop, r.finish)
	assert.Equal(t, ref[:first+1], r.toks, "stops after the stop token, which is included")

	r = collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: 12, MinTokens: 12, StopTokens: []int32{stop}})
	require.NoError(t, r.err)
	assert.Equal(t, sdk.FinishLength, r.finish)
	assert.Len(t, r.toks, 12)
	assert.NotContains(t, r.toks, stop, "stop tokens cannot be sampled before MinTokens")

	// Context limit: the sequence fills all 64 positions, plus the last token.
	r = collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: 1000})
	require.NoError(t, r.err)
	assert.Equal(t, sdk.FinishLength, r.finish)
	assert.Equal(t, 64+1, len(p)+len(r.toks))

	long := make([]int32, 65)
	r = collect(ctx, a, sdk.GenerateRequest{Prompt: long, MaxTokens: 1})
	require.ErrorIs(t, r.err, sdk.ErrContextTooLong)
	r = collect(ctx, a, sdk.GenerateRequest{Prompt: []int32{1, 64}, MaxTokens: 1})
	require.ErrorIs(t, r.err, sdk.ErrInvalidArgument)
	r = collect(ctx, a, sdk.GenerateRequest{MaxTokens: 1})
	require.ErrorIs(t, r.err, sdk.ErrInvalidArgument)
	r = collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: 1, Sampling: sdk.SamplingParams{TopP: 2}})
	require.ErrorIs(t, r.err, sdk.ErrInvalidArgument)
}

func TestLogprobs(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]
	r := collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: 6, Logprobs: true, TopLogprobs: 3})
	require.NoError(t, r.err)
	require.Len(t, r.info, len(r.toks))
	for i, in := range r.info {
		require.Len(t, in.Top, 3)
		assert.Equal(t, r.toks[i], in.Top[0].Token, "greedy picks the most likely token")
		assert.InDelta(t, in.Top[0].Logprob, in.Logprob, 1e-6)
		assert.LessOrEqual(t, in.Logprob, float32(0))
		assert.GreaterOrEqual(t, in.Top[0].Logprob, in.Top[1].Logprob)
		assert.GreaterOrEqual(t, in.Top[1].Logprob, in.Top[2].Logprob)
	}
	r = collect(ctx, a, greedy(p, 3))
	require.NoError(t, r.err)
	assert.Empty(t, r.info)
}

func TestEvaluate(t *testing.T) {
	cfg := enginetest.Config{Vocab: 32, BlockSize: 4}
	a, m := load(t, cfg, engine.WithMaxBatchTokens(16))
	ctx := ctxT(t)
	toks := prompts(4, cfg.Vocab)[3] // 13+3+21 = 37 tokens: several chunks
	// Run generations alongside to mix the evaluation into busy batches.
	var wg sync.WaitGroup
	for _, p := range prompts(3, cfg.Vocab) {
		wg.Add(1)
		go func() { defer wg.Done(); assert.NoError(t, collect(ctx, a, greedy(p, 20)).err) }()
	}
	got, err := a.Evaluate(ctx, toks)
	wg.Wait()
	require.NoError(t, err)
	require.Equal(t, len(toks), got.Rows)
	require.Equal(t, cfg.Vocab, got.Vocab)
	h := enginetest.Root
	for i, tk := range toks {
		h = enginetest.Step(h, tk, i)
		want := enginetest.Logits(h, cfg.Vocab, nil)
		require.Equal(t, want, got.Data[i*cfg.Vocab:(i+1)*cfg.Vocab], "row %d", i)
	}
	assert.LessOrEqual(t, m.MaxChunk(), 16)
	_, err = a.Evaluate(ctx, nil)
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestLifecycle(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, StepCost: time.Millisecond}
	a := engine.NewAdapter(enginetest.Loader(cfg, nil), nil)
	ctx := ctxT(t)
	p := prompts(1, cfg.Vocab)[0]
	require.ErrorIs(t, collect(ctx, a, greedy(p, 1)).err, sdk.ErrNotLoaded)
	_, err := a.Evaluate(ctx, p)
	require.ErrorIs(t, err, sdk.ErrNotLoaded)
	_, err = a.Stats(ctx)
	require.ErrorIs(t, err, sdk.ErrNotLoaded)

	info, err := a.Load(ctx, sdk.LoadRequest{Path: "x", Options: sdk.LoadOptions{ContextLength: 100, MaxSequences: 3}}, nil)
	require.NoError(t, err)
	assert.Equal(t, 100, info.ContextLength)
	assert.Equal(t, 3, info.MaxSequences)
	assert.Equal(t, 64, info.VocabSize)
	_, err = a.Load(ctx, sdk.LoadRequest{Path: "x"}, nil)
	require.ErrorIs(t, err, sdk.ErrAlreadyLoaded)

	// Unload with streams running and waiting: they end with an error, nothing hangs.
	var wg sync.WaitGroup
	errs := make([]error, 5)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = collect(ctx, a, greedy(p, 1000)).err }()
	}
	require.Eventually(t, func() bool { st, _ := a.Stats(ctx); return st.Running == 3 && st.Waiting == 2 }, 2*time.Second, time.Millisecond)
	require.NoError(t, a.Unload(ctx))
	wg.Wait()
	for _, err := range errs {
		require.ErrorIs(t, err, sdk.ErrNotLoaded)
	}
	require.ErrorIs(t, collect(ctx, a, greedy(p, 1)).err, sdk.ErrNotLoaded)

	// Load again works.
	_, err = a.Load(ctx, sdk.LoadRequest{Path: "x"}, nil)
	require.NoError(t, err)
	r := collect(ctx, a, greedy(p, 4))
	require.NoError(t, r.err)
	assert.Equal(t, enginetest.Greedy(p, 4, cfg.Vocab), r.toks)
	require.NoError(t, a.Unload(ctx))
}

func TestPlanner(t *testing.T) {
	plain := engine.NewAdapter(enginetest.Loader(enginetest.Config{}, nil), nil)
	_, ok := plain.(sdk.Planner)
	assert.False(t, ok, "no planner given: no sdk.Planner")

	planned := engine.NewAdapter(enginetest.Loader(enginetest.Config{}, nil), nil,
		engine.WithPlanner(func(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
			blocks, err := engine.PlanKV(engine.KVRequest{BlockBytes: 1 << 20, BlockSize: 16, ContextLength: 4096, MaxSequences: 4}, 0, 0, 0)
			if err != nil {
				return sdk.MemoryPlan{}, err
			}
			return engine.Plan("cuda:0", 10<<30, blocks, 1<<20, 1<<30, 16<<30)
		}))
	pl, ok := planned.(sdk.Planner)
	require.True(t, ok)
	plan, err := pl.Plan(context.Background(), sdk.LoadRequest{Path: "x"})
	require.NoError(t, err)
	assert.Equal(t, int64(1024)<<20, plan.KVBytes)
	assert.Equal(t, int64(10<<30+1<<30+1<<30), plan.Total())

	_, err = engine.Plan("cuda:0", 20<<30, 10, 1<<20, 0, 16<<30)
	var oom *sdk.OutOfMemoryError
	require.ErrorAs(t, err, &oom)
	assert.Equal(t, int64(16<<30), oom.Free)

	blocks, err := engine.PlanKV(engine.KVRequest{BlockBytes: 1 << 20, BlockSize: 16, ContextLength: 4096, Fraction: 0.5}, 20<<30, 10<<30, 2<<30)
	require.NoError(t, err)
	assert.Equal(t, 4096, blocks)
	_, err = engine.PlanKV(engine.KVRequest{}, 0, 0, 0)
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

// failingModel errors on the n-th Forward and panics on the m-th.
type failingModel struct {
	*enginetest.Model
	calls, failAt, panicAt int
}

func (f *failingModel) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	f.calls++
	if f.calls == f.failAt {
		return nil, fmt.Errorf("device lost")
	}
	if f.calls == f.panicAt {
		panic("kernel bug")
	}
	return f.Model.Forward(ctx, b)
}

func TestModelErrorsFailRequestsNotTheAdapter(t *testing.T) {
	fm := &failingModel{Model: enginetest.New(enginetest.Config{}), failAt: 3, panicAt: 6}
	a := engine.NewAdapter(func(context.Context, sdk.LoadRequest, func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		return fm, sdk.ModelInfo{}, nil
	}, nil)
	ctx := ctxT(t)
	_, err := a.Load(ctx, sdk.LoadRequest{}, nil)
	require.NoError(t, err)
	defer a.Unload(ctx)
	p := prompts(1, 64)[0]
	r := collect(ctx, a, greedy(p, 10))
	require.ErrorContains(t, r.err, "device lost")
	r = collect(ctx, a, greedy(p, 10))
	require.ErrorContains(t, r.err, "kernel bug")
	r = collect(ctx, a, greedy(p, 10))
	require.NoError(t, r.err)
	assert.Equal(t, enginetest.Greedy(p, 10, 64), r.toks)
	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Zero(t, st.KVUsedBlocks)
}

func TestDeviceGreedyMixedWithHostSampling(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, DeviceGreedy: true, StepCost: 100 * time.Microsecond}
	a, m := load(t, cfg)
	ctx := ctxT(t)
	ps := prompts(4, cfg.Vocab)
	reqs := []sdk.GenerateRequest{
		greedy(ps[0], 30),
		{Prompt: ps[1], MaxTokens: 10, Logprobs: true},                                       // needs host logits
		{Prompt: ps[2], MaxTokens: 30, Sampling: sdk.SamplingParams{RepetitionPenalty: 1.3}}, // host penalties
		greedy(ps[3], 50),
	}
	res := runConcurrent(ctx, a, reqs)
	for i, r := range res {
		require.NoError(t, r.err)
		if i != 2 {
			assert.Equal(t, enginetest.Greedy(reqs[i].Prompt, reqs[i].MaxTokens, cfg.Vocab), r.toks, "request %d", i)
		}
	}
	assert.Len(t, res[1].info, 10)
	assert.Positive(t, m.GreedySteps.Load(), "steps with only plain greedy sequences use the device")
	assert.Less(t, m.GreedySteps.Load(), m.Forwards.Load(), "steps needing host logits do not")
	got, err := a.Evaluate(ctx, ps[0])
	require.NoError(t, err)
	assert.Equal(t, len(ps[0]), got.Rows)
}

func TestCallsDuringLoadDoNotBlock(t *testing.T) {
	release, started := make(chan struct{}), make(chan struct{})
	inner := enginetest.Loader(enginetest.Config{}, nil)
	a := engine.NewAdapter(func(ctx context.Context, req sdk.LoadRequest, p func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		close(started)
		<-release
		return inner(ctx, req, p)
	}, nil)
	ctx := ctxT(t)
	done := make(chan error, 1)
	go func() { _, err := a.Load(ctx, sdk.LoadRequest{Path: "slow"}, nil); done <- err }()
	<-started
	_, err := a.Load(ctx, sdk.LoadRequest{Path: "again"}, nil)
	require.ErrorIs(t, err, sdk.ErrAlreadyLoaded, "a second Load while loading is refused")
	_, err = a.Stats(ctx)
	require.ErrorIs(t, err, sdk.ErrNotLoaded, "Stats answers at once while loading")
	close(release)
	require.NoError(t, <-done)
	_, err = a.Stats(ctx)
	require.NoError(t, err)
	require.NoError(t, a.Unload(ctx))
}

func TestFullPoolPromptWithCachedPrefix(t *testing.T) {
	// The prompt fills the whole pool; on a repeat every block is a cache hit
	// and copy-on-write of the last one would need a fifth block: the engine
	// falls back to recomputing instead of waiting forever.
	cfg := enginetest.Config{Vocab: 64, BlockSize: 4, NumBlocks: 4, ContextLength: 16}
	a, _ := load(t, cfg)
	ctx := ctxT(t)
	p := randPrompt(rand.New(rand.NewPCG(9, 9)), 16, cfg.Vocab)
	for i := 0; i < 2; i++ {
		r := collect(ctx, a, greedy(p, 5))
		require.NoError(t, r.err)
		assert.Equal(t, enginetest.Greedy(p, 1, cfg.Vocab), r.toks, "context full after one token")
		assert.Equal(t, sdk.FinishLength, r.finish)
	}
	p2 := append(append([]int32(nil), p[:12]...), 1, 2) // 3 cached blocks + 2 tokens
	r := collect(ctx, a, greedy(p2, 3))
	require.NoError(t, r.err)
	assert.Equal(t, 12, r.timings.CachedTokens)
	assert.Equal(t, enginetest.Greedy(p2, 3, cfg.Vocab), r.toks)
}

// TestStress throws random requests at a small pool: shared prefixes,
// preemption, chunked prefill, cancellations, evaluations and sampled
// requests all at once. Every completed greedy stream must equal the direct
// reference, every evaluation the reference logits, and the pool must end
// empty.
func TestStress(t *testing.T) {
	for _, tc := range []struct {
		dev    bool
		window int  // > 0: a window KV group of 16 blocks
		sample bool // device sampling (enginetest.DeviceSampler)
	}{{false, 0, false}, {true, 0, false}, {false, 5, false}, {true, 7, false}, {true, 0, true}, {true, 5, true}} {
		dev := tc.dev
		t.Run(fmt.Sprintf("device_greedy=%v/window=%d/device_sample=%v", dev, tc.window, tc.sample), func(t *testing.T) {
			cfg := enginetest.Config{Vocab: 48, BlockSize: 4, NumBlocks: 40, ContextLength: 120,
				StepCost: 50 * time.Microsecond, DeviceGreedy: dev, Window: tc.window, WindowBlocks: 16, DeviceSample: tc.sample}
			a, _ := load(t, cfg, engine.WithMaxBatchTokens(24), engine.WithMaxSequences(6), engine.WithMaxQueue(1000))
			ctx := ctxT(t)
			r := rand.New(rand.NewPCG(11, 12))
			bases := [][]int32{randPrompt(r, 20, cfg.Vocab), randPrompt(r, 9, cfg.Vocab)}
			var wg sync.WaitGroup
			for i := range 60 {
				p := randPrompt(r, 1+r.IntN(30), cfg.Vocab)
				if r.IntN(2) == 0 {
					p = append(append([]int32(nil), bases[r.IntN(2)]...), p...)
				}
				n := 1 + r.IntN(40)
				kind := r.IntN(10)
				wg.Add(1)
				go func() {
					defer wg.Done()
					switch {
					case kind == 0: // evaluation
						got, err := a.Evaluate(ctx, p)
						if !assert.NoError(t, err) {
							return
						}
						h := enginetest.Root
						for i, tk := range p {
							h = enginetest.Step(h, tk, i)
						}
						assert.Equal(t, enginetest.Logits(h, cfg.Vocab, nil), got.Data[(len(p)-1)*cfg.Vocab:])
					case kind == 1: // canceled after a few tokens
						cctx, cancel := context.WithCancel(ctx)
						defer cancel()
						seen := 0
						err := a.Generate(cctx, greedy(p, 1000), func(c sdk.Chunk) error {
							seen += len(c.Tokens)
							if seen >= 3 {
								cancel()
							}
							return nil
						})
						assert.ErrorIs(t, err, sdk.ErrCanceled)
					case kind == 2: // sampled with penalties and logprobs
						res := collect(ctx, a, sdk.GenerateRequest{ID: fmt.Sprintf("s%d", i), Prompt: p, MaxTokens: n, Logprobs: true,
							Sampling: sdk.SamplingParams{Temperature: 0.9, TopP: 0.9, PresencePenalty: 0.5, Seed: uint64(i), HasSeed: true}})
						assert.NoError(t, res.err)
						assert.Len(t, res.info, len(res.toks))
					case kind == 3: // seeded, drawn on the device when it can: the reference's tokens despite
						// preemption, chunked prefill and whatever else shares the steps
						sp := ml.SampleParams{Temperature: 0.8, TopK: 10, TopP: 0.9, Seed: uint64(1000 + i)}
						res := collect(ctx, a, sdk.GenerateRequest{Prompt: p, MaxTokens: n, Sampling: sdk.SamplingParams{
							Temperature: sp.Temperature, TopK: int(sp.TopK), TopP: sp.TopP, Seed: sp.Seed, HasSeed: true}})
						if !assert.NoError(t, res.err) || !tc.sample {
							return
						}
						want := enginetest.Sampled(p, n, cfg.Vocab, sp)
						if len(p)+n > cfg.ContextLength+1 {
							want = want[:cfg.ContextLength+1-len(p)]
						}
						assert.Equal(t, want, res.toks, "seeded device-sampled request %d", i)
					default:
						res := collect(ctx, a, greedy(p, n))
						if !assert.NoError(t, res.err) {
							return
						}
						want := enginetest.Greedy(p, n, cfg.Vocab)
						if len(p)+n > cfg.ContextLength+1 {
							want = want[:cfg.ContextLength+1-len(p)]
						}
						assert.Equal(t, want, res.toks)
					}
				}()
				if r.IntN(3) == 0 {
					time.Sleep(time.Duration(r.IntN(2000)) * time.Microsecond)
				}
			}
			wg.Wait()
			assert.Eventually(t, func() bool {
				st, err := a.Stats(ctx)
				return err == nil && st.KVUsedBlocks == 0 && st.Running == 0 && st.Waiting == 0
			}, 2*time.Second, 5*time.Millisecond)
		})
	}
}

func TestLoadOptionsExtra(t *testing.T) {
	var m *enginetest.Model
	a := engine.NewAdapter(enginetest.Loader(enginetest.Config{}, func(x *enginetest.Model) { m = x }), nil)
	ctx := ctxT(t)
	for _, bad := range []map[string]string{
		{engine.ExtraMaxBatchTokens: "0"},
		{engine.ExtraMaxQueue: "x"},
		{engine.ExtraPrefixCache: "maybe"},
	} {
		_, err := a.Load(ctx, sdk.LoadRequest{Options: sdk.LoadOptions{Extra: bad}}, nil)
		require.ErrorIs(t, err, sdk.ErrInvalidArgument, "%v", bad)
	}
	_, err := a.Load(ctx, sdk.LoadRequest{Options: sdk.LoadOptions{MaxSequences: 4, Extra: map[string]string{
		engine.ExtraMaxBatchTokens: "8", engine.ExtraPrefixCache: "false", "other.key": "ignored"}}}, nil)
	require.NoError(t, err)
	defer a.Unload(ctx)
	p := prompts(4, 64)[3]
	for range 2 {
		r := collect(ctx, a, greedy(p, 3))
		require.NoError(t, r.err)
		assert.Zero(t, r.timings.CachedTokens)
	}
	assert.Equal(t, 8, m.MaxChunk())
}

func TestAdmissionIsFIFO(t *testing.T) {
	cfg := enginetest.Config{Vocab: 64, StepCost: 300 * time.Microsecond}
	a, _ := load(t, cfg, engine.WithMaxSequences(2))
	ctx := ctxT(t)
	ps := prompts(8, cfg.Vocab)
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	var finished atomic.Int32
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer finished.Add(1)
			first := true
			assert.NoError(t, a.Generate(ctx, greedy(p, 100), func(c sdk.Chunk) error {
				if first && len(c.Tokens) > 0 {
					first = false
					mu.Lock()
					order = append(order, i)
					mu.Unlock()
				}
				return nil
			}))
		}()
		// Submit in a known order, faster than requests finish.
		require.Eventually(t, func() bool {
			st, _ := a.Stats(ctx)
			return st.Running+st.Waiting+int(finished.Load()) == i+1
		}, time.Second, 50*time.Microsecond)
	}
	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Positive(t, st.Waiting, "requests queued up")
	wg.Wait()
	require.Len(t, order, len(ps))
	// With two slots, request i starts no later than request i+2.
	pos := make([]int, len(ps))
	for k, i := range order {
		pos[i] = k
	}
	for i := 0; i+2 < len(ps); i++ {
		assert.Less(t, pos[i], pos[i+2], "order %v", order)
	}
}

// TestDeviceSampling: requests that need nothing on the host are drawn by
// the model's device sampler (SamplingModel), with the seed and the token's
// index: a seeded request gives the same tokens alone and in any batch, and
// the tokens of the reference (enginetest.Sampled). Greedy, logprobs,
// penalty and stop-masked requests in the same steps keep their paths
// (device argmax rows, host rows).
func TestDeviceSampling(t *testing.T) {
	cfg := enginetest.Config{Vocab: 200, DeviceSample: true, StepCost: 100 * time.Microsecond}
	a, m := load(t, cfg)
	ctx := ctxT(t)
	ps := prompts(7, cfg.Vocab)
	sp := sdk.SamplingParams{Temperature: 1.2, TopK: 50, TopP: 0.95, MinP: 0.01, Seed: 42, HasSeed: true}
	ref := enginetest.Sampled(ps[0], 30, cfg.Vocab, ml.SampleParams{Temperature: 1.2, TopK: 50, TopP: 0.95, MinP: 0.01, Seed: 42})
	alone := collect(ctx, a, sdk.GenerateRequest{Prompt: ps[0], MaxTokens: 30, Sampling: sp})
	require.NoError(t, alone.err)
	assert.Equal(t, ref, alone.toks, "the device draw with (seed, token index)")
	assert.NotEqual(t, enginetest.Greedy(ps[0], 30, cfg.Vocab), alone.toks, "sampling is not greedy")
	rows := m.SampledRows.Load()
	assert.Equal(t, int64(30), rows, "every token drawn on the device")

	stop := enginetest.Greedy(ps[5], 10, cfg.Vocab)[3]
	reqs := []sdk.GenerateRequest{
		{Prompt: ps[0], MaxTokens: 30, Sampling: sp},
		greedy(ps[1], 25),
		{Prompt: ps[2], MaxTokens: 10, Logprobs: true, Sampling: sdk.SamplingParams{Temperature: 1, Seed: 1, HasSeed: true}}, // host
		{Prompt: ps[3], MaxTokens: 20, Sampling: sdk.SamplingParams{Temperature: 1, RepetitionPenalty: 1.3}},                 // host
		{Prompt: ps[4], MaxTokens: 40, Sampling: sdk.SamplingParams{Temperature: 0.8, Seed: 9, HasSeed: true}},
		{Prompt: ps[5], MaxTokens: 12, MinTokens: 6, StopTokens: []int32{stop}, Sampling: sdk.SamplingParams{Temperature: 1, TopP: 0.5}},
		{Prompt: ps[6], MaxTokens: 15, Logprobs: true}, // greedy with logprobs: host
	}
	res := runConcurrent(ctx, a, reqs)
	for i, r := range res {
		require.NoError(t, r.err, "request %d", i)
	}
	assert.Equal(t, alone.toks, res[0].toks, "same seed, same tokens, whatever the batch")
	assert.Equal(t, enginetest.Greedy(ps[1], 25, cfg.Vocab), res[1].toks, "greedy rows: the device argmax")
	assert.Equal(t, enginetest.Sampled(ps[4], 40, cfg.Vocab, ml.SampleParams{Temperature: 0.8, Seed: 9}), res[4].toks)
	assert.Equal(t, enginetest.Greedy(ps[6], 15, cfg.Vocab), res[6].toks)
	assert.Len(t, res[2].info, 10, "logprobs: host rows")
	assert.Len(t, res[6].info, 15)
	assert.NotContains(t, res[5].toks[:6], stop, "stop tokens masked on the host before MinTokens")
	// device rows: request 0 (30), greedy 1 unless it ran in a greedy-only step, 4 (40), 5 after MinTokens
	drawn := m.SampledRows.Load() - rows
	assert.GreaterOrEqual(t, drawn, int64(30+40+(len(res[5].toks)-6)))
	assert.Less(t, drawn, int64(30+25+40+12+1), "host rows are not drawn on the device")
	assert.Positive(t, m.SampleSteps.Load())

	// The seeded host-sampled request (logprobs) is unchanged by device sampling elsewhere.
	h := collect(ctx, a, reqs[2])
	require.NoError(t, h.err)
	assert.Equal(t, h.toks, res[2].toks, "host streams are seeded as before")
}

// engine.device_sample=false (or WithDeviceSampling(false)) keeps every
// sampled token on the host.
func TestDeviceSamplingSwitch(t *testing.T) {
	cfg := enginetest.Config{Vocab: 100, DeviceSample: true}
	req := sdk.GenerateRequest{Prompt: prompts(1, cfg.Vocab)[0], MaxTokens: 20, Sampling: sdk.SamplingParams{Temperature: 1, Seed: 5, HasSeed: true}}
	for _, c := range []struct {
		name  string
		opts  []engine.Option
		extra map[string]string
	}{
		{"option", []engine.Option{engine.WithDeviceSampling(false)}, nil},
		{"extra", nil, map[string]string{engine.ExtraDeviceSample: "false"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var m *enginetest.Model
			a := engine.NewAdapter(enginetest.Loader(cfg, func(x *enginetest.Model) { m = x }), nil, c.opts...)
			ctx := ctxT(t)
			_, err := a.Load(ctx, sdk.LoadRequest{Path: "fake", Options: sdk.LoadOptions{Extra: c.extra}}, nil)
			require.NoError(t, err)
			defer a.Unload(context.Background())
			r := collect(ctx, a, req)
			require.NoError(t, r.err)
			assert.Len(t, r.toks, 20)
			assert.Zero(t, m.SampleSteps.Load())
			assert.Positive(t, m.Forwards.Load())
		})
	}
	a := engine.NewAdapter(enginetest.Loader(cfg, nil), nil)
	_, err := a.Load(ctxT(t), sdk.LoadRequest{Path: "fake", Options: sdk.LoadOptions{Extra: map[string]string{engine.ExtraDeviceSample: "maybe"}}}, nil)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}
