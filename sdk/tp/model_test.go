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

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
)

// fakeModel records the calls it gets; it implements GreedyModel,
// GroupModel and SamplingModel through the wrappers below.
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

type sampleFake struct{ *fakeModel }

func (m sampleFake) DeviceSampling() bool { return m.spec.VocabSize%2 == 0 }

// ForwardSample returns tokens and Host rows that name the rank (its
// VocabSize) and the row.
func (m sampleFake) ForwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error) {
	if err := m.record(fmt.Sprintf("ForwardSample %s %+v", batchString(b), specs)); err != nil {
		return nil, nil, err
	}
	toks := make([]int32, len(b.Seqs))
	out := &engine.Output{Logits: make([][]float32, len(b.Seqs))}
	for i, sp := range specs {
		if sp.Host {
			out.Logits[i] = []float32{float32(m.spec.VocabSize), float32(i)}
			continue
		}
		toks[i] = int32(100*m.spec.VocabSize + i)
	}
	return toks, out, nil
}

// caps says which optional engine interfaces a fake implements.
type caps struct{ greedy, group, sample bool }

func (c caps) String() string {
	s := ""
	for _, x := range []struct {
		on   bool
		name string
	}{{c.greedy, "greedy"}, {c.group, "group"}, {c.sample, "sample"}} {
		if x.on {
			s += "+" + x.name
		}
	}
	if s == "" {
		return "plain"
	}
	return s[1:]
}

// allCaps is every combination of the optional interfaces.
var allCaps = func() []caps {
	var all []caps
	for i := range 8 {
		all = append(all, caps{i&1 != 0, i&2 != 0, i&4 != 0})
	}
	return all
}()

func wrapFake(f *fakeModel, c caps) engine.Model {
	r, g, s := greedyFake{f}, groupFake{f}, sampleFake{f}
	switch {
	case c.greedy && c.group && c.sample:
		return struct {
			*fakeModel
			greedyFake
			groupFake
			sampleFake
		}{f, r, g, s}
	case c.greedy && c.group:
		return struct {
			*fakeModel
			greedyFake
			groupFake
		}{f, r, g}
	case c.greedy && c.sample:
		return struct {
			*fakeModel
			greedyFake
			sampleFake
		}{f, r, s}
	case c.group && c.sample:
		return struct {
			*fakeModel
			groupFake
			sampleFake
		}{f, g, s}
	case c.greedy:
		return r
	case c.group:
		return g
	case c.sample:
		return s
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

func newTP(t *testing.T, size int, c caps, failOn map[int]string) *tpGroup {
	t.Helper()
	gs := newGroups(t, size, 0)
	tg := &tpGroup{groups: gs}
	for r := range size {
		f := &fakeModel{failOn: failOn[r], spec: engine.Spec{Architecture: "fake", VocabSize: 10 + r}}
		tg.fakes = append(tg.fakes, f)
		m := wrapFake(f, c)
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
	for _, v := range allCaps {
		t.Run(v.String(), func(t *testing.T) {
			tg := newTP(t, 3, v, nil)

			// The wrappers expose exactly the optional interfaces of the model.
			for _, m := range append([]engine.Model{tg.leader}, tg.followers...) {
				_, isGreedy := m.(engine.GreedyModel)
				_, isGroup := m.(engine.GroupModel)
				sm, isSample := m.(engine.SamplingModel)
				assert.Equal(t, v, caps{isGreedy, isGroup, isSample})
				if isSample {
					// the model's answer (the fakes: true for an even vocabulary)
					assert.Equal(t, m.Spec().VocabSize%2 == 0, sm.DeviceSampling())
				}
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
			calls := 3 // the two Forwards and CopyBlock
			if v.greedy {
				toks, err := tg.leader.(engine.GreedyModel).ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{3}, Pos: 3, Blocks: []int32{5}}}})
				require.NoError(t, err)
				assert.Len(t, toks, 1)
				calls++
			}
			if v.group {
				require.NoError(t, tg.leader.(engine.GroupModel).CopyGroupBlock(1, 7, 3))
				calls++
			}
			if v.sample {
				b := &engine.Batch{Seqs: []engine.SeqInput{
					{Tokens: []int32{3}, Pos: 3, Blocks: []int32{5}},
					{Tokens: []int32{8}, Pos: 40, Blocks: []int32{1, 2, 6}, GroupBlocks: [][]int32{{1, 2, 6}, {-1, -1, 6}}},
					{Tokens: []int32{2, 4}, Pos: 0, Blocks: []int32{7}},
				}}
				specs := []engine.SampleSpec{
					{Temperature: 1, Seed: 42, Index: 7},
					{Host: true},
					{Temperature: 0.7, TopK: 40, TopP: 0.9, MinP: 0.05, Seed: 1<<64 - 1, Index: 1 << 40},
				}
				toks, out, err := tg.leader.(engine.SamplingModel).ForwardSample(ctx, b, specs)
				require.NoError(t, err)
				// rank 0's results (its fake's VocabSize is 10)
				assert.Equal(t, []int32{1000, 0, 1002}, toks)
				require.NotNil(t, out)
				assert.Equal(t, [][]float32{nil, {10, 1}, nil}, out.Logits)
				calls++
			}
			_, err = tg.leader.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{4}, Pos: 3, Blocks: []int32{5}}}})
			require.NoError(t, err)

			require.NoError(t, tg.leader.Close())
			for i, d := range tg.done {
				assert.NoError(t, waitDone(t, d), "follower %d", i+1)
			}
			want := tg.fakes[0].Calls()
			require.Len(t, want, calls)
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
			if v.sample {
				_, _, err = tg.leader.(engine.SamplingModel).ForwardSample(ctx, &engine.Batch{}, nil)
				assert.Error(t, err)
			}
		})
	}
}

