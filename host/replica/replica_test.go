package replica

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/example"
)

// killable wraps an in-process adapter and simulates its process dying:
// after kill, calls in flight end with sdk.ErrAdapterCrashed and new calls
// fail at once, until revive.
type killable struct {
	inner sdk.Adapter

	mu      sync.Mutex
	dead    bool
	next    int
	cancels map[int]context.CancelFunc
	loadErr error
}

func newKillable(inner sdk.Adapter) *killable {
	return &killable{inner: inner, cancels: map[int]context.CancelFunc{}}
}

func (k *killable) kill() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.dead = true
	for _, c := range k.cancels {
		c()
	}
}

func (k *killable) revive() {
	k.mu.Lock()
	k.dead = false
	k.mu.Unlock()
}

var errDead = fmt.Errorf("test member: %w", sdk.ErrAdapterCrashed)

func (k *killable) enter(ctx context.Context) (context.Context, func() bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dead {
		return nil, nil, errDead
	}
	ctx, cancel := context.WithCancel(ctx)
	id := k.next
	k.next++
	k.cancels[id] = cancel
	return ctx, func() bool {
		k.mu.Lock()
		defer k.mu.Unlock()
		delete(k.cancels, id)
		cancel()
		return k.dead
	}, nil
}

func call[T any](k *killable, ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	var zero T
	ctx, exit, err := k.enter(ctx)
	if err != nil {
		return zero, err
	}
	v, err := f(ctx)
	if exit() {
		return zero, errDead
	}
	return v, err
}

func (k *killable) Load(ctx context.Context, req sdk.LoadRequest, p func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	if k.loadErr != nil {
		return sdk.ModelInfo{}, k.loadErr
	}
	return call(k, ctx, func(ctx context.Context) (sdk.ModelInfo, error) { return k.inner.Load(ctx, req, p) })
}

func (k *killable) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	_, err := call(k, ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, k.inner.Generate(ctx, req, emit) })
	return err
}

func (k *killable) Cancel(ctx context.Context, id string) error {
	_, err := call(k, ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, k.inner.Cancel(ctx, id) })
	return err
}

func (k *killable) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	return call(k, ctx, func(ctx context.Context) (sdk.Logits, error) { return k.inner.Evaluate(ctx, tokens) })
}

func (k *killable) Stats(ctx context.Context) (sdk.Stats, error) {
	return call(k, ctx, k.inner.Stats)
}

func (k *killable) Unload(ctx context.Context) error {
	_, err := call(k, ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, k.inner.Unload(ctx) })
	return err
}

var counterArch = []string{"example-counter"}

func counterModel(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "counter.json")
	require.NoError(t, example.WriteModel(path, example.ModelFile{
		Architecture: "example-counter", Name: "counter", VocabSize: 64, ContextLength: 1 << 20}))
	return path
}

