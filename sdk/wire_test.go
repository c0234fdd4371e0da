package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
)

// fake is a scriptable adapter for wire tests.
type fake struct {
	loadErr    error
	genErr     error
	panicGen   atomic.Bool
	ctxReached chan error // receives the Generate ctx's error when it ends
	vocab      int
}

func (f *fake) Load(_ context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	if f.loadErr != nil {
		return sdk.ModelInfo{}, f.loadErr
	}
	for i := range 3 {
		progress(sdk.LoadProgress{Stage: "weights", Done: int64(i + 1), Total: 3})
	}
	return sdk.ModelInfo{Architecture: "fake", Name: req.Path, ContextLength: 4096, VocabSize: f.vocab,
		KVBytes: 1 << 40, ParamCount: 20_000_000_000}, nil
}

func (f *fake) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	if f.panicGen.Load() {
		panic("boom")
	}
	if f.genErr != nil {
		return f.genErr
	}
	if req.MaxTokens < 0 { // stream until canceled
		for {
			if err := emit(sdk.Chunk{Tokens: []int32{1}}); err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				f.ctxReached <- ctx.Err()
				return ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
	}
	toks := make([]int32, req.MaxTokens)
	info := make([]sdk.TokenInfo, req.MaxTokens)
	for i := range toks {
		toks[i] = req.Prompt[0] + int32(i)
		info[i] = sdk.TokenInfo{Logprob: -0.5, Top: []sdk.TokenLogprob{{Token: toks[i], Logprob: -0.5}, {Token: 7, Logprob: -2}}}
	}
	return emit(sdk.Chunk{Tokens: toks, Info: info, Finish: sdk.FinishLength, Timings: &sdk.Timings{
		PromptTokens: len(req.Prompt), GeneratedTokens: len(toks), PromptTime: 3 * time.Millisecond, GenerateTime: time.Second}})
}

func (f *fake) Cancel(context.Context, string) error { return nil }

func (f *fake) Evaluate(_ context.Context, tokens []int32) (sdk.Logits, error) {
	l := sdk.Logits{Rows: len(tokens), Vocab: f.vocab, Data: make([]float32, len(tokens)*f.vocab)}
	for i := range l.Data {
		l.Data[i] = float32(i % 1000)
	}
	return l, nil
}

func (f *fake) Stats(context.Context) (sdk.Stats, error) {
	return sdk.Stats{Running: 2, PrefixHits: 5, TokensPerSecond: 12.5}, nil
}

func (f *fake) Unload(context.Context) error { return nil }

var fakeInfo = sdk.Info{Name: "fake", Version: "1.2.3", Architectures: []string{"fake", "fake2"}, DTypes: []string{"F32"}, Features: []string{"x"}}

func connect(t *testing.T, f *fake) sdk.RemoteAdapter {
	if f.vocab == 0 {
		f.vocab = 10
	}
	return adaptertest.Connect(t, fakeInfo, f, hclog.NewNullLogger())
}

func TestWireRoundTrip(t *testing.T) {
	ctx := context.Background()
	a := connect(t, &fake{})

	info, err := a.Describe(ctx)
	require.NoError(t, err)
	assert.Equal(t, fakeInfo, info)

	var progress []sdk.LoadProgress
	mi, err := a.Load(ctx, sdk.LoadRequest{Path: "/m.gguf", Options: sdk.LoadOptions{Extra: map[string]string{"k": "v"}}}, func(p sdk.LoadProgress) {
		progress = append(progress, p)
	})
	require.NoError(t, err)
	assert.Len(t, progress, 3)
	assert.Equal(t, sdk.ModelInfo{Architecture: "fake", Name: "/m.gguf", ContextLength: 4096, VocabSize: 10, KVBytes: 1 << 40, ParamCount: 20_000_000_000}, mi)

	var chunks []sdk.Chunk
	require.NoError(t, a.Generate(ctx, sdk.GenerateRequest{Prompt: []int32{5}, MaxTokens: 3}, func(c sdk.Chunk) error {
		chunks = append(chunks, c)
		return nil
	}))
	require.Len(t, chunks, 1)
	assert.Equal(t, []int32{5, 6, 7}, chunks[0].Tokens)
	assert.Equal(t, sdk.FinishLength, chunks[0].Finish)
	assert.Equal(t, &sdk.Timings{PromptTokens: 1, GeneratedTokens: 3, PromptTime: 3 * time.Millisecond, GenerateTime: time.Second}, chunks[0].Timings)
	assert.Equal(t, sdk.TokenInfo{Logprob: -0.5, Top: []sdk.TokenLogprob{{Token: 6, Logprob: -0.5}, {Token: 7, Logprob: -2}}}, chunks[0].Info[1])

	st, err := a.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, sdk.Stats{Running: 2, PrefixHits: 5, TokensPerSecond: 12.5}, st)

	_, err = a.Plan(ctx, sdk.LoadRequest{Path: "x"})
	assert.ErrorIs(t, err, sdk.ErrNotImplemented)
}