func TestFollowerRefusesEngineCalls(t *testing.T) {
	tg := newTP(t, 2, caps{true, true, true}, nil)
	f := tg.followers[0]
	_, err := f.Forward(context.Background(), &engine.Batch{})
	assert.ErrorIs(t, err, ErrFollower)
	assert.ErrorContains(t, err, "rank 1 is a tensor-parallel follower")
	_, err = f.(engine.GreedyModel).ForwardGreedy(context.Background(), &engine.Batch{})
	assert.ErrorIs(t, err, ErrFollower)
	assert.ErrorIs(t, f.CopyBlock(1, 2), ErrFollower)
	assert.ErrorIs(t, f.(engine.GroupModel).CopyGroupBlock(1, 1, 2), ErrFollower)
	_, _, err = f.(engine.SamplingModel).ForwardSample(context.Background(), &engine.Batch{}, nil)
	assert.ErrorIs(t, err, ErrFollower)
	assert.False(t, f.(engine.SamplingModel).DeviceSampling(), "the model's (vocabulary 11: false)")
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
	tg := newTP(t, 3, caps{}, map[int]string{2: "CopyBlock 1 2"})
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
	tg := newTP(t, 2, caps{}, map[int]string{0: "CopyBlock 3 4"})
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
	tg := newTP(t, 2, caps{}, nil)
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

// ForwardSample breaks the group on a failure as the other steps do: on a
// follower (its reason reaches the leader) or a panic on the leader.
func TestForwardSampleFailures(t *testing.T) {
	b := &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1}, Blocks: []int32{0}}}}
	specs := []engine.SampleSpec{{Temperature: 1, Seed: 3}}
	ctx := context.Background()

	t.Run("follower", func(t *testing.T) {
		failOn := fmt.Sprintf("ForwardSample %s %+v", batchString(b), specs)
		tg := newTP(t, 3, caps{sample: true}, map[int]string{2: failOn})
		sm := tg.leader.(engine.SamplingModel)
		if _, _, err := sm.ForwardSample(ctx, b, specs); err != nil {
			assert.ErrorContains(t, err, "ForwardSample failed on rank 2")
		}
		assert.ErrorContains(t, waitDone(t, tg.done[1]), "fake failure in ForwardSample")
		assert.ErrorIs(t, waitDone(t, tg.done[0]), ErrBroken)
		_, _, err := sm.ForwardSample(ctx, b, specs)
		assert.ErrorIs(t, err, ErrBroken)
		assert.ErrorContains(t, err, "ForwardSample failed on rank 2")
		assert.NoError(t, tg.leader.Close())
	})

	t.Run("leader panic", func(t *testing.T) {
		gs := newGroups(t, 2, 0)
		l := Lead(panicSampler{sampleFake{&fakeModel{}}}, gs[0])
		done := make(chan error, 1)
		f := &fakeModel{}
		Follow(sampleFake{f}, gs[1], func(err error) { done <- err })
		_, _, err := l.(engine.SamplingModel).ForwardSample(ctx, b, specs)
		assert.ErrorContains(t, err, "panic: sample boom")
		err = waitDone(t, done)
		assert.ErrorIs(t, err, ErrBroken)
		assert.ErrorContains(t, err, "ForwardSample failed on the leader")
		assert.NoError(t, l.Close())
	})

	// A follower's model without ForwardSample (not the leader's kind)
	// cannot run the step: the group breaks instead of the ranks
	// diverging.
	t.Run("follower lacks it", func(t *testing.T) {
		gs := newGroups(t, 2, 0)
		l := Lead(sampleFake{&fakeModel{}}, gs[0])
		done := make(chan error, 1)
		Follow(&fakeModel{}, gs[1], func(err error) { done <- err })
		if _, _, err := l.(engine.SamplingModel).ForwardSample(ctx, b, specs); err != nil {
			assert.ErrorIs(t, err, ErrBroken)
		}
		assert.ErrorContains(t, waitDone(t, done), "has no ForwardSample")
		assert.Eventually(t, func() bool { return gs[0].Err() != nil }, 5*time.Second, 5*time.Millisecond)
		_, err := l.Forward(ctx, b)
		assert.ErrorIs(t, err, ErrBroken)
		assert.NoError(t, l.Close())
	})

	// Specs that do not match the batch are refused before the broadcast:
	// the group stays whole.
	t.Run("bad specs", func(t *testing.T) {
		tg := newTP(t, 2, caps{sample: true}, nil)
		sm := tg.leader.(engine.SamplingModel)
		_, _, err := sm.ForwardSample(ctx, b, nil)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
		_, _, err = sm.ForwardSample(ctx, nil, specs)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
		toks, _, err := sm.ForwardSample(ctx, b, specs)
		require.NoError(t, err)
		assert.Equal(t, []int32{1000}, toks)
		require.NoError(t, tg.leader.Close())
		require.NoError(t, waitDone(t, tg.done[0]))
		assert.Len(t, tg.fakes[1].Calls(), 1)
		assert.Equal(t, tg.fakes[0].Calls(), tg.fakes[1].Calls())
	})
}

type panicSampler struct{ sampleFake }

func (panicSampler) ForwardSample(context.Context, *engine.Batch, []engine.SampleSpec) ([]int32, *engine.Output, error) {
	panic("sample boom")
}