func newTestSet(t *testing.T, n int) (*Set, []*killable) {
	var ms []Member
	var ks []*killable
	for i := range n {
		k := newKillable(example.New(hclog.NewNullLogger(), counterArch))
		ks = append(ks, k)
		ms = append(ms, Member{Name: fmt.Sprintf("m%d", i), Adapter: k})
	}
	s, err := New(ms, Options{ProbeInterval: 10 * time.Millisecond, ProbeTimeout: time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s, ks
}

func loadSet(t *testing.T, s *Set, stepDelay string) sdk.ModelInfo {
	var mu sync.Mutex
	var last map[string]sdk.LoadProgress = map[string]sdk.LoadProgress{}
	info, err := s.Load(context.Background(), sdk.LoadRequest{Path: counterModel(t),
		Options: sdk.LoadOptions{Extra: map[string]string{"step_delay": stepDelay}}},
		func(p sdk.LoadProgress) {
			mu.Lock()
			defer mu.Unlock()
			assert.LessOrEqual(t, p.Done, p.Total, "merged progress %+v", p)
			if prev, ok := last[p.Stage]; ok {
				assert.GreaterOrEqual(t, p.Done, prev.Done, "merged progress goes forward")
			}
			last[p.Stage] = p
		})
	require.NoError(t, err)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, sdk.LoadProgress{Stage: "weights", Done: int64(s.Len()), Total: int64(s.Len())}, last["weights"],
		"the last merged progress counts every member")
	return info
}

// stream is a running Generate.
type stream struct {
	first  chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	tokens []int32
	finish sdk.FinishReason
	err    error
}

func start(s *Set, id string, prompt int32, max int) *stream {
	st := &stream{first: make(chan struct{}), done: make(chan struct{})}
	var once sync.Once
	go func() {
		defer close(st.done)
		err := s.Generate(context.Background(), sdk.GenerateRequest{ID: id, Prompt: []int32{prompt}, MaxTokens: max},
			func(c sdk.Chunk) error {
				st.mu.Lock()
				st.tokens = append(st.tokens, c.Tokens...)
				if c.Finish != sdk.FinishNone {
					st.finish = c.Finish
				}
				st.mu.Unlock()
				once.Do(func() { close(st.first) })
				return nil
			})
		st.mu.Lock()
		st.err = err
		st.mu.Unlock()
		once.Do(func() { close(st.first) })
	}()
	return st
}

func (st *stream) wait(t *testing.T) {
	t.Helper()
	select {
	case <-st.done:
	case <-time.After(20 * time.Second):
		t.Fatal("generation did not end")
	}
}

func inflight(s *Set) []int {
	var out []int
	for _, m := range s.Members() {
		out = append(out, m.InFlight)
	}
	return out
}

func TestConformanceOverSet(t *testing.T) {
	dir := t.TempDir()
	model := filepath.Join(dir, "counter.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{Architecture: "example-counter", Name: "c", VocabSize: 64, ContextLength: 256}))
	other := filepath.Join(dir, "other.json")
	require.NoError(t, example.WriteModel(other, example.ModelFile{Architecture: "llama", VocabSize: 64, ContextLength: 256}))
	info := sdk.Info{Name: "example", Version: "0.1.0", Architectures: counterArch}
	adaptertest.Run(t, func(l hclog.Logger) (sdk.Adapter, error) {
		s, err := New([]Member{{Adapter: example.New(l, counterArch)}, {Adapter: example.New(l, counterArch)}}, Options{Logger: l})
		if err == nil {
			t.Cleanup(func() { _ = s.Close(context.Background()) })
		}
		return s, err
	}, adaptertest.Options{Info: info, ModelPath: model, UnsupportedModelPath: other})
}

func TestNewAndNotLoaded(t *testing.T) {
	_, err := New(nil, Options{})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = New([]Member{{Name: "x"}}, Options{})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)

	s, _ := newTestSet(t, 2)
	err = s.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, sdk.ErrNotLoaded)
	_, err = s.Evaluate(context.Background(), []int32{1})
	require.ErrorIs(t, err, sdk.ErrNotLoaded)
	require.NoError(t, s.Unload(context.Background()), "unloading an unloaded set is not an error")
}

// Load spreads: concurrent requests go to the least loaded member, ties
// round robin; Cancel reaches the member running the id.
func TestLeastLoadedAndCancel(t *testing.T) {
	s, _ := newTestSet(t, 3)
	info := loadSet(t, s, "2ms")
	assert.Equal(t, 3<<16, info.MaxSequences, "capacity is the sum over members")

	// Sequential requests: ties every time, so round robin.
	for i := range 6 {
		st := start(s, fmt.Sprintf("seq%d", i), 1, 2)
		st.wait(t)
		require.NoError(t, st.err)
		assert.Equal(t, []int32{2, 3}, st.tokens)
	}
	for _, m := range s.Members() {
		assert.EqualValues(t, 2, m.Served, "round robin on ties: %+v", s.Members())
	}

	var streams []*stream
	for i := range 6 {
		st := start(s, fmt.Sprintf("long%d", i), int32(i), 1<<19)
		<-st.first
		streams = append(streams, st)
	}
	assert.Equal(t, []int{2, 2, 2}, inflight(s), "least loaded")
	stats, err := s.Stats(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 6, stats.Running, "stats sum the members")

	for i, st := range streams {
		require.NoError(t, s.Cancel(context.Background(), fmt.Sprintf("long%d", i)))
		st.wait(t)
		require.NoError(t, st.err)
		assert.Equal(t, sdk.FinishCanceled, st.finish)
	}
	assert.Equal(t, []int{0, 0, 0}, inflight(s))
	require.NoError(t, s.Cancel(context.Background(), "unknown-id"))

	l, err := s.Evaluate(context.Background(), []int32{1, 2})
	require.NoError(t, err)
	assert.Equal(t, 2, l.Rows)

	require.NoError(t, s.Unload(context.Background()))
	for _, m := range s.Members() {
		assert.False(t, m.Loaded)
	}
	_, err = s.Evaluate(context.Background(), []int32{1})
	require.ErrorIs(t, err, sdk.ErrNotLoaded)
}

