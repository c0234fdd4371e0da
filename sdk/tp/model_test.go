package tp

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
)

// fakeModel records the calls it gets; it implements GreedyModel and
// GroupModel through the wrappers below.
type fakeModel struct {
	mu     sync.Mutex
	calls  []string
	closed int
	failOn string // fail the call whose record equals this
	block  chan struct{}
	ctxErr []error // ctx.Err() seen at the end of each forward
	spec   engine.Spec
}

func (m *fakeModel) record(call string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, call)
	if call == m.failOn {
		return fmt.Errorf("fake failure in %s", call)
	}
	return nil
}

func (m *fakeModel) Calls() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.calls...)
}

func batchString(b *engine.Batch) string {
	if b == nil {
		return "nil"
	}
	return fmt.Sprintf("%+v", b.Seqs)
}

func (m *fakeModel) Spec() engine.Spec { return m.spec }
func (m *fakeModel) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	if m.block != nil {
		<-m.block
	}
	m.mu.Lock()
	m.ctxErr = append(m.ctxErr, ctx.Err())
	m.mu.Unlock()
	if err := m.record("Forward " + batchString(b)); err != nil {
		return nil, err
	}
	return &engine.Output{Logits: make([][]float32, len(b.Seqs))}, nil
}
func (m *fakeModel) CopyBlock(dst, src int32) error {
	return m.record(fmt.Sprintf("CopyBlock %d %d", dst, src))
}
func (m *fakeModel) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed++
	return nil
}

type greedyFake struct{ *fakeModel }

func (m greedyFake) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	if err := m.record("ForwardGreedy " + batchString(b)); err != nil {
		return nil, err
	}
	return make([]int32, len(b.Seqs)), nil
}

type groupFake struct{ *fakeModel }

func (m groupFake) CopyGroupBlock(g int, dst, src int32) error {
	return m.record(fmt.Sprintf("CopyGroupBlock %d %d %d", g, dst, src))
}

type bothFake struct{ *fakeModel }

func (m bothFake) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	return greedyFake(m).ForwardGreedy(ctx, b)
}
func (m bothFake) CopyGroupBlock(g int, dst, src int32) error {
	return groupFake(m).CopyGroupBlock(g, dst, src)
}

func wrapFake(f *fakeModel, greedy, group bool) engine.Model {
	switch {
	case greedy && group:
		return bothFake{f}
	case greedy:
		return greedyFake{f}
	case group:
		return groupFake{f}
	}
	return f
}

// tpGroup is a leader and its followers over fakes.
type tpGroup struct {
	leader    engine.Model
	followers []engine.Model
	fakes     []*fakeModel
	done      []chan error
	groups    []*Group
}

func newTP(t *testing.T, size int, greedy, group bool, failOn map[int]string) *tpGroup {
	t.Helper()
	gs := newGroups(t, size, 0)
	tg := &tpGroup{groups: gs}
	for r := range size {
		f := &fakeModel{failOn: failOn[r], spec: engine.Spec{Architecture: "fake", VocabSize: 10 + r}}
		tg.fakes = append(tg.fakes, f)
		m := wrapFake(f, greedy, group)
		if r == 0 {
			tg.leader = Lead(m, gs[0])
			continue
		}
		done := make(chan error, 2)
		tg.done = append(tg.done, done)
		tg.followers = append(tg.followers, Follow(m, gs[r], func(err error) { done <- err }))
	}
	return tg
}

func waitDone(t *testing.T, c chan error) error {
	t.Helper()
	select {
	case err := <-c:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("follower loop did not stop")
		return nil
	}
}

