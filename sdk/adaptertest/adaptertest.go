// Package adaptertest is the adapter conformance kit: one call,
// Run(t, factory, opts), runs sub-tests against an adapter over the real
// gRPC wire (the same server options, interceptors, converters and error
// mapping as sdk.Serve, on an in-process connection), in the spirit of
// testing/fstest.TestFS and golang.org/x/net/nettest.TestConn.
//
// The kit does not know architectures: the caller provides a model file the
// adapter serves (Options.ModelPath) and optionally one of an architecture
// it does not serve (Options.UnsupportedModelPath).
package adaptertest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/llama-orch/orch/sdk"
)

// Options configure Run.
type Options struct {
	// Info is what the adapter's main passes to sdk.Serve; Describe must
	// return it.
	Info sdk.Info
	// ModelPath is a model file of an architecture in Info.Architectures
	// (required).
	ModelPath string
	// UnsupportedModelPath is a valid model file of an architecture the
	// adapter does not serve; the sub-test is skipped when empty.
	UnsupportedModelPath string
	// LoadOptions are used for every Load (e.g. a small ContextLength and
	// Device "cpu" for fast tests).
	LoadOptions sdk.LoadOptions
	// Prompt is a short prompt of valid token ids (default {1, 2, 3}).
	Prompt []int32
	// MaxTokens is the length of the reference generation (default 8).
	MaxTokens int
	// Concurrency is the number of concurrent requests (default 4).
	Concurrency int
	// Timeout bounds each sub-test (default 2 minutes).
	Timeout time.Duration
	// SkipEvaluateGreedyCheck skips checking that the argmax of Evaluate's
	// last row equals the first greedy token (for adapters whose batched and
	// single-token paths may round differently).
	SkipEvaluateGreedyCheck bool
}

// Connect serves impl over an in-process gRPC connection set up exactly as
// sdk.Serve sets up the real one, and returns the host-side client. The
// server stops when the test ends.
func Connect(t testing.TB, info sdk.Info, impl sdk.Adapter, logger hclog.Logger) sdk.RemoteAdapter {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(sdk.ServerOptions(logger)...)
	sdk.RegisterAdapter(srv, info, impl, logger)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///adaptertest",
		append(sdk.ClientDialOptions(),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	require.NoError(t, err, "dial in-process adapter")
	t.Cleanup(func() {
		_ = conn.Close()
		srv.Stop()
	})
	return sdk.NewRemoteAdapter(conn)
}

// Run runs the conformance sub-tests against the adapter built by factory.
func Run(t *testing.T, factory func(hclog.Logger) (sdk.Adapter, error), opts Options) {
	t.Helper()
	if opts.ModelPath == "" {
		t.Fatal("adaptertest: Options.ModelPath is required")
	}
	if len(opts.Prompt) == 0 {
		opts.Prompt = []int32{1, 2, 3}
	}
	if opts.MaxTokens <= 0 {
		opts.MaxTokens = 8
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 4
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Minute
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "adapter", Level: hclog.Warn, Output: testWriter{t}})
	impl, err := factory(logger)
	require.NoError(t, err, "factory")
	require.NotNil(t, impl, "factory returned a nil adapter")
	k := &kit{opts: opts, a: Connect(t, opts.Info, impl, logger)}
	t.Cleanup(func() { _ = k.a.Unload(context.Background()) })

	k.run(t, "describe", k.describe)
	k.run(t, "not_loaded", k.notLoaded)
	k.run(t, "unsupported_architecture", k.unsupported)
	if !k.run(t, "load", k.load) {
		return // nothing below can work without a model
	}
	if !k.run(t, "generate_max_tokens", k.generateMaxTokens) {
		return // the reference generation is needed below
	}
	k.run(t, "generate_logprobs", k.generateLogprobs)
	k.run(t, "stop_tokens", k.stopTokens)
	k.run(t, "cancel_context", k.cancelContext)
	k.run(t, "cancel_by_id", k.cancelByID)
	k.run(t, "concurrent", k.concurrent)
	k.run(t, "evaluate", k.evaluate)
	k.run(t, "error_mapping", k.errorMapping)
	k.run(t, "stats", k.stats)
	k.run(t, "unload_reload", k.unloadReload)
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

type kit struct {
	opts Options
	a    sdk.RemoteAdapter
	info sdk.ModelInfo
	ref  []int32 // greedy reference continuation of opts.Prompt
}

func (k *kit) run(t *testing.T, name string, f func(t *testing.T, ctx context.Context)) bool {
	return t.Run(name, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), k.opts.Timeout)
		defer cancel()
		f(t, ctx)
	})
}

func (k *kit) greedy(n int) sdk.GenerateRequest {
	return sdk.GenerateRequest{Prompt: k.opts.Prompt, MaxTokens: n}
}