// A gpt-oss-sized Evaluate (vocab 201088) streams rows well past gRPC's
// default 4 MiB limit.
func TestWireEvaluateLarge(t *testing.T) {
	a := connect(t, &fake{vocab: 201088})
	l, err := a.Evaluate(context.Background(), make([]int32, 40)) // 32 MB of logits
	require.NoError(t, err)
	require.Equal(t, 40, l.Rows)
	require.Equal(t, 201088, l.Vocab)
	require.Len(t, l.Data, 40*201088)
	assert.Equal(t, float32((39*201088+5)%1000), l.Data[39*201088+5])
}

func TestWireErrors(t *testing.T) {
	cases := []struct {
		name  string
		err   error
		check func(t *testing.T, err error)
	}{
		{"unsupported", fmt.Errorf("arch %q: %w", "bert", sdk.ErrUnsupportedArchitecture), func(t *testing.T, err error) {
			assert.ErrorIs(t, err, sdk.ErrUnsupportedArchitecture)
			assert.Contains(t, err.Error(), `arch "bert"`)
		}},
		{"not loaded", sdk.ErrNotLoaded, func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrNotLoaded) }},
		{"already loaded", sdk.ErrAlreadyLoaded, func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrAlreadyLoaded) }},
		{"invalid", fmt.Errorf("bad: %w", sdk.ErrInvalidArgument), func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrInvalidArgument) }},
		{"busy", sdk.ErrBusy, func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrBusy) }},
		{"canceled", sdk.ErrCanceled, func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrCanceled) }},
		{"context too long sentinel", sdk.ErrContextTooLong, func(t *testing.T, err error) { assert.ErrorIs(t, err, sdk.ErrContextTooLong) }},
		{"context too long typed", fmt.Errorf("prompt: %w", &sdk.ContextTooLongError{Requested: 5000, Max: 4096}), func(t *testing.T, err error) {
			assert.ErrorIs(t, err, sdk.ErrContextTooLong)
			var ctl *sdk.ContextTooLongError
			require.ErrorAs(t, err, &ctl)
			assert.Equal(t, sdk.ContextTooLongError{Requested: 5000, Max: 4096}, *ctl)
		}},
		{"oom", fmt.Errorf("kv cache: %w", &sdk.OutOfMemoryError{Device: "cuda:0", Requested: 1 << 34, Free: 1 << 30}), func(t *testing.T, err error) {
			var oom *sdk.OutOfMemoryError
			require.ErrorAs(t, err, &oom)
			assert.Equal(t, sdk.OutOfMemoryError{Device: "cuda:0", Requested: 1 << 34, Free: 1 << 30}, *oom)
			assert.Contains(t, err.Error(), "kv cache")
		}},
		{"untyped", errors.New("something odd"), func(t *testing.T, err error) {
			assert.Contains(t, err.Error(), "something odd")
			assert.NotErrorIs(t, err, sdk.ErrInvalidArgument)
			var re *sdk.RemoteError
			require.ErrorAs(t, err, &re)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := connect(t, &fake{loadErr: c.err, genErr: c.err})
			_, err := a.Load(context.Background(), sdk.LoadRequest{}, nil)
			require.Error(t, err)
			c.check(t, err)
			err = a.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
			require.Error(t, err)
			c.check(t, err)
		})
	}
}

func TestWirePanicBecomesError(t *testing.T) {
	f := &fake{}
	a := connect(t, f)
	f.panicGen.Store(true)
	err := a.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.Error(t, err)
	assert.Contains(t, err.Error(), "panic")
	assert.Contains(t, err.Error(), "boom")
	f.panicGen.Store(false)
	// The server survived.
	require.NoError(t, a.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil }))
}

func TestWireCancelReachesAdapter(t *testing.T) {
	f := &fake{ctxReached: make(chan error, 1)}
	a := connect(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	err := a.Generate(ctx, sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: -1}, func(sdk.Chunk) error {
		if n++; n == 3 {
			cancel()
		}
		return nil
	})
	assert.ErrorIs(t, err, context.Canceled)
	assert.ErrorIs(t, err, sdk.ErrCanceled)
	select {
	case err := <-f.ctxReached:
		assert.ErrorIs(t, err, context.Canceled, "the adapter's Generate ctx was canceled")
	case <-time.After(5 * time.Second):
		t.Fatal("client cancel did not reach the adapter's Generate ctx")
	}

	// emit failing on the host side also ends the adapter's generation.
	stop := errors.New("client went away")
	err = a.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: -1}, func(sdk.Chunk) error { return stop })
	assert.ErrorIs(t, err, stop)
	select {
	case <-f.ctxReached:
	case <-time.After(5 * time.Second):
		t.Fatal("an emit error did not cancel the adapter's Generate ctx")
	}
}

func TestServeRefusesToRunByHand(t *testing.T) {
	t.Setenv(sdk.Handshake.MagicCookieKey, "")
	err := sdk.Serve(fakeInfo, func(hclog.Logger) (sdk.Adapter, error) { return &fake{}, nil })
	require.Error(t, err)
	assert.Contains(t, err.Error(), "orch-host launches it")

	err = sdk.Serve(sdk.Info{Name: "x"}, func(hclog.Logger) (sdk.Adapter, error) { return &fake{}, nil })
	assert.ErrorContains(t, err, "architecture")
}