func TestLeadFollowSameCalls(t *testing.T) {
	for _, v := range []struct {
		name          string
		greedy, group bool
	}{{"plain", false, false}, {"greedy", true, false}, {"group", false, true}, {"greedy+group", true, true}} {
		t.Run(v.name, func(t *testing.T) {
			tg := newTP(t, 3, v.greedy, v.group, nil)

			// The wrappers expose exactly the optional interfaces of the model.
			for _, m := range append([]engine.Model{tg.leader}, tg.followers...) {
				_, isGreedy := m.(engine.GreedyModel)
				_, isGroup := m.(engine.GroupModel)
				assert.Equal(t, v.greedy, isGreedy)
				assert.Equal(t, v.group, isGroup)
			}
			assert.Equal(t, 10, tg.leader.Spec().VocabSize)
			assert.Equal(t, 11, tg.followers[0].Spec().VocabSize)

			ctx := context.Background()
			b1 := &engine.Batch{Seqs: []engine.SeqInput{
				{Tokens: []int32{1, 2, 3}, Pos: 0, Blocks: []int32{4}, AllLogits: true},
				{Tokens: []int32{9}, Pos: 17, Blocks: []int32{1, 2}, GroupBlocks: [][]int32{{1, 2}, {-1, 3}}},
			}}
			out, err := tg.leader.Forward(ctx, b1)
			require.NoError(t, err)
			assert.Len(t, out.Logits, 2)
			require.NoError(t, tg.leader.CopyBlock(5, 4))
			if v.greedy {
				toks, err := tg.leader.(engine.GreedyModel).ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{3}, Pos: 3, Blocks: []int32{5}}}})
				require.NoError(t, err)
				assert.Len(t, toks, 1)
			}
			if v.group {
				require.NoError(t, tg.leader.(engine.GroupModel).CopyGroupBlock(1, 7, 3))
			}
			_, err = tg.leader.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{4}, Pos: 3, Blocks: []int32{5}}}})
			require.NoError(t, err)

			require.NoError(t, tg.leader.Close())
			for i, d := range tg.done {
				assert.NoError(t, waitDone(t, d), "follower %d", i+1)
			}
			want := tg.fakes[0].Calls()
			require.Len(t, want, 3+map[bool]int{true: 1}[v.greedy]+map[bool]int{true: 1}[v.group])
			for r, f := range tg.fakes[1:] {
				assert.Equal(t, want, f.Calls(), "rank %d", r+1)
			}
			for r, f := range tg.fakes {
				assert.Equal(t, 1, f.closed, "rank %d model closed once", r)
			}
			// A follower's Close after the loop ended does not close twice.
			for _, m := range tg.followers {
				assert.NoError(t, m.Close())
			}
			assert.Equal(t, 1, tg.fakes[1].closed)
			// The closed leader refuses.
			_, err = tg.leader.Forward(ctx, b1)
			assert.Error(t, err)
		})
	}
}

func TestFollowerRefusesEngineCalls(t *testing.T) {
	tg := newTP(t, 2, true, true, nil)
	f := tg.followers[0]
	_, err := f.Forward(context.Background(), &engine.Batch{})
	assert.ErrorIs(t, err, ErrFollower)
	assert.ErrorContains(t, err, "rank 1 is a tensor-parallel follower")
	_, err = f.(engine.GreedyModel).ForwardGreedy(context.Background(), &engine.Batch{})
	assert.ErrorIs(t, err, ErrFollower)
	assert.ErrorIs(t, f.CopyBlock(1, 2), ErrFollower)
	assert.ErrorIs(t, f.(engine.GroupModel).CopyGroupBlock(1, 1, 2), ErrFollower)
	assert.Empty(t, tg.fakes[1].Calls())

	// A local Close stops the loop cleanly and closes the model; the
	// leader's next call fails.
	require.NoError(t, f.Close())
	assert.NoError(t, waitDone(t, tg.done[0]))
	assert.Equal(t, 1, tg.fakes[1].closed)
	// The leader notices the lost connection (at once here; with a real
	// model at its next all-reduce at the latest).
	assert.Eventually(t, func() bool { return tg.groups[0].Err() != nil }, 5*time.Second, 5*time.Millisecond)
	_, err = tg.leader.Forward(context.Background(), &engine.Batch{})
	assert.ErrorIs(t, err, ErrBroken)
	require.NoError(t, tg.leader.Close())
	assert.Equal(t, 1, tg.fakes[0].closed)
}