// collect runs a generation and gathers its chunks.
func collect(ctx context.Context, a sdk.Adapter, req sdk.GenerateRequest) ([]int32, []sdk.Chunk, error) {
	var toks []int32
	var chunks []sdk.Chunk
	err := a.Generate(ctx, req, func(c sdk.Chunk) error {
		toks = append(toks, c.Tokens...)
		chunks = append(chunks, c)
		return nil
	})
	return toks, chunks, err
}

// checkStream checks the chunk invariants: only the last chunk finishes,
// it carries timings, and every token is in the vocabulary.
func (k *kit) checkStream(t *testing.T, chunks []sdk.Chunk) sdk.FinishReason {
	t.Helper()
	require.NotEmpty(t, chunks, "a finished generation sends at least one chunk")
	for i, c := range chunks[:len(chunks)-1] {
		assert.Equal(t, sdk.FinishNone, c.Finish, "chunk %d of %d has a finish reason", i, len(chunks))
	}
	last := chunks[len(chunks)-1]
	assert.NotEqual(t, sdk.FinishNone, last.Finish, "the last chunk must carry the finish reason")
	assert.NotNil(t, last.Timings, "the last chunk must carry timings")
	for _, c := range chunks {
		for _, tok := range c.Tokens {
			assert.True(t, tok >= 0 && int(tok) < k.info.VocabSize, "token %d outside the vocabulary of %d", tok, k.info.VocabSize)
		}
	}
	return last.Finish
}

func (k *kit) describe(t *testing.T, ctx context.Context) {
	info, err := k.a.Describe(ctx)
	require.NoError(t, err)
	assert.NotEmpty(t, info.Name, "name")
	assert.NotEmpty(t, info.Architectures, "architectures")
	assert.Equal(t, k.opts.Info, info, "Describe must return the Info given to Serve")
}

func (k *kit) notLoaded(t *testing.T, ctx context.Context) {
	_, _, err := collect(ctx, k.a, k.greedy(2))
	assert.ErrorIs(t, err, sdk.ErrNotLoaded, "generate before load")
	_, err = k.a.Evaluate(ctx, k.opts.Prompt)
	assert.ErrorIs(t, err, sdk.ErrNotLoaded, "evaluate before load")
}

func (k *kit) unsupported(t *testing.T, ctx context.Context) {
	if k.opts.UnsupportedModelPath == "" {
		t.Skip("no Options.UnsupportedModelPath")
	}
	_, err := k.a.Load(ctx, sdk.LoadRequest{Path: k.opts.UnsupportedModelPath, Options: k.opts.LoadOptions}, func(sdk.LoadProgress) {})
	require.Error(t, err)
	assert.ErrorIs(t, err, sdk.ErrUnsupportedArchitecture)
	// A failed load leaves nothing behind.
	_, _, err = collect(ctx, k.a, k.greedy(2))
	assert.ErrorIs(t, err, sdk.ErrNotLoaded, "generate after a failed load")
}

func (k *kit) load(t *testing.T, ctx context.Context) {
	var mu sync.Mutex
	var progress []sdk.LoadProgress
	info, err := k.a.Load(ctx, sdk.LoadRequest{Path: k.opts.ModelPath, Options: k.opts.LoadOptions}, func(p sdk.LoadProgress) {
		mu.Lock()
		progress = append(progress, p)
		mu.Unlock()
	})
	require.NoError(t, err, "load %s", k.opts.ModelPath)
	assert.Contains(t, k.opts.Info.Architectures, info.Architecture, "loaded architecture must be a declared one")
	require.Positive(t, info.VocabSize, "vocab size")
	require.Greater(t, info.ContextLength, len(k.opts.Prompt)+k.opts.MaxTokens, "context length must fit the test prompt")
	assert.NotEmpty(t, info.Backend, "backend")
	for _, p := range progress {
		assert.NotEmpty(t, p.Stage, "progress stage")
		assert.True(t, p.Total <= 0 || p.Done <= p.Total, "progress %d of %d", p.Done, p.Total)
	}
	k.info = info

	_, err = k.a.Load(ctx, sdk.LoadRequest{Path: k.opts.ModelPath, Options: k.opts.LoadOptions}, func(sdk.LoadProgress) {})
	assert.ErrorIs(t, err, sdk.ErrAlreadyLoaded, "second load without unload")
}