// A member dies mid-run: its streaming request fails cleanly, the others
// finish, new requests go to the members that are up, and the member comes
// back once it answers the probe.
func TestMemberDiesMidRun(t *testing.T) {
	s, ks := newTestSet(t, 3)
	loadSet(t, s, "2ms")
	var streams []*stream
	for i := range 3 {
		st := start(s, fmt.Sprintf("r%d", i), int32(i), 150)
		<-st.first
		streams = append(streams, st)
	}
	require.Equal(t, []int{1, 1, 1}, inflight(s))
	ks[1].kill()
	for i, st := range streams {
		st.wait(t)
		if i == 1 {
			require.Error(t, st.err)
			assert.ErrorIs(t, st.err, sdk.ErrAdapterCrashed)
			assert.Contains(t, st.err.Error(), "died mid-stream")
			continue
		}
		require.NoError(t, st.err, "stream %d", i)
		assert.Len(t, st.tokens, 150)
		assert.Equal(t, sdk.FinishLength, st.finish)
	}
	ms := s.Members()
	assert.False(t, ms[1].Up)
	assert.True(t, ms[0].Up && ms[2].Up)

	// The set keeps serving on the two that are up, spreading over both.
	before := s.Members()
	var wg sync.WaitGroup
	for i := range 8 {
		st := start(s, fmt.Sprintf("after%d", i), 5, 20)
		wg.Add(1)
		go func() { defer wg.Done(); st.wait(t) }()
		defer func() { require.NoError(t, st.err); assert.Len(t, st.tokens, 20) }()
	}
	wg.Wait()
	after := s.Members()
	assert.Equal(t, before[1].Served, after[1].Served, "nothing routed to the dead member")
	assert.Greater(t, after[0].Served, before[0].Served)
	assert.Greater(t, after[2].Served, before[2].Served)
	st, err := s.Stats(context.Background())
	require.NoError(t, err, "stats answer while one member is down")
	assert.Equal(t, 0, st.Running)

	ks[1].revive()
	require.Eventually(t, func() bool { return s.Members()[1].Up }, 5*time.Second, 5*time.Millisecond, "probe brings it back")
	b := s.Members()[1].Served
	for i := range 3 {
		st := start(s, fmt.Sprintf("back%d", i), 1, 1)
		st.wait(t)
		require.NoError(t, st.err)
	}
	assert.Greater(t, s.Members()[1].Served, b, "revived member serves again")
}

// A member that died while idle is found out by the next request routed
// to it; that request had emitted nothing and is retried on another.
func TestRetryBeforeFirstToken(t *testing.T) {
	s, ks := newTestSet(t, 2)
	loadSet(t, s, "0s")
	ks[0].kill() // the set does not know yet
	for i := range 4 {
		st := start(s, fmt.Sprintf("q%d", i), 3, 4)
		st.wait(t)
		require.NoError(t, st.err, "request %d", i)
		assert.Equal(t, []int32{4, 5, 6, 7}, st.tokens)
	}
	ms := s.Members()
	assert.False(t, ms[0].Up)
	assert.EqualValues(t, 1, ms[0].Failures, "found out once, then skipped")

	// Evaluate is retried the same way.
	ks[0].revive()
	require.Eventually(t, func() bool { return s.Members()[0].Up }, 5*time.Second, 5*time.Millisecond)
	ks[1].kill()
	for range 3 {
		l, err := s.Evaluate(context.Background(), []int32{1})
		require.NoError(t, err)
		assert.Equal(t, 1, l.Rows)
	}
	assert.False(t, s.Members()[1].Up)

	// All down: a clear error matching sdk.ErrAdapterCrashed.
	ks[0].kill()
	err := s.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, sdk.ErrAdapterCrashed)
	err = s.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, ErrNoMember)
	_, err = s.Stats(context.Background())
	require.ErrorIs(t, err, sdk.ErrAdapterCrashed)
}

// Request errors are not member failures: no retry, no member taken out.
func TestRequestErrorsPassThrough(t *testing.T) {
	s, _ := newTestSet(t, 2)
	loadSet(t, s, "0s")
	err := s.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{999}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	for _, m := range s.Members() {
		assert.True(t, m.Up)
		assert.Zero(t, m.Failures)
	}
	assert.EqualValues(t, 1, s.Members()[0].Served+s.Members()[1].Served, "not retried")

	emitErr := errors.New("client went away")
	err = s.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 5}, func(sdk.Chunk) error { return emitErr })
	require.ErrorIs(t, err, emitErr)
}