// A follower whose step fails breaks the group: the leader's next call
// fails with the follower's reason, the other followers stop too.
func TestFollowerFailureBreaksGroup(t *testing.T) {
	tg := newTP(t, 3, false, false, map[int]string{2: "CopyBlock 1 2"})
	// Rank 2 fails while or after rank 0 runs the step: rank 0 reports it
	// on this call or the next.
	if err := tg.leader.CopyBlock(1, 2); err != nil {
		assert.ErrorContains(t, err, "CopyBlock failed on rank 2")
	}
	assert.ErrorContains(t, waitDone(t, tg.done[1]), "fake failure in CopyBlock 1 2")
	err := waitDone(t, tg.done[0])
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrBroken)
	assert.ErrorContains(t, err, "rank 2")

	_, err = tg.leader.Forward(context.Background(), &engine.Batch{})
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrBroken)
	assert.ErrorContains(t, err, "CopyBlock failed on rank 2")
	assert.NoError(t, tg.leader.Close())
	for r, f := range tg.fakes {
		assert.Equal(t, 1, f.closed, "rank %d", r)
	}
}

// A leader-side failure breaks the group too (the followers cannot know how
// far it got) and they stop with its reason.
func TestLeaderFailureBreaksGroup(t *testing.T) {
	tg := newTP(t, 2, false, false, map[int]string{0: "CopyBlock 3 4"})
	err := tg.leader.CopyBlock(3, 4)
	require.Error(t, err)
	assert.ErrorContains(t, err, "fake failure")
	err = waitDone(t, tg.done[0])
	assert.ErrorIs(t, err, ErrBroken)
	assert.ErrorContains(t, err, "CopyBlock failed on the leader")
	assert.NoError(t, tg.leader.Close())
}

// A cancelled context before the step sends nothing; cancelling during the
// step does not reach the model (the step runs to its end on every rank).
func TestLeaderContext(t *testing.T) {
	tg := newTP(t, 2, false, false, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := tg.leader.Forward(ctx, &engine.Batch{})
	assert.ErrorIs(t, err, context.Canceled)

	ctx, cancel = context.WithCancel(context.Background())
	tg.fakes[0].block = make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		_, err := tg.leader.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1}, Blocks: []int32{0}}}})
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	close(tg.fakes[0].block)
	require.NoError(t, <-errc)
	require.NoError(t, tg.leader.Close())
	require.NoError(t, waitDone(t, tg.done[0]))
	assert.Equal(t, tg.fakes[0].Calls(), tg.fakes[1].Calls())
	require.Len(t, tg.fakes[0].ctxErr, 1)
	assert.NoError(t, tg.fakes[0].ctxErr[0])
}

type panicModel struct{ *fakeModel }

func (panicModel) CopyBlock(int32, int32) error { panic("boom") }

func TestLeaderPanicBreaksGroup(t *testing.T) {
	gs := newGroups(t, 2, 0)
	l := Lead(panicModel{&fakeModel{}}, gs[0])
	done := make(chan error, 1)
	Follow(&fakeModel{}, gs[1], func(err error) { done <- err })
	err := l.CopyBlock(1, 2)
	require.Error(t, err)
	assert.ErrorContains(t, err, "panic: boom")
	assert.ErrorIs(t, waitDone(t, done), ErrBroken)
	assert.NoError(t, l.Close())
}

// A follower that receives garbage instead of a step message breaks the
// group instead of panicking.
func TestFollowerBadMessage(t *testing.T) {
	gs := newGroups(t, 2, 0)
	done := make(chan error, 1)
	f := &fakeModel{}
	Follow(f, gs[1], func(err error) { done <- err })
	_, err := gs[0].Broadcast([]byte{stepVersion, 200})
	require.NoError(t, err)
	err = waitDone(t, done)
	assert.ErrorContains(t, err, "unknown op 200")
	assert.Eventually(t, func() bool { return gs[0].Err() != nil }, 5*time.Second, 5*time.Millisecond)
	assert.ErrorContains(t, gs[0].Err(), "unknown op 200")
	assert.Equal(t, 1, f.closed)
	assert.True(t, errors.Is(gs[0].Err(), ErrBroken))
}