func (k *kit) generateMaxTokens(t *testing.T, ctx context.Context) {
	toks, chunks, err := collect(ctx, k.a, k.greedy(k.opts.MaxTokens))
	require.NoError(t, err)
	fin := k.checkStream(t, chunks)
	require.Equal(t, sdk.FinishLength, fin)
	require.Len(t, toks, k.opts.MaxTokens)
	last := chunks[len(chunks)-1].Timings
	require.NotNil(t, last)
	assert.Equal(t, k.opts.MaxTokens, last.GeneratedTokens, "timings.GeneratedTokens")
	assert.Equal(t, len(k.opts.Prompt), last.PromptTokens, "timings.PromptTokens")
	k.ref = toks

	again, _, err := collect(ctx, k.a, k.greedy(k.opts.MaxTokens))
	require.NoError(t, err)
	assert.Equal(t, k.ref, again, "greedy generation must be deterministic")
}

func (k *kit) generateLogprobs(t *testing.T, ctx context.Context) {
	req := k.greedy(k.opts.MaxTokens)
	req.Logprobs, req.TopLogprobs = true, 3
	toks, chunks, err := collect(ctx, k.a, req)
	require.NoError(t, err)
	k.checkStream(t, chunks)
	assert.Equal(t, k.ref, toks)
	for i, c := range chunks {
		require.Len(t, c.Info, len(c.Tokens), "chunk %d: Info must be parallel to Tokens", i)
		for j, ti := range c.Info {
			assert.LessOrEqual(t, ti.Logprob, float32(1e-4), "logprob")
			assert.False(t, math.IsNaN(float64(ti.Logprob)) || math.IsInf(float64(ti.Logprob), 0), "logprob not finite")
			require.Len(t, ti.Top, min(3, k.info.VocabSize), "top logprobs")
			for x := 1; x < len(ti.Top); x++ {
				assert.GreaterOrEqual(t, ti.Top[x-1].Logprob, ti.Top[x].Logprob, "top logprobs sorted")
			}
			assert.Equal(t, c.Tokens[j], ti.Top[0].Token, "greedy token must be the most likely")
			assert.InDelta(t, ti.Top[0].Logprob, ti.Logprob, 1e-3)
		}
	}
}

func (k *kit) stopTokens(t *testing.T, ctx context.Context) {
	stop := k.ref[min(2, len(k.ref)-1)]
	want := 0
	for want < len(k.ref) && k.ref[want] != stop {
		want++
	}
	want++ // the stop token is included
	req := k.greedy(k.opts.MaxTokens)
	req.StopTokens = []int32{stop}
	toks, chunks, err := collect(ctx, k.a, req)
	require.NoError(t, err)
	assert.Equal(t, sdk.FinishStop, k.checkStream(t, chunks))
	assert.Equal(t, k.ref[:want], toks, "generation ends with (and includes) the stop token")
}

// longRequest asks for as many tokens as the context allows (capped).
func (k *kit) longRequest(id string) sdk.GenerateRequest {
	req := k.greedy(min(k.info.ContextLength-len(k.opts.Prompt), 1<<14))
	req.ID = id
	return req
}

func (k *kit) waitIdle(t *testing.T, ctx context.Context) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := k.a.Stats(ctx)
		require.NoError(t, err)
		if st.Running == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("adapter still reports %d running generations 10 s after they were canceled", st.Running)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (k *kit) cancelContext(t *testing.T, ctx context.Context) {
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req := k.longRequest("adaptertest-cancel-ctx")
	n := 0
	start := time.Now()
	err := k.a.Generate(gctx, req, func(c sdk.Chunk) error {
		n += len(c.Tokens)
		cancel() // cancel after the first chunk, mid-stream
		return nil
	})
	require.Error(t, err, "a canceled generation must return an error")
	assert.True(t, errors.Is(err, context.Canceled) && errors.Is(err, sdk.ErrCanceled), "error %v must match context.Canceled and sdk.ErrCanceled", err)
	assert.Less(t, n, req.MaxTokens, "generation must stop early")
	assert.Less(t, time.Since(start), 30*time.Second)
	k.waitIdle(t, ctx)
}

func (k *kit) cancelByID(t *testing.T, ctx context.Context) {
	req := k.longRequest("adaptertest-cancel-id")
	var toks []int32
	var last sdk.Chunk
	var once sync.Once
	err := k.a.Generate(ctx, req, func(c sdk.Chunk) error {
		toks = append(toks, c.Tokens...)
		last = c
		once.Do(func() {
			go func() { _ = k.a.Cancel(ctx, req.ID) }()
		})
		return nil
	})
	if err != nil {
		assert.ErrorIs(t, err, sdk.ErrCanceled, "Cancel(id) ends the stream with FinishCanceled or ErrCanceled")
	} else {
		assert.Equal(t, sdk.FinishCanceled, last.Finish, "Cancel(id) ends the stream with FinishCanceled or ErrCanceled")
	}
	assert.Less(t, len(toks), req.MaxTokens, "generation must stop early")
	require.NoError(t, k.a.Cancel(ctx, "adaptertest-no-such-id"), "canceling an unknown id is not an error")
	k.waitIdle(t, ctx)
}