// A member that fails to load is left out; the set serves with the rest.
func TestPartialLoad(t *testing.T) {
	s, ks := newTestSet(t, 3)
	ks[2].loadErr = &sdk.OutOfMemoryError{Device: "cuda:2", Requested: 100, Free: 10}
	info := loadSet2(t, s)
	assert.Equal(t, 2<<16, info.MaxSequences)
	ms := s.Members()
	assert.True(t, ms[0].Loaded && ms[1].Loaded)
	assert.False(t, ms[2].Loaded)
	for i := range 4 {
		st := start(s, fmt.Sprintf("p%d", i), 1, 1)
		st.wait(t)
		require.NoError(t, st.err)
	}
	assert.Zero(t, s.Members()[2].Served)

	_, err := s.Load(context.Background(), sdk.LoadRequest{Path: counterModel(t)}, nil)
	require.ErrorIs(t, err, sdk.ErrAlreadyLoaded)
	require.NoError(t, s.Unload(context.Background()))

	for _, k := range ks {
		k.loadErr = &sdk.OutOfMemoryError{Device: "cuda", Requested: 100, Free: 10}
	}
	_, err = s.Load(context.Background(), sdk.LoadRequest{Path: counterModel(t)}, nil)
	var oom *sdk.OutOfMemoryError
	require.ErrorAs(t, err, &oom, "all failed: the members' errors")
}

func loadSet2(t *testing.T, s *Set) sdk.ModelInfo {
	info, err := s.Load(context.Background(), sdk.LoadRequest{Path: counterModel(t)}, nil)
	require.NoError(t, err)
	return info
}

func TestProgressMerger(t *testing.T) {
	var got []sdk.LoadProgress
	pm := newProgressMerger(2, func(p sdk.LoadProgress) { got = append(got, p) })
	pm.update(0, sdk.LoadProgress{Stage: "weights", Done: 5, Total: 10})
	pm.update(1, sdk.LoadProgress{Stage: "weights", Done: 2, Total: 10})
	pm.update(0, sdk.LoadProgress{Stage: "weights", Done: 10, Total: 10})
	pm.update(0, sdk.LoadProgress{Stage: "kv", Done: 1, Total: 1})
	pm.update(1, sdk.LoadProgress{Stage: "weights", Done: 10, Total: 10})
	assert.Equal(t, []sdk.LoadProgress{
		{Stage: "weights", Done: 5, Total: 20},
		{Stage: "weights", Done: 7, Total: 20},
		{Stage: "weights", Done: 12, Total: 20},
		{Stage: "kv", Done: 1, Total: 2},
		{Stage: "weights", Done: 20, Total: 20},
	}, got)
}

func TestIsMemberDown(t *testing.T) {
	assert.False(t, IsMemberDown(nil))
	assert.True(t, IsMemberDown(fmt.Errorf("x: %w", sdk.ErrAdapterCrashed)))
	assert.False(t, IsMemberDown(sdk.ErrInvalidArgument))
	assert.False(t, IsMemberDown(context.Canceled))
	assert.False(t, IsMemberDown(status.Error(codes.Canceled, context.Canceled.Error())))
	// a call on the connection the supervisor closed while relaunching the member
	assert.True(t, IsMemberDown(fmt.Errorf("generate: %w", status.Error(codes.Canceled, "grpc: the client connection is closing"))))
	assert.True(t, IsMemberDown(status.Error(codes.Unavailable, "connection refused")))
}

// busyAdapter answers Generate with sdk.ErrBusy.
type busyAdapter struct{ sdk.Adapter }

func (busyAdapter) Generate(context.Context, sdk.GenerateRequest, func(sdk.Chunk) error) error {
	return fmt.Errorf("queue full: %w", sdk.ErrBusy)
}

// A busy member is not down: the request goes to another member once, and
// the busy one stays in rotation.
func TestBusyRetriedElsewhere(t *testing.T) {
	ex := example.New(hclog.NewNullLogger(), counterArch)
	s, err := New([]Member{
		{Name: "busy", Adapter: busyAdapter{example.New(hclog.NewNullLogger(), counterArch)}},
		{Name: "ok", Adapter: ex},
	}, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	loadSet2(t, s)
	for i := range 4 {
		st := start(s, fmt.Sprintf("b%d", i), 1, 2)
		st.wait(t)
		require.NoError(t, st.err)
		assert.Equal(t, []int32{2, 3}, st.tokens)
	}
	ms := s.Members()
	assert.True(t, ms[0].Up, "busy is not down")
	assert.Zero(t, ms[0].Failures)
	assert.EqualValues(t, 4, ms[1].Served)

	// With only busy members, the error says busy.
	s2, err := New([]Member{{Adapter: busyAdapter{example.New(hclog.NewNullLogger(), counterArch)}}}, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close(context.Background()) })
	loadSet2(t, s2)
	err = s2.Generate(context.Background(), sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 1}, func(sdk.Chunk) error { return nil })
	require.ErrorIs(t, err, sdk.ErrBusy)
	assert.NotErrorIs(t, err, sdk.ErrAdapterCrashed, "busy is not a crash (429, not 503)")
}