func (k *kit) concurrent(t *testing.T, ctx context.Context) {
	var wg sync.WaitGroup
	results := make([][]int32, k.opts.Concurrency)
	errs := make([]error, k.opts.Concurrency)
	for i := range k.opts.Concurrency {
		wg.Go(func() {
			req := k.greedy(k.opts.MaxTokens)
			req.ID = fmt.Sprintf("adaptertest-concurrent-%d", i)
			results[i], _, errs[i] = collect(ctx, k.a, req)
		})
	}
	wg.Wait()
	for i := range results {
		require.NoError(t, errs[i], "request %d", i)
		assert.Equal(t, k.ref, results[i], "request %d must match the sequential greedy result", i)
	}
}

func (k *kit) evaluate(t *testing.T, ctx context.Context) {
	l, err := k.a.Evaluate(ctx, k.opts.Prompt)
	require.NoError(t, err)
	require.Equal(t, len(k.opts.Prompt), l.Rows, "rows")
	require.Equal(t, k.info.VocabSize, l.Vocab, "vocab")
	require.Len(t, l.Data, l.Rows*l.Vocab)
	for i, v := range l.Data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("logit %d (row %d) is not finite: %v", i, i/l.Vocab, v)
		}
	}
	if !k.opts.SkipEvaluateGreedyCheck {
		row := l.Data[(l.Rows-1)*l.Vocab:]
		best := 0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
		}
		assert.Equal(t, k.ref[0], int32(best), "argmax of the last row must be the first greedy token")
	}
}

func (k *kit) errorMapping(t *testing.T, ctx context.Context) {
	// MaxTokens 0 is either rejected or means "until the context is full".
	toks, chunks, err := collect(ctx, k.a, k.greedy(0))
	if err != nil {
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "max tokens 0: rejected as an invalid argument, or run to the context limit")
	} else {
		assert.Equal(t, sdk.FinishLength, k.checkStream(t, chunks), "max tokens 0 without an error runs to the context limit")
		// +1: the token sampled from the last position need not be stored.
		assert.LessOrEqual(t, len(toks), k.info.ContextLength-len(k.opts.Prompt)+1, "max tokens 0 cannot exceed the context")
	}

	req := sdk.GenerateRequest{MaxTokens: 2}
	_, _, err = collect(ctx, k.a, req)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "empty prompt")

	req = sdk.GenerateRequest{Prompt: []int32{int32(k.info.VocabSize)}, MaxTokens: 2}
	_, _, err = collect(ctx, k.a, req)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "token outside the vocabulary")

	_, err = k.a.Evaluate(ctx, []int32{-1})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "evaluate: negative token")

	long := make([]int32, k.info.ContextLength+1)
	for i := range long {
		long[i] = k.opts.Prompt[i%len(k.opts.Prompt)]
	}
	_, _, err = collect(ctx, k.a, sdk.GenerateRequest{Prompt: long, MaxTokens: 1})
	require.ErrorIs(t, err, sdk.ErrContextTooLong, "prompt longer than the context")
	// The numbers are optional (a bare sdk.ErrContextTooLong is allowed) but
	// must be right when given.
	var ctl *sdk.ContextTooLongError
	if errors.As(err, &ctl) {
		assert.Equal(t, k.info.ContextLength, ctl.Max, "ContextTooLongError.Max")
		assert.Equal(t, len(long), ctl.Requested, "ContextTooLongError.Requested")
	}

	_, err = k.a.Plan(ctx, sdk.LoadRequest{Path: k.opts.ModelPath, Options: k.opts.LoadOptions})
	if err != nil {
		assert.ErrorIs(t, err, sdk.ErrNotImplemented, "Plan either works or is not implemented")
	}
}

func (k *kit) stats(t *testing.T, ctx context.Context) {
	st, err := k.a.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, 0, st.Running, "nothing is running")
	assert.GreaterOrEqual(t, st.TokensPerSecond, 0.0)
}

func (k *kit) unloadReload(t *testing.T, ctx context.Context) {
	require.NoError(t, k.a.Unload(ctx))
	_, _, err := collect(ctx, k.a, k.greedy(2))
	assert.ErrorIs(t, err, sdk.ErrNotLoaded, "generate after unload")
	_, err = k.a.Load(ctx, sdk.LoadRequest{Path: k.opts.ModelPath, Options: k.opts.LoadOptions}, func(sdk.LoadProgress) {})
	require.NoError(t, err, "load after unload")
	toks, _, err := collect(ctx, k.a, k.greedy(k.opts.MaxTokens))
	require.NoError(t, err)
	assert.Equal(t, k.ref, toks, "same output after a reload")
	require.NoError(t, k.a.Unload(ctx))
}
